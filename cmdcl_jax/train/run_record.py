"""``<workdir>/run.json``: the whole config of the run that owns the workdir's checkpoints.

Training writes it (atomically) on first use and a copy into every checkpoint. A resumed
run must have the same config, or stops naming the fields that changed unless told to
accept them (``--allow_config_change``); the changes it accepts are listed in
``config_changes``. ``--mode=eval`` and ``cmdcl_jax.predict`` need only the model and the
classes to match. A missing or damaged ``run.json`` is named and rewritten from the newest
checkpoint's copy (or from the config when there is no checkpoint yet); a damaged one is
kept as ``run.json.damaged``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import ml_collections
from absl import logging

from cmdcl_jax import atomic
from cmdcl_jax.models.cmdcl import CMDCLConfig

# Fields that a resumed run may change freely: how the same computation is run or logged,
# not what it computes (compute dtype, remat, attention implementation, evaluation batch,
# workers, intervals, mesh).
RESUMABLE = frozenset(
    {
        "config.model.dtype",
        "config.model.remat",
        "config.model.attention",
        "model.dtype",
        "model.remat",
        "model.attention",
        "config.eval.batch_size",
        "config.eval.every_steps",
        "config.dataset.num_workers",
        "config.log_every",
        "config.checkpoint.every_steps",
        "config.checkpoint.keep",
        "config.checkpoint.async_save",
        "config.mesh.data",
        "config.mesh.fsdp",
        "config.mesh.fsdp_min_size",
        "config.mesh.shard_frozen",
    }
)
COMPARED = ("config", "kind", "class_names", "model")  # the rest is derived from these
# What evaluating or predicting with a checkpoint needs to match.
IDENTITY = ("config.dataset.name", "config.dataset.task", "kind", "class_names", "model.")
REQUIRED = ("dataset", "task", "kind", "class_names", "model", "inference", "config")


class RunRecordError(ValueError):
    """``run.json`` is damaged, or describes another run than this config."""


def make_record(
    config: ml_collections.ConfigDict, task, model_cfg: CMDCLConfig, workdir: Path
) -> dict:
    """``run.json``'s content for a run of ``config`` on ``task`` with ``model_cfg``; a
    CLIP inside ``workdir`` (the tiny one) is recorded relative to it, so that a moved
    workdir is the same run."""
    d = config.dataset
    model = dataclasses.asdict(model_cfg)
    inside = workdir.absolute()
    if Path(model["clip"]).is_relative_to(inside):
        model["clip"] = Path(model["clip"]).relative_to(inside).as_posix()
    record = {
        "dataset": task.dataset,
        "task": task.task,
        "kind": task.kind,
        "class_names": list(task.class_names),
        "data_config": task.data_config,
        "model": model,
        "inference": {"num_frames": d.num_frames, "crop_size": d.crop_size},
        "config": config.to_dict(),
        "config_changes": [],  # [{"step", "time", "changes": {field: [old, new]}}]
    }
    return json.loads(json.dumps(record))  # as read back: tuples become lists


def model_config(record: dict, workdir: Path) -> CMDCLConfig:
    """The model config a record describes, its CLIP found in ``workdir`` when there."""
    fields = dict(record["model"])
    if (workdir / fields["clip"]).is_dir():
        fields["clip"] = str(workdir.absolute() / fields["clip"])
    return CMDCLConfig.from_dict(fields)


def read(workdir: Path) -> dict:
    """The workdir's ``run.json``.

    Raises:
      FileNotFoundError: there is none.
      RunRecordError: it is damaged (not JSON, or a key missing), naming the file.
    """
    file = workdir / "run.json"
    text = file.read_text()
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise RunRecordError(f"{file}: damaged, not JSON ({len(text)} bytes: {err})") from None
    missing = [k for k in REQUIRED if not isinstance(record, dict) or k not in record]
    if missing:
        raise RunRecordError(f"{file}: damaged, no {', '.join(missing)}")
    return record


def _flat(record: dict) -> dict:
    out = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            out[prefix] = value

    for key in COMPARED:
        walk(key, record.get(key))
    return out


def changes(old: dict, new: dict) -> dict[str, tuple]:
    """``{field: (old value, new value)}`` for every compared field that differs."""
    a, b = _flat(old), _flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def _listing(diff: dict[str, tuple]) -> str:
    return "".join(
        f"\n  {k}: {json.dumps(old)} -> {json.dumps(new)}" for k, (old, new) in diff.items()
    )


def load(workdir: Path, recover: Callable[[], dict | None]) -> tuple[dict | None, str | None]:
    """(the workdir's record or None; why ``run.json`` itself could not be used, or None).

    A missing or damaged ``run.json`` is replaced by ``recover()``: the newest checkpoint's
    copy, None where no checkpoint has one.
    """
    try:
        return read(workdir), None
    except FileNotFoundError:
        problem = f"{workdir / 'run.json'}: missing"
    except RunRecordError as err:
        problem = str(err)
    return recover(), problem


def load_trained(workdir: Path, recover: Callable[[], dict | None]) -> dict:
    """The record of a trained workdir, for evaluation and prediction: :func:`load`, with a
    warning when it comes from the checkpoint's copy.

    Raises:
      RunRecordError: ``run.json`` is missing, or damaged with no copy.
    """
    record, damage = load(workdir, recover)
    if record is None:
        raise RunRecordError(
            damage or f"{workdir / 'run.json'}: missing; is {workdir} a training workdir?"
        )
    if damage is not None:
        logging.warning("%s; using the newest checkpoint's copy", damage)
    return record


def check_identity(workdir: Path, record: dict, previous: dict) -> None:
    """Refuses a workdir whose run has another model or classes (evaluation, prediction)."""
    diff = {k: v for k, v in changes(previous, record).items() if k.startswith(IDENTITY)}
    for key in ("model.dtype", "model.remat", "model.attention"):
        diff.pop(key, None)
    if diff:
        raise RunRecordError(
            f"{workdir / 'run.json'}: {workdir} holds a run of another model or task; these "
            f"fields differ:{_listing(diff)}"
        )


def reconcile(
    workdir: Path,
    record: dict,
    *,
    latest_step: int | None,
    allow_config_change: bool,
    recover: Callable[[], dict | None],
    write: bool = True,
) -> dict:
    """Training's check of ``run.json`` against this run's ``record``, then its (re)write
    (by the process with ``write``). Returns the record as written.

    Raises:
      RunRecordError: fields outside :data:`RESUMABLE` that the recorded run had changed
        and ``allow_config_change`` is False (listing them); or ``run.json`` is missing or
        damaged in a workdir with checkpoints and no copy.
    """
    file = workdir / "run.json"
    previous, problem = load(workdir, recover)
    if previous is None and latest_step is not None:
        raise RunRecordError(
            f"{problem}; no checkpoint holds a copy, so the config of the checkpoints in "
            f"{workdir / 'checkpoints'} is unknown: restore the file or use a new --workdir"
        )
    diff = changes(previous, record) if previous is not None else {}
    # Fields the code gained after the checkpoints were written: the run did not have them,
    # so they take this config's values. One that changes the model's arrays (a TCI
    # dictionary, say) still fails the checkpoint's restore, which checks every array.
    recorded = _flat(previous) if previous is not None else {}
    added = {k: v for k, v in diff.items() if k not in recorded}
    blocking = {k: v for k, v in diff.items() if k not in RESUMABLE and k not in added}
    if added:
        logging.warning("%s: fields added since this run was recorded:%s", file, _listing(added))
    if blocking and not allow_config_change:
        raise RunRecordError(
            f"{file}: this config differs from the one that trained the checkpoints in "
            f"{workdir}:{_listing(blocking)}\nPass --allow_config_change to resume with these "
            "changes, or use a new --workdir"
        )
    if problem is not None and (previous is not None or file.exists()):
        kept = f"kept as {file.name}.damaged, " if file.exists() else ""
        source = "the newest checkpoint's copy" if previous else "this config (no checkpoint)"
        logging.warning("%s; %srewritten from %s", problem, kept, source)
        if write and file.exists():
            file.replace(file.with_name(f"{file.name}.damaged"))
    history = previous.get("config_changes", []) if previous is not None else []
    if blocking:
        logging.warning("%s: resuming with changed config:%s", file, _listing(blocking))
        entry = {"step": latest_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        history = [*history, {**entry, "changes": {k: list(v) for k, v in blocking.items()}}]
    record = {**record, "config_changes": history}
    if write and (previous is None or diff or problem is not None):
        atomic.write_text(file, json.dumps(record, indent=2))
    return record
