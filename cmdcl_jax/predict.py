"""Top-k classes of ordinary video files with a trained run's checkpoint.

``python -m cmdcl_jax.predict --workdir DIR [--top_k 5] [--step N] VIDEO...``

The model, its classes and the frame sampling come from ``DIR/run.json``; the weights from
the latest (or ``--step``) checkpoint. Frames are decoded with PyAV: L frames at the
middle of L equal segments, short side resized, centre crop, as in evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from flax import nnx

from cmdcl_jax.cli import quiet_logs
from cmdcl_jax.data import video as video_lib
from cmdcl_jax.data.transforms import EvalTransform
from cmdcl_jax.models.cmdcl import TRAINABLE, CMDCLConfig, build_cmdcl

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (holds run.json).", required=True)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes printed per video.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def load_model(workdir: Path, step: int | None = None) -> tuple[nnx.Module, dict]:
    """The run's model with the checkpoint's weights, and its ``run.json``."""
    run_file = workdir / "run.json"
    if not run_file.is_file():
        raise FileNotFoundError(f"{run_file}: missing; is {workdir} a training workdir?")
    run = json.loads(run_file.read_text())
    model = build_cmdcl(CMDCLConfig.from_dict(run["model"]), run["class_names"])
    manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    params = nnx.state(model, TRAINABLE)
    nnx.replace_by_pure_dict(params, _unwrap(restored["state"]["params"]))
    nnx.update(model, params)
    return model, run


def _unwrap(tree):
    """Orbax returns each saved ``nnx.Variable`` as ``{"value": array}``: keep the array."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _unwrap(v) for k, v in tree.items()}
    return tree


def clip_from_file(path: str, num_frames: int, crop_size: int) -> np.ndarray:
    """uint8 [L, S, S, 3]: the evaluation view of a video file."""
    resize_to = round(crop_size * 8 / 7)
    frames = video_lib.read_frames(path, num_frames, short_side=resize_to)
    return EvalTransform(num_frames, crop_size, resize_to).map({"frames": frames})["video"]


def predict(model: nnx.Module, run: dict, paths: list[str], top_k: int) -> list[list]:
    """``[[(class name, score), ...] per video]``: softmax probabilities for single-label
    tasks, per-class sigmoid probabilities for multi-label ones."""
    inference = run["inference"]
    forward = nnx.jit(lambda m, v: m(v)[0])
    results = []
    for path in paths:
        clip = clip_from_file(path, inference["num_frames"], inference["crop_size"])
        logits = forward(model, clip[None])[0]
        probs = jax.nn.softmax(logits) if run["kind"] == "single" else jax.nn.sigmoid(logits)
        probs = np.asarray(probs)
        order = np.argsort(-probs)[:top_k]
        results.append([(run["class_names"][i], float(probs[i])) for i in order])
    return results


def main(argv):
    quiet_logs()
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more video files")
    model, run = load_model(Path(_WORKDIR.value), _STEP.value)
    for path, top in zip(paths, predict(model, run, paths, _TOP_K.value), strict=True):
        print(path)
        for name, score in top:
            print(f"  {score:7.4f}  {name}")


if __name__ == "__main__":
    app.run(main)
