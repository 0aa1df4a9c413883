"""COIN (paper Sec. 4.1): 180 tasks (Acc@1, Acc@5) or, with ``:step``, the 778 steps
(multi-label, mAP). The official 9030 / 2797 split; 64 frames.

Prepare the data first: ``python -m cmdcl_jax.prepare coin --manual_dir ... --data_dir data``.
"""

import ml_collections

from cmdcl_jax.run_config import base_config

TASKS = {"task": 180, "step": 778}


def get_config(task: str = "task") -> ml_collections.ConfigDict:
    if task not in TASKS:
        raise ValueError(f"configs/coin.py:{task}; expected one of {sorted(TASKS)}")
    c = base_config()
    c.dataset.name = "coin"
    c.dataset.task = task
    c.dataset.num_classes = TASKS[task]
    c.dataset.num_frames = 64
    c.checkpoint.every_steps = 2000
    c.eval.every_steps = 10000
    return c
