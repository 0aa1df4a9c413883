"""The two entry points: :func:`train_and_evaluate` and :func:`evaluate_checkpoint`.

Training checks the config and the data before building anything, holds the workdir
lock, resumes from the newest readable checkpoint, saves before it evaluates (so a
failing evaluation never costs the checkpoint) and stops on a non-finite loss before a
save could overwrite the last good checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cmdcl_jax import sharding
from cmdcl_jax.train import metrics_log, run_record, setup, validation
from cmdcl_jax.train.checkpoints import Checkpoints
from cmdcl_jax.train.clip_cache import clip_features
from cmdcl_jax.train.evaluation import evaluate_splits
from cmdcl_jax.train.lock import hold_workdir
from cmdcl_jax.train.steps import BoundTrainStep


def _prepare(config: ml_collections.ConfigDict, workdir: Path, *, training: bool):
    """(task, model config), once the data is checked."""
    task = setup.prepare_task(config)
    validation.check_data(config, task, training=training)
    return task, setup.model_config(config, workdir)


def _logged_scores(workdir: Path, config, task: setup.Task, steps: list[int]) -> dict:
    """``{step: best-checkpoint metric}`` of the checkpoints ``steps`` as process 0's
    ``metrics.jsonl`` records them, the same on every process."""
    logged = {}
    if jax.process_index() == 0:
        file = workdir / "metrics.jsonl"
        logged = metrics_log.scores(file, config.dataset.eval_splits[0], task.best_metric)
    values = np.array([logged.get(s, np.nan) for s in steps], np.float64)
    values = multihost_utils.broadcast_one_to_all(values)
    return {s: float(v) for s, v in zip(steps, values, strict=True) if not np.isnan(v)}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, *, allow_config_change: bool = False
) -> dict:
    """Trains (resuming from the newest readable checkpoint in ``workdir``), saves,
    evaluates.

    Args:
      config: the run config (``configs/common.py`` lists its fields).
      workdir: checkpoints, ``run.json``, logs.
      allow_config_change: resume although fields outside ``run_record.RESUMABLE``
        changed since the workdir's run began (they are listed in ``run.json``).

    Returns:
      The final evaluation: ``{split: {metric: value}}``.
    """
    workdir = Path(workdir)
    validation.check_config(config, jax.process_count())
    with hold_workdir(workdir):
        task, model_cfg = _prepare(config, workdir, training=True)
        c = config.checkpoint
        checkpoints = Checkpoints(workdir, keep=c.keep, async_save=c.async_save)
        record = run_record.reconcile(
            workdir,
            run_record.make_record(config, task, model_cfg, workdir),
            latest_step=checkpoints.latest_step(),
            allow_config_change=allow_config_change,
            recover=checkpoints.run_record,
            write=jax.process_index() == 0,
        )
        setup.ensure_tiny_clip(model_cfg, task, workdir, config.dataset.crop_size)
        run = setup.build_run(config, task, model_cfg)
        if checkpoints.latest_step() is not None:
            run.state, step = checkpoints.restore(run.state)
            logging.info("Resumed from step %d in %s", step, workdir)
        train_iter = setup.make_loader(
            config,
            task,
            split=config.dataset.train_split,
            training=True,
            seed=config.seed,
            start_step=int(run.state["step"]),
        )
        steps = list(checkpoints.manager.all_steps())
        checkpoints.scores = _logged_scores(workdir, config, task, steps)
        cache = clip_features(config, run) if config.train.clip_cache else None
        return _train_loop(config, workdir, run, checkpoints, train_iter, record, cache)


def _train_loop(
    config,
    workdir: Path,
    run: setup.Run,
    checkpoints: Checkpoints,
    train_iter,
    record: dict,
    clip_cache: np.ndarray | None,
) -> dict:
    """Steps to ``run.num_steps``, saving, evaluating and logging; ``clip_cache``: V_P
    [N, L, D] of the training split by example index (``config.train.clip_cache``)."""
    from tqdm import tqdm

    step = int(run.state["step"])
    writer = metrics_log.Writer(workdir, active=jax.process_index() == 0, resume_step=step)
    base_key = jax.random.key(config.seed)
    pending: list[tuple[int, dict]] = []  # device metrics not yet checked for NaN
    bar = tqdm(
        total=run.num_steps,
        initial=step,
        disable=jax.process_index() != 0,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    tick, tick_step = time.time(), step
    first_split = config.dataset.eval_splits[0]
    train_step = BoundTrainStep(
        run.state,
        run.frozen,
        graphdef=run.graphdef,
        tx=run.tx,
        kind=run.task.kind,
        accum_steps=config.train.accum_steps,
        mesh=run.mesh,
        fsdp_min_size=config.mesh.fsdp_min_size,
    )

    def flush() -> None:
        """Fetches pending metrics, stops on a non-finite loss, logs the mean."""
        nonlocal tick, tick_step
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched, strict=True):
            if not all(math.isfinite(float(v)) for v in m.values()):
                raise FloatingPointError(
                    f"non-finite training loss or gradient at step {s} ({m}); the last "
                    f"checkpoint in {workdir / 'checkpoints'} is the last good one"
                )
        mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        rate = (step - tick_step) / max(time.time() - tick, 1e-9)
        writer.write(step, "train", {**mean, "steps_per_sec": rate})
        bar.set_postfix(loss=f"{mean['loss']:.4f}")
        pending.clear()
        tick, tick_step = time.time(), step

    def evaluate_and_log() -> dict:
        results = evaluate_splits(config, run)
        for split, values in results.items():
            writer.write(step, split, values)
            logging.info("step %d %s: %s", step, split, values)
        checkpoints.scores[step] = results[first_split][run.task.best_metric]
        return results

    results: dict = {}
    leaves = train_step.leaves(run.state)  # run.state is rebuilt from them to save or evaluate
    try:
        while step < run.num_steps:
            batch = next(train_iter)
            fields = {"video": batch["video"], "label": batch["label"]}
            if clip_cache is not None:
                fields["frames_clip"] = clip_cache[batch["index"]]  # [B_local, L, D]
            placed = sharding.place_batch(fields, run.mesh)
            leaves, m = train_step(leaves, placed, base_key)
            step += 1
            bar.update(1)
            pending.append((step, m))
            last = step == run.num_steps
            save = last or step % config.checkpoint.every_steps == 0
            evaluate = last or (config.eval.every_steps > 0 and step % config.eval.every_steps == 0)
            if save or evaluate:
                run.state = train_step.state(leaves)
            if step % config.log_every == 0 or last:
                flush()
            if save:
                flush()  # never save after a non-finite step
                checkpoints.save(step, run.state, record)
            if evaluate:
                results = evaluate_and_log()
        if not results:  # the run was already complete: report its evaluation again
            if step in checkpoints.scores:
                results = evaluate_splits(config, run)
            else:  # the final evaluation was cut short
                results = evaluate_and_log()
        checkpoints.prune()
    finally:
        bar.close()
        checkpoints.manager.wait_until_finished()
        writer.close()
    return results


def _record_evaluation(workdir: Path, step: int, results: dict) -> None:
    """Appends ``--mode=eval`` results to the logs; a workdir that cannot be written to
    only gets a warning (the results are returned all the same)."""
    try:
        writer = metrics_log.Writer(workdir, active=jax.process_index() == 0)
        try:
            for split, values in results.items():
                writer.write(step, f"eval_{split}", values)
        finally:
            writer.close()
    except OSError as err:
        logging.warning("%s: evaluation not recorded (%s)", workdir, err)


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str | Path, step: int | None = None
) -> dict:
    """Evaluates the newest readable (or the given) checkpoint of ``workdir`` on the eval
    splits, writing nothing to the workdir but the results' log lines."""
    workdir = Path(workdir)
    validation.check_config(config, jax.process_count())
    task, model_cfg = _prepare(config, workdir, training=False)
    checkpoints = Checkpoints(workdir, read_only=True)
    previous = run_record.load_trained(workdir, checkpoints.run_record)
    record = run_record.make_record(config, task, model_cfg, workdir)
    run_record.check_identity(workdir, record, previous)
    setup.ensure_tiny_clip(model_cfg, task, workdir, config.dataset.crop_size)
    run = setup.build_run(config, task, model_cfg)
    trained = {k: run.state[k] for k in ("params", "confounders")}
    restored, step = checkpoints.restore(trained, step=step)
    run.state = {**run.state, **restored}
    results = evaluate_splits(config, run)
    _record_evaluation(workdir, step, results)
    return results
