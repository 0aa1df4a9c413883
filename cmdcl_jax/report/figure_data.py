"""The numbers each figure of the report plots, from a run's logs and split outputs.

Every function returns a JSON-ready dict (lists, not arrays); ``figures.json`` holds them
as plotted. Definitions (see docs/report.md):

* co-classification (the paper's Fig. 6): over the videos of a split, ``P[i, j]`` = the
  share of the videos classified as showing atomic action ``j`` that are also classified
  as showing ``i``; NaN where no video is classified as showing ``j``. Beside it the same
  statistic of the actions the videos really show (co-occurrence).
* matching probabilities (the paper's Figs. 1c and 5c): for each atomic action ``k`` the
  mean, over every sampled frame of the split that shows ``k``, of the frame's softmax over
  activities of cos(frame embedding, T') / tau_t, the frame embedding being CLIP's V_P
  or the video encoder's (:class:`split_outputs.SplitOutputs`).
"""

from __future__ import annotations

import numpy as np

from cmdcl_jax import metrics as metrics_lib
from cmdcl_jax.report.split_outputs import SplitOutputs


def _listed(x: np.ndarray) -> list:
    """``x`` as nested lists, NaN as None (JSON has no NaN)."""
    x = np.asarray(x, np.float64)
    return np.where(np.isnan(x), None, x).tolist()


TRAIN_EVAL = "train_eval"  # the curve of evaluations of the training split


def training_curves(lines: list[dict]) -> dict:
    """``{split: {"step": [...], metric: [...]}}`` of ``metrics.jsonl``'s lines, in file
    order: every numeric value of each split (``train``: the logged training loss, and each
    eval split; an evaluation of the training split itself, a ``train`` line without a
    loss, goes to ``train_eval``)."""
    curves: dict[str, dict[str, list]] = {}
    for line in lines:
        split = line["split"]
        if split == "train" and "loss" not in line:
            split = TRAIN_EVAL
        values = {k: v for k, v in line.items() if k not in ("step", "split")}
        curve = curves.setdefault(split, {"step": []})
        curve["step"].append(line["step"])
        for key, value in values.items():
            if isinstance(value, int | float):
                curve.setdefault(key, []).append(value)
    return curves


def confusion(outputs: SplitOutputs, class_names: list[str]) -> dict:
    """Single-label: counts [C, C], row the true class, column the predicted (argmax)."""
    c = len(class_names)
    predicted = outputs.logits.argmax(axis=1)
    counts = np.zeros((c, c), np.int64)
    np.add.at(counts, (outputs.labels, predicted), 1)
    return {
        "classes": class_names,
        "counts": counts.tolist(),
        "correct": int(np.trace(counts)),
        "num_examples": int(counts.sum()),
        "accuracy": float(np.trace(counts) / counts.sum()),
    }


def per_class_ap(outputs: SplitOutputs, class_names: list[str], kind: str) -> dict:
    """AP of each class (one against the rest for single-label tasks), NaN without positive."""
    labels = outputs.labels
    if kind == "single":
        labels = np.eye(len(class_names), dtype=np.int64)[labels]
    ap = metrics_lib.average_precision_per_class(outputs.logits, labels)
    return {
        "classes": class_names,
        "ap": _listed(ap),
        "positives": labels.sum(axis=0).astype(int).tolist(),
        "mAP": float(np.nanmean(ap)),
    }


def classified_actions(outputs: SplitOutputs, kind: str, recipes: np.ndarray | None) -> np.ndarray:
    """bool [N, K]: the atomic actions each video is classified as showing.

    Multi-label (the actions task): those with sigmoid(logit) > 1/2. Single-label (the
    activity task): the actions of the predicted activity's recipe, ``recipes`` 0/1 [C, K].
    """
    if kind == "multi":
        return outputs.logits > 0
    return recipes[outputs.logits.argmax(axis=1)].astype(bool)


def co_occurrence(present: np.ndarray) -> np.ndarray:
    """float [K, K]: ``P[i, j]`` = #(i and j present) / #(j present), NaN where j never is."""
    present = present.astype(np.float64)  # [N, K]
    both = present.T @ present  # [K, K]
    with np.errstate(invalid="ignore", divide="ignore"):
        return both / np.where(both.diagonal() > 0, both.diagonal(), np.nan)[None, :]


def co_classification(
    outputs: SplitOutputs, kind: str, action_names: list[str], recipes: np.ndarray | None
) -> dict:
    """The co-classification matrix of atomic actions and the true co-occurrence one."""
    classified = classified_actions(outputs, kind, recipes)
    return {
        "actions": action_names,
        "classified": _listed(co_occurrence(classified)),
        "classified_count": classified.sum(axis=0).astype(int).tolist(),
        "shown": _listed(co_occurrence(outputs.actions)),
        "shown_count": outputs.actions.sum(axis=0).astype(int).tolist(),
    }


def matching(
    outputs: SplitOutputs, class_names: list[str], action_names: list[str], recipes: np.ndarray
) -> dict:
    """Mean matching probability [K, C] of the frames showing each atomic action, with
    CLIP's frame embeddings (``clip``) and the video encoder's (``video``); ``in_recipe``
    [K, C] marks the actions of each activity's recipe (``recipes`` 0/1 [C, K])."""
    k = len(action_names)
    shown = np.eye(k)[outputs.frame_actions]  # [N, L, K]
    frames = shown.sum(axis=(0, 1))  # [K]
    data = {
        "classes": class_names,
        "actions": action_names,
        "frames": frames.astype(int).tolist(),
        "in_recipe": np.asarray(recipes).T.astype(int).tolist(),
    }
    for key, probs in (("clip", outputs.matching_clip), ("video", outputs.matching_video)):
        total = np.einsum("nlk,nlc->kc", shown, probs.astype(np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            data[key] = _listed(total / np.where(frames > 0, frames, np.nan)[:, None])
    return data


def tci_scores(outputs: SplitOutputs, index: int, class_names: list[str], actions) -> dict:
    """TCI's scores S [C, L] over the frames of example ``index``, with the atomic action
    each frame shows (``actions``: the names, or None without frame labels)."""
    label = outputs.labels[index]
    shown = outputs.frame_actions
    return {
        "id": outputs.ids[index],
        "classes": class_names,
        "true_class": int(label) if np.ndim(label) == 0 else None,
        "predicted_class": int(outputs.logits[index].argmax()),
        "scores": outputs.scores[index].astype(np.float64).tolist(),
        "frame_actions": None if shown is None else [actions[a] for a in shown[index]],
    }
