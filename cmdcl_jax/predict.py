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
from cmdcl_jax.train.trained_model import load_model

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (holds run.json).", required=True)
_TOP_K = flags.DEFINE_integer("top_k", 5, "Classes printed per video.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest readable).")


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
