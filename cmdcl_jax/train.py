"""Training and evaluation of CMDCL: :func:`train_and_evaluate` behind ``cmdcl_jax.main``.

One ``jax.jit``-compiled step over a ``(data, fsdp)`` mesh, trainable state donated;
CLIP frozen (no gradient, no optimizer state); uint8 batches placed with
``jax.make_array_from_process_local_data``; Orbax checkpoints holding the model, the
optimizer and every process's grain iterator state; JSON-lines and TensorBoard logs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from cmdcl_jax import metrics as metrics_lib
from cmdcl_jax import sharding
from cmdcl_jax.data import builders, causal_kitchen, pipeline
from cmdcl_jax.models.cmdcl import TRAINABLE, CMDCLConfig, build_cmdcl
from cmdcl_jax.models.tiny_clip import write_tiny_clip


@dataclasses.dataclass(frozen=True)
class Task:
    """What the run classifies: dataset, task, its kind and class names."""

    dataset: str
    task: str
    kind: str  # "single" (softmax, accuracy) or "multi" (sigmoid, mAP)
    class_names: tuple[str, ...]
    data_config: str | None

    @property
    def best_metric(self) -> str:
        return "acc1" if self.kind == "single" else "mAP"


# ----------------------------------------------------------------------------- set-up


def prepare_task(config: ml_collections.ConfigDict) -> Task:
    """Resolves the dataset (building CausalKitchen on first use) and checks its classes."""
    d = config.dataset
    data_config = d.config or None
    if d.name == "causal_kitchen":
        spec = d.kitchen.to_dict()
        if jax.process_index() == 0:
            builders.build_causal_kitchen(d.data_dir, **spec)
        multihost_utils.sync_global_devices("causal_kitchen built")
        data_config = builders.kitchen_config(causal_kitchen.KitchenSpec(**spec)).name
    names = pipeline.class_names(d.name, d.task, d.data_dir, data_config)
    if d.num_classes not in (-1, len(names)):
        raise ValueError(
            f"config.dataset.num_classes={d.num_classes} but {d.name}/{d.task} in "
            f"{d.data_dir} has {len(names)} classes"
        )
    return Task(d.name, d.task, pipeline.task_type(d.name, d.task), tuple(names), data_config)


def model_config(config: ml_collections.ConfigDict, task: Task, workdir: Path) -> CMDCLConfig:
    """The model config: ``config.model.preset`` ("base" or "tiny") plus the fields set.

    A tiny preset with ``clip == ""`` writes a tiny random CLIP, its tokenizer built over
    the class prompts, into ``<workdir>/tiny_clip`` (once) and uses it.
    """
    m = config.model.to_dict()
    preset, width = m.pop("preset"), m.pop("width")
    fields = {k: v for k, v in m.items() if v is not None}
    if preset == "tiny":
        width = 32 if width is None else width
        fields["width"] = width
        if not fields.get("clip"):
            clip_dir = workdir.absolute() / "tiny_clip"
            template = fields.get("prompt_template", CMDCLConfig.tiny(clip="").prompt_template)
            if jax.process_index() == 0 and not (clip_dir / "model.safetensors").exists():
                write_tiny_clip(
                    clip_dir,
                    [template, *task.class_names],
                    image_size=config.dataset.crop_size,
                    width=width,
                )
            multihost_utils.sync_global_devices("tiny clip written")
            fields["clip"] = str(clip_dir)
        return CMDCLConfig.tiny(**fields)
    if preset == "base":
        if width is not None:
            raise ValueError("config.model.width applies to the tiny preset only")
        return CMDCLConfig.base(**fields)
    raise ValueError(f"config.model.preset={preset!r}; expected 'base' or 'tiny'")


def steps_per_epoch(config: ml_collections.ConfigDict, task: Task) -> int:
    builder = pipeline.load_builder(task.dataset, config.dataset.data_dir, task.data_config)
    n = builder.info.splits[config.dataset.train_split].num_examples
    return max(1, n // config.train.batch_size)


def total_steps(config: ml_collections.ConfigDict, task: Task) -> int:
    """``train.num_steps`` when set (> 0), else ``train.num_epochs`` epochs."""
    if config.train.num_steps > 0:
        return config.train.num_steps
    return config.train.num_epochs * steps_per_epoch(config, task)


def make_optimizer(t: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """Adam on a cosine schedule peaking at ``t.learning_rate`` (after optional warm-up),
    with global-norm gradient clipping (``t.grad_clip`` > 0)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if t.warmup_steps else t.learning_rate,
        peak_value=t.learning_rate,
        warmup_steps=t.warmup_steps,
        decay_steps=max(num_steps, t.warmup_steps + 1),
        end_value=0.0,
    )
    parts = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
    return optax.chain(*parts, optax.adam(schedule, b1=t.adam_b1, b2=t.adam_b2))


