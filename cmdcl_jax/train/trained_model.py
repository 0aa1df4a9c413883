"""A trained run's model, restored from its workdir with the checks of a resumed run."""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from cmdcl_jax.models.cmdcl import CONFOUNDERS, TRAINABLE, build_cmdcl
from cmdcl_jax.train import run_record
from cmdcl_jax.train.checkpoints import Checkpoints


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
