"""``<workdir>/metrics.jsonl`` and ``<workdir>/tensorboard/``: what a run measured.

One JSON line ``{"step", "split", **values}`` per log interval (split ``train``), per
evaluation (the eval split's name) and per ``--mode=eval`` result (``eval_<split>``).
A run resumed from step S first drops the training lines after S (the resumed run
writes them again) and any line cut short by a crash, so no step appears twice;
TensorBoard is told to purge its events after S.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from absl import logging

from cmdcl_jax import atomic


def _parse(line: str) -> dict | None:
    """A line's JSON object; None for a line that is not one (cut short by a crash)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _from_training(line: dict) -> bool:
    return not str(line.get("split", "")).startswith("eval_")


def truncate_after(file: Path, step: int) -> None:
    """Drops the lines a run resumed from ``step`` writes again, and damaged ones."""
    if not file.exists():
        return
    text = file.read_text().splitlines()
    kept = [
        raw
        for raw, line in ((raw, _parse(raw)) for raw in text)
        if line is not None and not (_from_training(line) and line.get("step", 0) > step)
    ]
    if len(kept) != len(text):
        logging.info("%s: dropped %d lines after step %d", file, len(text) - len(kept), step)
        atomic.write_text(file, "".join(f"{x}\n" for x in kept))


def read_lines(file: Path) -> list[dict]:
    """The file's lines as dicts, in order, less any cut short by a crash; [] if none."""
    if not file.exists():
        return []
    return [line for line in map(_parse, file.read_text().splitlines()) if line is not None]


def scores(file: Path, split: str, metric: str) -> dict[int, float]:
    """``{step: metric}`` of the training run's evaluations of ``split`` (the last per step)."""
    return {
        int(line["step"]): float(line[metric])
        for line in read_lines(file)
        if line.get("split") == split and metric in line
    }


def evaluation_at(file: Path, step: int, metric: str) -> dict[str, dict]:
    """``{split: values}`` of the training run's evaluations at ``step`` (lines holding
    ``metric``, which tells an evaluation of the training split from a loss line)."""
    return {
        line["split"]: {k: v for k, v in line.items() if k not in ("step", "split")}
        for line in map(_parse, file.read_text().splitlines())
        if line is not None and line.get("step") == step and metric in line and _from_training(line)
    }


class Writer:
    """Process 0's metrics: one JSON line each in ``metrics.jsonl`` and TensorBoard.

    ``resume_step``: the step a training run resumes from (see :func:`truncate_after`).
    """

    def __init__(self, workdir: Path, *, active: bool, resume_step: int | None = None):
        self.active = active
        if self.active:
            from tensorboardX import SummaryWriter

            file = workdir / "metrics.jsonl"
            if resume_step is not None:
                truncate_after(file, resume_step)
            self.file = open(file, "a")  # noqa: SIM115 - closed in close()
            purge = resume_step + 1 if resume_step else None
            self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge)

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        if not self.active:
            return
        self.file.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        self.file.flush()
        for k, v in values.items():
            self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        if self.active:
            self.file.close()
            self.tb.close()