# ----------------------------------------------------------------------------- steps


def loss_fn(logits: jax.Array, labels: jax.Array, kind: str) -> jax.Array:
    """Softmax cross-entropy (labels int [B]) or sigmoid BCE (labels multi-hot [B, C])."""
    if kind == "single":
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)).mean()


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "tx", "kind", "accum_steps"),
    donate_argnames=("state",),
)
def train_step(state, frozen, batch, base_key, *, graphdef, tx, kind, accum_steps):
    """One optimizer step on a global batch, split in ``accum_steps`` micro-batches.

    Args:
      state: ``{"step", "params", "opt_state"}``; params are the trainable state.
      frozen: the rest of the model (CLIP).
      batch: ``video`` uint8 [B, L, H, W, 3] and ``label``.
      base_key: the run's key; the step's dropout key is ``fold_in(base_key, step)``.

    Returns:
      (new state, ``{"loss", "grad_norm"}``).
    """
    key = jax.random.fold_in(base_key, state["step"])

    def micro_loss(params, micro, micro_key):
        model = nnx.merge(graphdef, params, frozen)
        logits, _ = model(micro["video"], deterministic=False, rngs=nnx.Rngs(dropout=micro_key))
        return loss_fn(logits, micro["label"], kind)

    grad_fn = jax.value_and_grad(micro_loss)
    if accum_steps == 1:
        loss, grads = grad_fn(state["params"], batch, key)
    else:
        micro = jax.tree.map(
            lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch
        )

        def body(carry, xs):
            i, mb = xs
            loss, grads = grad_fn(state["params"], mb, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
        (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
        loss, grads = jax.tree.map(lambda x: x / accum_steps, (loss, grads))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state}
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def eval_step(params, frozen, video, *, graphdef):
    """Logits [B, C]; multi-view video [B, V, L, H, W, 3] averages the V views' logits."""
    model = nnx.merge(graphdef, params, frozen)
    if video.ndim == 6:
        b, v = video.shape[:2]
        logits, _ = model(video.reshape(b * v, *video.shape[2:]))
        return logits.reshape(b, v, -1).mean(axis=1)
    return model(video)[0]


def evaluate(
    params,
    frozen,
    graphdef,
    loader,
    mesh,
    task: Task,
    num_examples: int,
    shortcut_labels: np.ndarray | None = None,
) -> dict:
    """Scores a whole split, gathered from every process, each example counted once.

    Single-label tasks report top-1/top-5 accuracy and how many distinct classes are
    predicted (a collapsed model predicts few), and, given ``shortcut_labels`` (int
    [num_examples], by example index), the shortcut rate; multi-label tasks report mAP.
    """
    logits, labels, indices = [], [], []
    for batch in loader:
        placed = sharding.place_batch(batch, mesh)
        out = eval_step(params, frozen, placed["video"], graphdef=graphdef)
        got = multihost_utils.process_allgather(
            {
                "logits": out,
                "label": placed["label"],
                "mask": placed["mask"],
                "index": placed["index"],
            },
            tiled=True,
        )
        keep = np.asarray(got["mask"], bool)
        logits.append(np.asarray(got["logits"], np.float64)[keep])
        labels.append(np.asarray(got["label"])[keep])
        indices.append(np.asarray(got["index"])[keep])
    index = np.concatenate(indices)
    if len(index) != num_examples or len(np.unique(index)) != num_examples:
        raise RuntimeError(
            f"evaluation saw {len(index)} entries ({len(np.unique(index))} distinct) for a "
            f"split of {num_examples} examples"
        )
    scores, label = np.concatenate(logits), np.concatenate(labels)
    if task.kind == "single":
        k5 = min(5, scores.shape[1])
        result = {
            "acc1": metrics_lib.top_k_accuracy(scores, label, 1),
            f"acc{k5}": metrics_lib.top_k_accuracy(scores, label, k5),
            "predicted_classes": len(np.unique(scores.argmax(axis=1))),
            "num_examples": num_examples,
        }
        if shortcut_labels is not None:
            result["shortcut_rate"] = metrics_lib.shortcut_rate(scores, shortcut_labels[index])
        return result
    ap = metrics_lib.average_precision_per_class(scores, label)
    return {
        "mAP": metrics_lib.mean_average_precision(scores, label),
        "mAP_zero": metrics_lib.mean_average_precision(scores, label, no_positive="zero"),
        "classes_without_positive": int(np.isnan(ap).sum()),
        "num_examples": num_examples,
    }


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: Path, config: ml_collections.ConfigDict, task: Task):
    """Keeps the last ``checkpoint.keep`` plus the best by the task's metric."""
    c = config.checkpoint
    policy = ocp.checkpoint_managers.AnyPreservationPolicy(
        [
            ocp.checkpoint_managers.LatestN(n=c.keep),
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: m[task.best_metric], reverse=False, n=1
            ),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        enable_async_checkpointing=c.async_save,
        cleanup_tmp_directories=True,
    )
    handlers = {
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
    }
    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(), item_handlers=handlers, options=options
    )


