"""The CLIP feature cache (``config.train.clip_cache``): the frozen CLIP's frame features
V_P of every training clip, computed once before the first step instead of in every step.

The frozen CLIP sees the same pixels at every step only when the training view is fixed,
so with the cache the training loader gives each clip its evaluation view (segment
middles, centre crop, no flip; ``pipeline.make_train_loader(fixed_view=True)``) and this
pass reads the training split in that same view: the cached V_P equals what the step
would compute. What it costs is the training augmentation (random segment offsets,
resized crops and flips) for the whole model.
"""

from __future__ import annotations

import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from cmdcl_jax import sharding
from cmdcl_jax.data import pipeline
from cmdcl_jax.train.setup import Run
from cmdcl_jax.train.steps import clip_step


def clip_features(config, run: Run) -> np.ndarray:
    """V_P of every example of ``config.dataset.train_split`` in the evaluation view, by
    example index: [N, L, D] in the CLIP's dtype, the same array in every process (each
    computes its share of the split; the shares are gathered)."""
    d, task = config.dataset, run.task
    loader = pipeline.make_eval_loader(
        d.name,
        d.data_dir,
        task=task.task,
        batch_size=config.eval.batch_size,
        num_frames=d.num_frames,
        crop_size=d.crop_size,
        config=task.data_config,
        split=d.train_split,
        num_workers=d.num_workers,
    )
    features, indices = [], []
    for batch in loader:
        placed = sharding.place_batch({k: batch[k] for k in ("video", "index", "mask")}, run.mesh)
        v_p = clip_step(
            run.state["params"],
            run.frozen,
            placed["video"],
            run.state["confounders"],
            graphdef=run.graphdef,
        )
        got = multihost_utils.process_allgather(
            {"v_p": v_p, "index": placed["index"], "mask": placed["mask"]}, tiled=True
        )
        keep = np.asarray(got["mask"], bool)
        features.append(np.asarray(got["v_p"])[keep])
        indices.append(np.asarray(got["index"])[keep])
    index = np.concatenate(indices)
    if not np.array_equal(np.sort(index), np.arange(len(index))):
        raise RuntimeError(f"CLIP cache pass saw example indices other than 0..{len(index) - 1}")
    cache = np.zeros((len(index), *features[0].shape[1:]), features[0].dtype)
    cache[index] = np.concatenate(features)
    mib = cache.nbytes / 2**20
    logging.info("CLIP feature cache: %s %s, %.1f MiB", cache.shape, cache.dtype, mib)
    return cache
