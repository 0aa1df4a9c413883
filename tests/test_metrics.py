"""Tests of cmdcl_jax.metrics against scikit-learn and hand-worked cases."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, top_k_accuracy_score

from cmdcl_jax import metrics

# Both sides are float64 ratios of counts, cumulated over at most 400 rows: they agree to
# within a few hundred ulps (n * eps ~ 1e-13), far inside these bounds.
F64 = {"rtol": 1e-10, "atol": 1e-12}
APPROX = {"rel": 1e-10, "abs": 1e-12}


def _random_multilabel(seed, decimals=None, n=300, c=12):
    rng = np.random.default_rng(seed)
    labels = rng.random((n, c)) < 0.2
    # Scores correlated with the labels, so APs spread over (0, 1).
    scores = rng.random((n, c)) + 0.5 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores, labels


@pytest.mark.parametrize("decimals", [None, 1], ids=["distinct", "ties"])
def test_average_precision_matches_sklearn(decimals):
    scores, labels = _random_multilabel(0, decimals)
    expected = [average_precision_score(labels[:, j], scores[:, j]) for j in range(12)]
    np.testing.assert_allclose(metrics.average_precision_per_class(scores, labels), expected, **F64)
    assert metrics.mean_average_precision(scores, labels) == pytest.approx(
        np.mean(expected), **APPROX
    )


def test_average_precision_independent_of_tied_row_order():
    scores, labels = _random_multilabel(1, decimals=1)
    permutation = np.random.default_rng(2).permutation(len(scores))
    np.testing.assert_allclose(
        metrics.average_precision_per_class(scores[permutation], labels[permutation]),
        metrics.average_precision_per_class(scores, labels),
        **F64,
    )


def test_average_precision_hand_worked():
    labels = np.array([[1, 1, 1], [0, 0, 0], [1, 1, 1], [0, 0, 0]])
    scores = np.array(
        [
            # Distinct: positives at ranks 1 and 3, AP = (1/1 + 2/3) / 2 = 5/6.
            [0.9, 0.9, 0.5],
            # Ties: rows 0 and 1 share 0.9, so the first positive's precision is that of
            # the threshold 0.9 (1 of 2 rows) and AP = (1/2 + 2/3) / 2 = 7/12.
            [0.8, 0.9, 0.5],
            # All tied: one threshold of 4 rows holding both positives, AP = 2/4.
            [0.7, 0.7, 0.5],
            [0.1, 0.1, 0.5],
        ]
    )
    np.testing.assert_allclose(
        metrics.average_precision_per_class(scores, labels), [5 / 6, 7 / 12, 1 / 2], **F64
    )


def test_class_without_positive_under_both_conventions():
    # Class 0: AP 5/6 as above; class 1 has no positive.
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=float)
    scores = np.array([[0.9, 0.3], [0.8, 0.2], [0.7, 0.4], [0.1, 0.1]])
    ap = metrics.average_precision_per_class(scores, labels)
    assert ap[0] == pytest.approx(5 / 6, **APPROX) and np.isnan(ap[1])
    assert metrics.mean_average_precision(scores, labels) == pytest.approx(5 / 6, **APPROX)
    drop = metrics.mean_average_precision(scores, labels, no_positive="drop")
    assert drop == pytest.approx(5 / 6, **APPROX)
    zero = metrics.mean_average_precision(scores, labels, no_positive="zero")
    assert zero == pytest.approx(5 / 12, **APPROX)


@pytest.mark.parametrize("no_positive", ["drop", "zero"])
def test_no_class_with_a_positive_raises(no_positive):
    with pytest.raises(ValueError, match="no class has a positive"):
        metrics.mean_average_precision(
            np.ones((3, 2)), np.zeros((3, 2), dtype=bool), no_positive=no_positive
        )


@pytest.mark.parametrize(
    ("scores", "labels", "kwargs", "match"),
    [
        (np.ones((3, 2)), np.ones((3, 2)), {"no_positive": "nan"}, "'nan'"),
        (np.ones((3, 2)), np.ones((3, 3)), {}, r"labels \(3, 3\)"),
        (np.ones(3), np.ones(3), {}, "must both be"),
        (np.ones((3, 2)), np.full((3, 2), 2), {}, "0 or 1"),
        (np.full((3, 2), np.nan), np.ones((3, 2)), {}, "finite"),
    ],
)
def test_mean_average_precision_bad_arguments_raise(scores, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        metrics.mean_average_precision(scores, labels, **kwargs)


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_top_k_accuracy_matches_sklearn_on_distinct_scores(k):
    rng = np.random.default_rng(3)
    scores = rng.random((400, 10))
    labels = rng.integers(0, 10, 400)
    expected = top_k_accuracy_score(labels, scores, k=k, labels=np.arange(10))
    assert metrics.top_k_accuracy(scores, labels, k) == pytest.approx(expected, **APPROX)


def test_top_k_accuracy_ties_are_pessimistic():
    scores = np.array([[0.5, 0.5, 0.1]])
    # Class 0 ties with class 1: one other class scores >= it, so it is out of the top 1
    # whichever order the tie is broken in, and within the top 2.
    assert metrics.top_k_accuracy(scores, np.array([0]), 1) == 0.0
    assert metrics.top_k_accuracy(scores, np.array([1]), 1) == 0.0
    assert metrics.top_k_accuracy(scores, np.array([0]), 2) == 1.0
    # A constant predictor over 4 classes: 3 others tie with the true class.
    constant = np.zeros((5, 4))
    labels = np.arange(5) % 4
    assert metrics.top_k_accuracy(constant, labels, 3) == 0.0
    assert metrics.top_k_accuracy(constant, labels, 4) == 1.0


@pytest.mark.parametrize(
    ("scores", "labels", "k", "match"),
    [
        (np.ones((3, 4)), np.zeros(2, dtype=int), 1, r"labels must be \[N\] = \[3\]"),
        (np.ones((3, 4)), np.zeros(3, dtype=int), 0, "k must be >= 1; got 0"),
        (np.ones((3, 4)), np.array([0, 4, 1]), 1, r"\[0, 4\); got range \[0, 4\]"),
        (np.ones((3, 4)), np.array([0, -1, 1]), 1, r"got range \[-1, 1\]"),
        (np.ones((3, 4)), np.zeros(3), 1, "integer class indices"),
        (np.ones((0, 4)), np.zeros(0, dtype=int), 1, "N >= 1"),
        (np.full((3, 4), np.inf), np.zeros(3, dtype=int), 1, "finite"),
    ],
)
def test_top_k_accuracy_bad_arguments_raise(scores, labels, k, match):
    with pytest.raises(ValueError, match=match):
        metrics.top_k_accuracy(scores, labels, k)


def test_shortcut_rate():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.5, 0.0]])
    # Top classes 0, 1, 2 and 0 (a tie goes to the lowest index).
    assert metrics.shortcut_rate(scores, np.array([0, 1, 2, 0])) == 1.0
    assert metrics.shortcut_rate(scores, np.array([0, 2, 2, 1])) == 0.5
    assert metrics.shortcut_rate(scores, np.array([1, 0, 0, 2])) == 0.0
    with pytest.raises(ValueError, match=r"shortcut_labels \[N\]; got \(4, 3\) and \(3,\)"):
        metrics.shortcut_rate(scores, np.array([0, 1, 2]))