def check_run_identity(workdir: Path, identity: dict, inference: dict) -> None:
    """Refuses a workdir whose checkpoints belong to another model or task.

    Writes ``run.json`` (identity plus what ``cmdcl_jax.predict`` needs) on first use.
    """
    file = workdir / "run.json"
    if file.exists():
        previous = json.loads(file.read_text())
        diff = sorted(k for k in identity if previous.get(k) != identity[k])
        if diff:
            raise ValueError(
                f"{workdir} holds a run of another model or task ({file}: {', '.join(diff)} "
                "differ); use a new --workdir"
            )
    elif jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps({**identity, "inference": inference}, indent=2))


def run_identity(task: Task, model_cfg: CMDCLConfig) -> dict:
    """What must match for a checkpoint to be resumed: model, classes, task."""
    model = dataclasses.asdict(model_cfg)
    model.pop("dtype"), model.pop("remat")  # may change between runs of one model
    identity = {
        "dataset": task.dataset,
        "task": task.task,
        "kind": task.kind,
        "class_names": list(task.class_names),
        "model": model,
    }
    return json.loads(json.dumps(identity))  # as run.json reads back (tuples -> lists)


def inference_settings(config: ml_collections.ConfigDict) -> dict:
    """Frame sampling of the evaluation, for ``cmdcl_jax.predict``."""
    d = config.dataset
    return {"num_frames": d.num_frames, "crop_size": d.crop_size}


# ----------------------------------------------------------------------------- loop


class Writer:
    """Process 0's metrics: one JSON line each in ``metrics.jsonl`` and TensorBoard."""

    def __init__(self, workdir: Path):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter

            self.file = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
            self.tb = SummaryWriter(str(workdir / "tensorboard"))

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


@dataclasses.dataclass
class Run:
    """Everything a run holds besides its data iterator."""

    task: Task
    graphdef: Any
    state: dict  # {"step", "params" (trainable), "opt_state"}, sharded on mesh
    frozen: Any  # the frozen CLIP, replicated
    mesh: Any
    tx: optax.GradientTransformation
    num_steps: int
    manager: ocp.CheckpointManager


def setup(config: ml_collections.ConfigDict, workdir: Path) -> Run:
    """Builds task, model, optimizer state and checkpoint manager; checks the workdir."""
    task = prepare_task(config)
    model_cfg = model_config(config, task, workdir)
    check_run_identity(workdir, run_identity(task, model_cfg), inference_settings(config))
    model = build_cmdcl(model_cfg, task.class_names, seed=config.seed)
    graphdef, params, frozen = nnx.split(model, TRAINABLE, ...)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    num_steps = total_steps(config, task)
    tx = make_optimizer(config.train, num_steps)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    state = jax.device_put(state, sharding.tree_shardings(state, mesh))
    frozen = jax.device_put(frozen, sharding.tree_shardings(frozen, mesh))
    manager = checkpoint_manager(workdir, config, task)
    return Run(task, graphdef, state, frozen, mesh, tx, num_steps, manager)


def _loader(config, task: Task, *, split: str, training: bool, seed: int = 0):
    d = config.dataset
    common = dict(
        task=task.task,
        batch_size=config.train.batch_size if training else config.eval.batch_size,
        num_frames=d.num_frames,
        crop_size=d.crop_size,
        config=task.data_config,
        split=split,
        num_workers=d.num_workers,
    )
    if training:
        return pipeline.make_train_loader(
            d.name, d.data_dir, seed=seed, scale=tuple(d.crop_area), **common
        )
    return pipeline.make_eval_loader(
        d.name,
        d.data_dir,
        num_clips=config.eval.num_clips,
        num_crops=config.eval.num_crops,
        **common,
    )


