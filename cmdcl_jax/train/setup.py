"""What a run is built from: its task and data, model config, optimizer, state and loaders.

Files the project makes for a run are made whole: the CausalKitchen build (TFDS renames
it into place when complete; a damaged one is named and rebuilt) and the tiny CLIP
(written atomically with a manifest; a damaged one is named and rebuilt).
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from cmdcl_jax import atomic, sharding
from cmdcl_jax.data import builders, causal_kitchen, order, pipeline
from cmdcl_jax.models.cmdcl import CONFOUNDERS, TRAINABLE, CMDCLConfig, build_cmdcl
from cmdcl_jax.models.tiny_clip import write_tiny_clip
from cmdcl_jax.train import steps

BEST_METRIC = {"single": "acc1", "multi": "mAP"}  # by task kind: what picks the best checkpoint


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
        return BEST_METRIC[self.kind]


def _ensure_causal_kitchen(data_dir: str, spec: dict) -> str:
    """Builds CausalKitchen unless a whole build is there; rebuilds a damaged one."""
    name = builders.build_causal_kitchen(data_dir, **spec)
    builder = pipeline.load_builder("causal_kitchen", data_dir, name)
    try:
        for split in builder.info.splits:
            pipeline.check_split(builder, split)
    except OSError as err:
        logging.warning("%s; building CausalKitchen again", err)
        shutil.rmtree(builder.data_path)
        builders.build_causal_kitchen(data_dir, **spec)
    return name


def prepare_task(config: ml_collections.ConfigDict) -> Task:
    """Resolves the dataset (building CausalKitchen on first use) and checks its classes."""
    d = config.dataset
    data_config = d.config or None
    if d.name == "causal_kitchen":
        spec = d.kitchen.to_dict()
        if jax.process_index() == 0:
            _ensure_causal_kitchen(d.data_dir, spec)
        multihost_utils.sync_global_devices("causal_kitchen built")
        data_config = builders.kitchen_config(causal_kitchen.KitchenSpec(**spec)).name
    names = pipeline.class_names(d.name, d.task, d.data_dir, data_config)
    if d.num_classes not in (-1, len(names)):
        raise ValueError(
            f"config.dataset.num_classes={d.num_classes} but {d.name}/{d.task} in "
            f"{d.data_dir} has {len(names)} classes"
        )
    return Task(d.name, d.task, pipeline.task_type(d.name, d.task), tuple(names), data_config)


def model_config(config: ml_collections.ConfigDict, workdir: Path) -> CMDCLConfig:
    """The model config: ``config.model.preset`` ("base" or "tiny") plus the fields set.

    A tiny preset with ``clip == ""`` uses ``<workdir>/tiny_clip`` (see
    :func:`ensure_tiny_clip`).
    """
    m = config.model.to_dict()
    preset = m.pop("preset")
    fields = {k: v for k, v in m.items() if v is not None}
    if preset == "tiny":
        fields["clip"] = fields.get("clip") or str(workdir.absolute() / "tiny_clip")
        return CMDCLConfig.tiny(**fields)
    if preset == "base":
        if "width" in fields:
            raise ValueError("config.model.width applies to the tiny preset only")
        return CMDCLConfig.base(**fields)
    raise ValueError(f"config.model.preset={preset!r}; expected 'base' or 'tiny'")


def ensure_tiny_clip(model_cfg: CMDCLConfig, task: Task, workdir: Path, image_size: int):
    """Writes the tiny random CLIP, its tokenizer built over the class prompts, into
    ``<workdir>/tiny_clip`` when ``model_cfg`` uses it and no whole one is there."""
    clip_dir = workdir.absolute() / "tiny_clip"
    if model_cfg.clip != str(clip_dir):
        return
    if jax.process_index() == 0:
        damage = atomic.directory_damage(clip_dir) if clip_dir.exists() else "missing"
        if damage not in (None, "missing"):
            logging.warning("%s is damaged (%s); writing it again", clip_dir, damage)
            shutil.rmtree(clip_dir)
        if damage is not None:
            texts = [model_cfg.prompt_template, *task.class_names]
            atomic.write_directory(
                clip_dir,
                lambda tmp: write_tiny_clip(
                    tmp, texts, image_size=image_size, width=model_cfg.qformer.hidden_size
                ),
            )
    multihost_utils.sync_global_devices("tiny clip written")


def steps_per_epoch(config: ml_collections.ConfigDict, task: Task) -> int:
    builder = pipeline.load_builder(task.dataset, config.dataset.data_dir, task.data_config)
    n = builder.info.splits[config.dataset.train_split].num_examples
    return order.batches_per_epoch(n, config.train.batch_size)


def total_steps(config: ml_collections.ConfigDict, task: Task) -> int:
    """``train.num_steps`` when set (> 0), else ``train.num_epochs`` epochs."""
    if config.train.num_steps > 0:
        return config.train.num_steps
    return config.train.num_epochs * steps_per_epoch(config, task)


def make_optimizer(t: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """Adam on a cosine schedule peaking at ``t.learning_rate`` (after optional warm-up),
    with global-norm gradient clipping (``t.grad_clip`` > 0)."""
    return _optimizer(t.learning_rate, t.warmup_steps, t.grad_clip, t.adam_b1, t.adam_b2, num_steps)


@functools.cache  # one object per setting: the compiled train step (static in it) is reused
def _optimizer(learning_rate, warmup_steps, grad_clip, b1, b2, num_steps):
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else learning_rate,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(num_steps, warmup_steps + 1),
        end_value=0.0,
    )
    parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
    return optax.chain(*parts, optax.adam(schedule, b1=b1, b2=b2))


@dataclasses.dataclass
class Run:
    """A built run: the model split into trainable state and frozen rest, on a mesh."""

    task: Task
    graphdef: Any
    # {"step", "params" (trainable), "opt_state", "confounders" (TCI's dictionary, updated
    # by the train step; empty without one)}, sharded on mesh
    state: dict
    frozen: Any  # the frozen CLIP, sharded like the parameters or replicated
    mesh: Any
    tx: optax.GradientTransformation
    num_steps: int


def build_run(config: ml_collections.ConfigDict, task: Task, model_cfg: CMDCLConfig) -> Run:
    """Builds the model, its optimizer state and the mesh they are placed on: parameters
    and optimizer state sharded over ``config.mesh`` (see :mod:`cmdcl_jax.sharding`), the
    frozen CLIP too unless ``config.mesh.shard_frozen`` is False."""
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
    min_size = config.mesh.fsdp_min_size

    def place_frozen(shape: tuple[int, ...]) -> jax.sharding.Sharding:
        if config.mesh.shard_frozen:
            return sharding.param_sharding(shape, mesh, min_size)
        return sharding.replicated(mesh)

    # CLIP is read straight onto its placement; the rest of the frozen state is put there.
    model = build_cmdcl(model_cfg, task.class_names, seed=config.seed, place_clip=place_frozen)
    graphdef, params, confounders, frozen = nnx.split(model, TRAINABLE, CONFOUNDERS, ...)
    frozen = jax.device_put(frozen, jax.tree.map(lambda x: place_frozen(x.shape), frozen))
    num_steps = total_steps(config, task)
    tx = make_optimizer(config.train, num_steps)
    state = steps.initial_state(params, confounders, tx)
    state = jax.device_put(state, sharding.tree_shardings(state, mesh, min_size))
    return Run(task, graphdef, state, frozen, mesh, tx, num_steps)


def make_loader(
    config, task: Task, *, split: str, training: bool, seed: int = 0, start_step: int = 0
):
    """The training loader (shuffled, augmented, endless, from global batch ``start_step``)
    or one pass of evaluation."""
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
            d.name,
            d.data_dir,
            seed=seed,
            start_step=start_step,
            scale=tuple(d.crop_area),
            fixed_view=config.train.clip_cache,
            **common,
        )
    return pipeline.make_eval_loader(
        d.name,
        d.data_dir,
        num_clips=config.eval.num_clips,
        num_crops=config.eval.num_crops,
        **common,
    )
