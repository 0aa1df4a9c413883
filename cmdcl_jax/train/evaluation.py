"""Evaluation of a run's parameters on whole splits, gathered from every process."""

from __future__ import annotations

import numpy as np
from jax.experimental import multihost_utils

from cmdcl_jax import metrics as metrics_lib
from cmdcl_jax import sharding
from cmdcl_jax.data import causal_kitchen, pipeline
from cmdcl_jax.train.setup import Run, Task, make_loader
from cmdcl_jax.train.steps import eval_step


def evaluate(
    params,
    frozen,
    graphdef,
    loader,
    mesh,
    task: Task,
    num_examples: int,
    shortcut_labels: np.ndarray | None = None,
    confounders=None,
) -> dict:
    """Scores a whole split, gathered from every process, each example counted once.

    Single-label tasks report top-1/top-5 accuracy and how many distinct classes are
    predicted (a collapsed model predicts few), and, given ``shortcut_labels`` (int
    [num_examples], by example index), the shortcut rate; multi-label tasks report mAP.
    ``confounders``: the state's TCI dictionary, for a model that has one.
    """
    logits, labels, indices = [], [], []
    for batch in loader:
        placed = sharding.place_batch(batch, mesh)
        out = eval_step(params, frozen, placed["video"], confounders, graphdef=graphdef)
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


def evaluate_splits(config, run: Run) -> dict[str, dict]:
    """:func:`evaluate` on every split of ``config.dataset.eval_splits``."""
    task = run.task
    builder = pipeline.load_builder(task.dataset, config.dataset.data_dir, task.data_config)
    results = {}
    kitchen = task.dataset == "causal_kitchen" and task.task == "activity"
    for split in config.dataset.eval_splits:
        loader = make_loader(config, task, split=split, training=False)
        n = builder.info.splits[split].num_examples
        backgrounds = None
        if kitchen:  # the activity whose typical background each video shows
            backgrounds = pipeline.split_column(
                task.dataset, config.dataset.data_dir, split, "background", task.data_config
            )
        results[split] = evaluate(
            run.state["params"],
            run.frozen,
            run.graphdef,
            loader,
            run.mesh,
            task,
            n,
            backgrounds,
            confounders=run.state["confounders"],
        )
        if kitchen:
            spec = causal_kitchen.KitchenSpec(**builder.info.metadata["spec"])
            results[split]["order_blind_ceiling"] = causal_kitchen.order_blind_ceiling(spec, split)
    return results