def evaluate_splits(config, run: Run) -> dict[str, dict]:
    """:func:`evaluate` on every split of ``config.dataset.eval_splits``."""
    task = run.task
    builder = pipeline.load_builder(task.dataset, config.dataset.data_dir, task.data_config)
    results = {}
    for split in config.dataset.eval_splits:
        loader = _loader(config, task, split=split, training=False)
        n = builder.info.splits[split].num_examples
        kitchen = task.dataset == "causal_kitchen" and task.task == "activity"
        shortcut = (
            pipeline.split_column(
                task.dataset, config.dataset.data_dir, split, "background", task.data_config
            )
            if kitchen
            else None
        )
        results[split] = evaluate(
            run.state["params"], run.frozen, run.graphdef, loader, run.mesh, task, n, shortcut
        )
        if kitchen:
            spec = causal_kitchen.KitchenSpec(**builder.info.metadata["spec"])
            results[split]["order_blind_ceiling"] = causal_kitchen.order_blind_ceiling(spec, split)
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (resuming from the latest checkpoint in ``workdir``), evaluates, checkpoints.

    Returns:
      The final evaluation: ``{split: {metric: value}}``.
    """
    workdir = Path(workdir)
    run = setup(config, workdir)
    train_iter = _loader(
        config, run.task, split=config.dataset.train_split, training=True, seed=config.seed
    )
    if run.manager.latest_step() is not None:
        run.state, train_iter = restore(
            run.manager, run.manager.latest_step(), run.state, train_iter
        )
        logging.info("Resumed from step %d in %s", int(run.state["step"]), workdir)
    return _train_loop(config, workdir, run, train_iter)


def restore(manager, step: int, state, train_iter=None):
    """Restores ``state`` (onto its current shardings, whatever mesh wrote it) and the
    iterator. A checkpoint of another shape raises, naming the checkpoint."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    args = {"state": ocp.args.StandardRestore(abstract)}
    if train_iter is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(train_iter)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError) as err:
        raise ValueError(
            f"checkpoint {manager.directory}/{step} does not fit this model: {err}"
        ) from err
    return restored["state"], restored.get("data")


def _train_loop(config, workdir: Path, run: Run, train_iter) -> dict:
    from tqdm import tqdm

    writer = Writer(workdir)
    base_key = jax.random.key(config.seed)
    step = int(run.state["step"])
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
    results: dict = {}

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

    try:
        while step < run.num_steps:
            batch = next(train_iter)
            placed = sharding.place_batch(
                {"video": batch["video"], "label": batch["label"]}, run.mesh
            )
            run.state, m = train_step(
                run.state,
                run.frozen,
                placed,
                base_key,
                graphdef=run.graphdef,
                tx=run.tx,
                kind=run.task.kind,
                accum_steps=config.train.accum_steps,
            )
            step += 1
            bar.update(1)
            pending.append((step, m))
            last = step == run.num_steps
            if step % config.log_every == 0 or last:
                flush()
            evaluate_now = last or (
                config.eval.every_steps > 0 and step % config.eval.every_steps == 0
            )
            save_now = last or step % config.checkpoint.every_steps == 0
            metrics_now = None
            if evaluate_now:
                results = evaluate_splits(config, run)
                for split, values in results.items():
                    writer.write(step, split, values)
                    logging.info("step %d %s: %s", step, split, values)
                metrics_now = results[config.dataset.eval_splits[0]]
            if save_now:
                flush()  # never save after a non-finite step
                run.manager.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(run.state),
                        data=grain.checkpoint.CheckpointSave(train_iter),
                    ),
                    metrics=metrics_now,
                )
    finally:
        bar.close()
        run.manager.wait_until_finished()
        writer.close()
    if not results:  # the run was already complete: report its evaluation again
        results = evaluate_splits(config, run)
    return results


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str | Path, step: int | None = None
) -> dict:
    """Evaluates the latest (or the given) checkpoint of ``workdir`` on the eval splits."""
    workdir = Path(workdir)
    run = setup(config, workdir)
    step = run.manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    run.state, _ = restore(run.manager, step, run.state)
    results = evaluate_splits(config, run)
    writer = Writer(workdir)
    for split, values in results.items():
        writer.write(step, f"eval_{split}", values)
    writer.close()
    return results
