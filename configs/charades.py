"""Charades (paper Sec. 4.1): 157 actions, multi-label, mAP; 7985 / 1863 split.

The paper does not give Charades' frame count; we use 32 (30 s videos) as a field.
Prepare the data first: ``python -m cmdcl_jax.prepare charades --manual_dir ...
--data_dir data``.
"""

import ml_collections

from cmdcl_jax.run_config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.dataset.name = "charades"
    c.dataset.task = "action"
    c.dataset.num_classes = 157
    c.dataset.num_frames = 32
    c.checkpoint.every_steps = 2000
    c.eval.every_steps = 10000
    return c
