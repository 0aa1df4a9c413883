"""Orbax checkpoints of a run: saving, retention, and restoring with checks.

``<workdir>/checkpoints/<step>/`` holds ``state`` (``{"step", "params", "opt_state"}``,
the trainable parameters only) and ``run`` (a copy of ``run.json``). The data position is
the step (``pipeline.make_train_loader``'s ``start_step``), so a checkpoint holds nothing
per process and resumes on any number of processes and devices. Retention keeps exactly
the last ``keep`` steps plus the best one by the first eval split's metric; older ones are
deleted once a newer one is complete. A restore first checks that every saved array has
the path and shape the model expects (never leaving a parameter at its initialisation),
then falls back from a damaged checkpoint to the newest readable one, naming the damaged
step and file; in training the damaged step is moved to ``<workdir>/damaged_checkpoints/``."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint._src.metadata import array_metadata_store  # not exported: its Store


class CheckpointMismatchError(ValueError):
    """A checkpoint holds arrays of another model (missing, extra or other shapes)."""


class DamagedCheckpointError(RuntimeError):
    """No checkpoint could be read."""


def retained_steps(steps: list[int], keep: int, scores: dict[int, float]) -> set[int]:
    """The last ``keep`` of ``steps`` plus the best-scoring one (ties: the later step)."""
    kept = set(sorted(steps)[-keep:])
    scored = [(scores[s], s) for s in steps if s in scores and not math.isnan(scores[s])]
    if scored:
        kept.add(max(scored)[1])
    return kept


def _paths(tree) -> dict[str, tuple]:
    """``{"params/a/kernel/value": shape}`` for every array leaf of ``tree``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in leaves}


def fit_errors(saved: dict, expected: dict) -> list[str]:
    """What keeps ``saved`` (a checkpoint's array metadata) from filling ``expected``, in
    the top-level entries that ``expected`` has."""
    have = _paths({k: v for k, v in saved.items() if k in expected})
    want = _paths(expected)
    errors = [f"{p}: not in the checkpoint" for p in sorted(want.keys() - have.keys())]
    errors += [f"{p}: in the checkpoint, not in the model" for p in sorted(have.keys() - want)]
    errors += [
        f"{p}: checkpoint {have[p]} vs model {want[p]}"
        for p in sorted(want.keys() & have.keys())
        if have[p] != want[p]
    ]
    return errors


def _root_cause(err: BaseException) -> str:
    """The first line of the innermost error, without TensorStore's spec dump."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err).strip().splitlines()[0].split(" [tensorstore_spec=")[0]


def _array_handlers():
    """Orbax's default handlers, but with no replica-parallel saving of replicated arrays
    (each replica writes a slice, cut by a jitted slice per array shape and device) in a
    single process, which writes every slice itself: there it only costs compilations,
    128 at the first save of the tests' 8-device runs, ~5 s. Several processes keep
    orbax's default (on, unless ``JAX_PLATFORMS`` names a GPU)."""
    arrays = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=None if jax.process_count() > 1 else False,
        array_metadata_store=array_metadata_store.Store(),  # as orbax's default handler
    )
    return ocp.type_handlers.create_type_handler_registry(
        *(
            (t, arrays if t is jax.Array else ocp.type_handlers.get_type_handler(t))
            for t in ocp.type_handlers.supported_types()
        )
    )


class Checkpoints:
    """A workdir's checkpoints (``read_only`` for evaluation and prediction)."""

    def __init__(self, workdir: Path, *, keep: int = 1, async_save: bool = True, read_only=False):
        self.workdir = workdir.absolute()
        self.keep = keep
        self.read_only = read_only
        self.scores: dict[int, float] = {}  # step -> the best-checkpoint metric
        # Orbax's own read_only option logs a warning on every use; never saving or
        # deleting (and neither creating nor cleaning up) is the same.
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
        )
        handlers = {
            "state": ocp.PyTreeCheckpointHandler(type_handler_registry=_array_handlers()),
            "run": ocp.JsonCheckpointHandler(),
        }
        self.manager = ocp.CheckpointManager(
            self.workdir / "checkpoints", item_handlers=handlers, options=options
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, record: dict) -> None:
        """Starts writing ``step`` (asynchronously) once the previous save is complete."""
        self.prune()
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                run=ocp.args.JsonSave(record),
            ),
        )

    def prune(self) -> None:
        """Waits for the save in flight, then deletes what retention does not keep."""
        self.manager.wait_until_finished()
        steps = list(self.manager.all_steps())
        for step in sorted(set(steps) - retained_steps(steps, self.keep, self.scores)):
            self.manager.delete(step)

    def run_record(self, step: int | None = None) -> dict | None:
        """The copy of ``run.json`` in ``step``, or in the newest checkpoint that has a
        readable one; None if there is none."""
        steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
        for s in steps:
            try:
                args = ocp.args.Composite(run=ocp.args.JsonRestore())
                return self.manager.restore(s, args=args)["run"]
            except Exception as err:  # noqa: BLE001 - damaged or without a copy: try older
                logging.warning("checkpoint step %d: no readable run.json copy (%s)", s, err)
        return None

    def restore(self, target: dict, step: int | None = None):
        """Restores ``target``'s arrays (a subset of the saved state, restored onto its
        shardings, whatever mesh saved them) from ``step``, or from the newest readable
        checkpoint.

        Returns:
          (restored state, the step restored).

        Raises:
          FileNotFoundError: no checkpoint (or no checkpoint ``step``).
          CheckpointMismatchError: the checkpoint is of another model (no fallback).
          DamagedCheckpointError: ``step`` (or every checkpoint) is unreadable.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        if step not in (None, *steps):
            raise FileNotFoundError(f"no checkpoint step {step} in {self.manager.directory}")
        steps = steps if step is None else [step]
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        damaged = []
        for s in steps:
            try:
                return self._read(s, abstract), s
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001 - TensorStore's errors have no common type
                damage = f"{self.manager.directory / str(s)}: {_root_cause(err)}"
            if step is not None:
                raise DamagedCheckpointError(f"checkpoint step {s} is damaged ({damage})")
            logging.warning(
                "checkpoint step %d is damaged (%s); trying the previous one", s, damage
            )
            damaged.append(s)
            self._set_aside(s)
        raise DamagedCheckpointError(
            f"no readable checkpoint in {self.manager.directory}: steps {damaged} are damaged"
        )

    def _read(self, step: int, abstract):
        """The state of ``step``, once its arrays are checked against ``abstract``."""
        saved = self.manager.item_metadata(step)["state"]
        errors = fit_errors(getattr(saved, "tree", saved), abstract)
        if errors:
            raise CheckpointMismatchError(
                f"checkpoint {self.manager.directory / str(step)} does not fit this model "
                f"({len(errors)} arrays): " + "; ".join(errors[:10])
            )
        state = ocp.args.PyTreeRestore(
            abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        )
        return self.manager.restore(step, args=ocp.args.Composite(state=state))["state"]

    def _set_aside(self, step: int) -> None:
        """Moves a damaged step out of the way of a resumed run's saves (training only)."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            aside = self.workdir / "damaged_checkpoints" / str(step)
            while aside.exists():
                aside = aside.with_name(f"{aside.name}+")
            aside.parent.mkdir(exist_ok=True)
            shutil.move(self.manager.directory / str(step), aside)
            logging.warning("moved damaged checkpoint step %d to %s", step, aside)
        multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self.manager.reload()
