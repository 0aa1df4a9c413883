"""Evaluation metrics in NumPy: mAP (Charades' definition) and top-k accuracy.

See the "Metrics" section of docs/data.md. Both functions take the whole evaluation set at
once and are vectorised over rows and classes.
"""

from __future__ import annotations

import numpy as np

NO_POSITIVE_CONVENTIONS = ("drop", "zero")


def average_precision_per_class(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Non-interpolated average precision of each class.

    Per class, the rows are ranked by score, descending, and AP is the mean over the
    positives of the precision at that positive's rank (Charades' official definition).
    Tied scores form one threshold: a positive's precision is
    `#positives with score >= s / #rows with score >= s` for its score `s`, so the result
    does not depend on the order of tied rows. This is exactly scikit-learn's
    `average_precision_score` on each column, and Charades' definition when scores are
    distinct.

    Args:
      scores: float [N, C], higher means more likely.
      labels: [N, C] of 0/1 (bool, int or float), 1 where the class is present.

    Returns:
      float64 [C]: the AP of each class, NaN for a class with no positive.

    Raises:
      ValueError: if the shapes differ or are not 2-D, a score is not finite or a label
        is not 0 or 1.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(
            f"scores and labels must both be [N, C]; got scores {scores.shape}, "
            f"labels {labels.shape}"
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1; got values {np.unique(labels)[:10]}")
    n = scores.shape[0]
    order = np.argsort(-scores, axis=0, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=0)
    sorted_labels = np.take_along_axis(labels.astype(np.float64), order, axis=0)
    true_positives = np.cumsum(sorted_labels, axis=0)
    # Each rank's threshold is the last rank of its tie group: the smallest j >= i whose
    # score differs from the next one's (or j = N - 1).
    rank = np.arange(n)[:, None]
    group_end = np.ones(scores.shape, dtype=bool)
    group_end[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    last = np.where(group_end, rank, n - 1)
    last = np.minimum.accumulate(last[::-1], axis=0)[::-1]
    precision = np.take_along_axis(true_positives, last, axis=0) / (last + 1)
    num_positives = sorted_labels.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(
            num_positives > 0, (precision * sorted_labels).sum(axis=0) / num_positives, np.nan
        )


def mean_average_precision(
    scores: np.ndarray, labels: np.ndarray, *, no_positive: str = "drop"
) -> float:
    """Mean over classes of `average_precision_per_class` (tied scores: one threshold).

    Args:
      scores: float [N, C], higher means more likely.
      labels: [N, C] of 0/1 (bool, int or float).
      no_positive: what a class with no positive counts as. "drop": it is left out and
        the mean is over the classes with a positive (SlowFast's convention). "zero": it
        counts as AP 0 and the mean is over all C classes (VideoGraph's convention, for
        comparing with the Breakfast literature).

    Returns:
      The mAP, in [0, 1].

    Raises:
      ValueError: if `no_positive` is not "drop" or "zero", no class has a positive, or
        the inputs are invalid (see `average_precision_per_class`).
    """
    if no_positive not in NO_POSITIVE_CONVENTIONS:
        raise ValueError(
            f"no_positive must be one of {NO_POSITIVE_CONVENTIONS}; got {no_positive!r}"
        )
    ap = average_precision_per_class(scores, labels)
    if np.isnan(ap).all():
        raise ValueError(f"no class has a positive label among the {ap.size} classes")
    if no_positive == "zero":
        return float(np.nan_to_num(ap, nan=0.0).mean())
    return float(np.nanmean(ap))


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k highest scores.

    Ties are pessimistic: the true class is within the top k iff fewer than k other
    classes score at least as high (`>=`) as it. So a constant predictor scores 0 for
    k < C rather than 1, and the result does not depend on the order of the classes.

    Args:
      scores: float [N, C], higher means more likely.
      labels: int [N], the true class index of each row, in [0, C).
      k: how many of the highest scores count, >= 1 (k >= C gives 1).

    Returns:
      The accuracy, in [0, 1].

    Raises:
      ValueError: if the shapes do not match, N is 0, `k` < 1, a score is not finite or
        a label is not an integer in [0, C).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be [N, C] with N >= 1; got shape {scores.shape}")
    num_rows, num_classes = scores.shape
    if labels.shape != (num_rows,):
        raise ValueError(f"labels must be [N] = [{num_rows}]; got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices; got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must be in [0, {num_classes}); got range [{labels.min()}, {labels.max()}]"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    true_scores = np.take_along_axis(scores, labels[:, None], axis=1)
    others_at_least = (scores >= true_scores).sum(axis=1) - 1
    return float((others_at_least < k).mean())


def shortcut_rate(scores: np.ndarray, shortcut_labels: np.ndarray) -> float:
    """Share of rows whose top class is the class a shortcut cue points to.

    On CausalKitchen the cue is the background: `shortcut_labels[i]` is the activity
    whose typical background video i shows. A model that reads the background scores 1;
    one that ignores it scores about 1 / C where the background is independent of the
    activity. Ties go to the lowest class index (`argmax`).

    Args:
      scores: float [N, C]; shortcut_labels: int [N] in [0, C).
    """
    scores = np.asarray(scores)
    shortcut_labels = np.asarray(shortcut_labels)
    if scores.ndim != 2 or shortcut_labels.shape != (scores.shape[0],):
        raise ValueError(
            f"scores must be [N, C] and shortcut_labels [N]; got {scores.shape} and "
            f"{shortcut_labels.shape}"
        )
    return float((scores.argmax(axis=1) == shortcut_labels).mean())
