"""Breakfast (paper Sec. 4.1): 10 activities (Acc@1) or, with ``:actions``, the 48 unit
actions (multi-label, mAP). Participants P03-P46 train, P47-P54 test; 64 frames.

Prepare the data first: ``python -m cmdcl_jax.prepare breakfast --manual_dir ...
--data_dir data``.
"""

import ml_collections

from cmdcl_jax.run_config import base_config

TASKS = {"activity": 10, "actions": 48}


def get_config(task: str = "activity") -> ml_collections.ConfigDict:
    if task not in TASKS:
        raise ValueError(f"configs/breakfast.py:{task}; expected one of {sorted(TASKS)}")
    c = base_config()
    c.dataset.name = "breakfast"
    c.dataset.task = task
    c.dataset.num_classes = TASKS[task]
    c.dataset.num_frames = 64
    c.checkpoint.every_steps = 500
    c.eval.every_steps = 2000
    return c
