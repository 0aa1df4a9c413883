"""Checks of a run's config and data before anything is built or trained.

Everything that would otherwise fail after some steps (or only at the final evaluation)
fails first, naming the config key and value, or the split and file at fault.
"""

from __future__ import annotations

import math

import ml_collections

from cmdcl_jax.data import pipeline
from cmdcl_jax.models.cmdcl import CMDCLConfig


def _fail(key: str, value, why: str) -> None:
    raise ValueError(f"config.{key}={value!r}: {why}")


def check_config(config: ml_collections.ConfigDict, process_count: int) -> None:
    """Positive sizes and intervals, batches that divide as the steps need.

    Raises:
      ValueError: naming the first field at fault.
    """
    t, e = config.train, config.eval
    for key, value in (
        ("log_every", config.log_every),
        ("checkpoint.every_steps", config.checkpoint.every_steps),
        ("checkpoint.keep", config.checkpoint.keep),
        ("train.batch_size", t.batch_size),
        ("train.accum_steps", t.accum_steps),
        ("eval.batch_size", e.batch_size),
        ("eval.num_clips", e.num_clips),
        ("eval.num_crops", e.num_crops),
        ("dataset.num_frames", config.dataset.num_frames),
        ("dataset.crop_size", config.dataset.crop_size),
        ("mesh.fsdp_min_size", config.mesh.fsdp_min_size),
    ):
        if value < 1:
            _fail(key, value, "must be at least 1")
    if t.num_steps <= 0 and t.num_epochs < 1:
        _fail("train.num_epochs", t.num_epochs, "must be at least 1 when train.num_steps <= 0")
    if t.batch_size % t.accum_steps:
        _fail("train.batch_size", t.batch_size, f"not divisible by accum_steps={t.accum_steps}")
    for key, value in (("train.batch_size", t.batch_size), ("eval.batch_size", e.batch_size)):
        if value % process_count:
            _fail(key, value, f"not divisible by the {process_count} processes")
    m = config.model
    num_confounders = m.num_confounders or CMDCLConfig.num_confounders
    if m.tci_mode == "dictionary" and num_confounders > t.batch_size:
        _fail(
            "model.num_confounders",
            num_confounders,
            f"the dictionary is filled from one batch: at most train.batch_size={t.batch_size}",
        )
    if not config.dataset.eval_splits:
        _fail("dataset.eval_splits", config.dataset.eval_splits, "needs at least one split")


def check_data(config: ml_collections.ConfigDict, task, *, training: bool) -> None:
    """The eval splits (and with ``training`` the train split) exist, their shards are
    readable, and the train split fills a batch.

    Raises:
      ValueError: a split that does not exist (naming the splits there are), or too few
        training examples for one batch.
      OSError: an unreadable shard, naming the file.
    """
    d = config.dataset
    builder = pipeline.load_builder(task.dataset, d.data_dir, task.data_config)
    splits = (d.train_split, *d.eval_splits) if training else tuple(d.eval_splits)
    for split in splits:
        try:
            pipeline.check_split(builder, split)
        except KeyError as err:
            key = "dataset.train_split" if split == d.train_split else "dataset.eval_splits"
            raise ValueError(f"config.{key}: {err.args[0]}") from None
    n = builder.info.splits[d.train_split].num_examples if training else math.inf
    if n < config.train.batch_size:
        _fail("train.batch_size", config.train.batch_size, f"more than the {n} training examples")
