"""Top-k classes of ordinary video files with a trained run's checkpoint.

``python -m cmdcl_jax.predict --workdir DIR [--top_k 5] [--step N] VIDEO...``

The model, its classes and the frame sampling come from ``DIR/run.json``; the weights from
the newest readable (or ``--step``) checkpoint, with the checks of a resumed training run:
every trainable array present with its shape, and the checkpoint's own copy of
``run.json`` naming the same model and classes. Frames are decoded with PyAV: L frames at
the middle of L equal segments, short side resized, centre crop, as in evaluation. Each
video's result is printed as soon as it is known; a video that fails is reported with
its error and the command exits with status 1 after the others.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from cmdcl_jax.cli import quiet_logs
from cmdcl_jax.data import video as video_lib
from cmdcl_jax.data.transforms import EvalTransform
from cmdcl_jax.models.cmdcl import CONFOUNDERS, TRAINABLE, build_cmdcl
from cmdcl_jax.train import run_record
from cmdcl_jax.train.checkpoints import Checkpoints

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (holds run.json).", required=True)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes printed per video.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest readable).")


def load_model(workdir: Path, step: int | None = None) -> tuple[nnx.Module, dict]:
    """The run's model with the checkpoint's weights, and its ``run.json``.

    Raises:
      RunRecordError: ``run.json`` is missing or damaged with no copy to use, or it
        names another model or classes than the checkpoint's copy.
      CheckpointMismatchError: the checkpoint's arrays do not fill the model exactly.
    """
    checkpoints = Checkpoints(workdir, read_only=True)
    run = run_record.load_trained(workdir, checkpoints.run_record)
    model = build_cmdcl(run_record.model_config(run, workdir), run["class_names"])
    trained = {"params": nnx.state(model, TRAINABLE), "confounders": nnx.state(model, CONFOUNDERS)}
    restored, step = checkpoints.restore(trained, step=step)
    saved_run = checkpoints.run_record(step)
    if saved_run is not None:
        run_record.check_identity(workdir, run, saved_run)
    nnx.update(model, restored["params"], restored["confounders"])
    return model, run


def clip_from_file(path: str, num_frames: int, crop_size: int) -> np.ndarray:
    """uint8 [L, S, S, 3]: the evaluation view of a video file."""
    resize_to = round(crop_size * 8 / 7)
    frames = video_lib.read_frames(path, num_frames, short_side=resize_to)
    return EvalTransform(num_frames, crop_size, resize_to).map({"frames": frames})["video"]


def predict(model: nnx.Module, run: dict, paths: list[str], top_k: int) -> Iterator[tuple]:
    """Yields ``(path, [(class name, score), ...], None)`` per video as it is done, or
    ``(path, None, error)`` for one that fails. Scores: softmax probabilities for
    single-label tasks, per-class sigmoid probabilities for multi-label ones."""
    inference = run["inference"]
    forward = nnx.jit(lambda m, v: m(v)[0])
    for path in paths:
        try:
            clip = clip_from_file(path, inference["num_frames"], inference["crop_size"])
        except (OSError, video_lib.VideoDecodeError) as err:
            yield path, None, err
            continue
        logits = forward(model, clip[None])[0]
        probs = jax.nn.softmax(logits) if run["kind"] == "single" else jax.nn.sigmoid(logits)
        probs = np.asarray(probs)
        order = np.argsort(-probs)[:top_k]
        yield path, [(run["class_names"][i], float(probs[i])) for i in order], None


def main(argv):
    quiet_logs()
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more video files")
    model, run = load_model(Path(_WORKDIR.value), _STEP.value)
    failed = []
    for path, top, error in predict(model, run, paths, _TOP_K.value):
        if error is not None:
            failed.append(path)
            print(f"{path}: failed: {error}", file=sys.stderr, flush=True)
            continue
        print(path)
        for name, score in top:
            print(f"  {score:7.4f}  {name}")
        sys.stdout.flush()
    if failed:
        print(f"{len(failed)} of {len(paths)} videos failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
