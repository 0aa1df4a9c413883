"""CausalKitchen: determinism, the knobs' measured confounding by split, the shifted
splits, the order-blind ceiling, order-only pairs."""

import dataclasses

import numpy as np
import pytest

from cmdcl_jax.data import causal_kitchen as ck
from cmdcl_jax.data import pipeline


def test_deterministic_from_seed():
    spec = ck.KitchenSpec(seed=5, num_train=6, num_test=4, num_val=4, num_frames=8, frame_size=32)
    a, b = list(ck.generate(spec, "test_shifted")), list(ck.generate(spec, "test_shifted"))
    for (key_a, ex_a), (key_b, ex_b) in zip(a, b, strict=True):
        assert key_a == key_b and ex_a["actions"] == ex_b["actions"]
        np.testing.assert_array_equal(ex_a["frames"], ex_b["frames"])
    other = ck.generate(dataclasses.replace(spec, seed=6), "test_shifted")
    pairs = zip(a, other, strict=True)
    assert any(not np.array_equal(x["frames"], y["frames"]) for (_, x), (_, y) in pairs)


KNOBS = [(0.9, 0.9), (1 / 8, 0.5), (0.3, 0.0), (1.0, 1.0)]  # (background_bias, salt_bias)
N = 4000  # videos per split in the label-only draws below


def _big(**knobs):
    return ck.KitchenSpec(num_train=N, num_val=N, num_test=N, **knobs)


def _within(measured, expected, n, sigmas=4.5):
    """A binomial proportion within `sigmas` standard errors (plus one count) of p."""
    return abs(measured - expected) <= sigmas * np.sqrt(expected * (1 - expected) / n) + 1 / n


@pytest.mark.parametrize("background_bias,salt_bias", KNOBS)
def test_measured_confounding_matches_the_knobs(background_bias, salt_bias):
    spec = _big(background_bias=background_bias, salt_bias=salt_bias)
    salt = len(ck.action_names(spec)) - 1
    c = spec.num_activities
    for split in ck.SPLITS:
        labels = ck.sample_labels(spec, split)
        confounded = split in ck.CONFOUNDED_SPLITS
        typical = np.mean(labels.background == labels.activity)
        expected = background_bias if confounded else 1 / c
        assert _within(typical, expected, N), (split, typical, expected)
        present = np.array([salt in steps for steps in labels.steps])
        for a in range(c):
            mine = labels.activity == a
            biased = salt_bias if a == spec.bias_activity else 1 - salt_bias
            expected = biased if confounded else 0.5
            assert _within(present[mine].mean(), expected, mine.sum()), (split, a)
        if not confounded:  # background independent of activity: chi-square, 1 % point 74.9
            assert _chi_square(labels.activity, labels.background, c) < 74.9


def _chi_square(rows, cols, c):
    table = np.zeros((c, c))
    np.add.at(table, (rows, cols), 1)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return ((table - expected) ** 2 / expected).sum()


def test_rendered_examples_carry_the_sampled_labels():
    spec = ck.KitchenSpec(num_train=12, num_val=6, num_test=6, num_frames=8, frame_size=32)
    salt = len(ck.action_names(spec)) - 1
    for split in ck.SPLITS:
        labels = ck.sample_labels(spec, split)
        examples = [e for _, e in ck.generate(spec, split)]
        assert len(examples) == spec.size(split)
        for i, e in enumerate(examples):
            assert (e["activity"], e["background"]) == (labels.activity[i], labels.background[i])
            assert e["actions"] == sorted(set(labels.steps[i]))
            assert (salt in e["actions"]) == (salt in labels.steps[i])


def test_val_and_test_shifted_disjoint_and_identically_distributed():
    spec = _big()
    np.testing.assert_array_equal(
        ck.background_probs(spec, "val_shifted"), ck.background_probs(spec, "test_shifted")
    )
    np.testing.assert_array_equal(
        ck.salt_probs(spec, "val_shifted"), ck.salt_probs(spec, "test_shifted")
    )
    val, test = ck.sample_labels(spec, "val_shifted"), ck.sample_labels(spec, "test_shifted")
    # Two-sample chi-square on the joint (activity, background) cells: 63 degrees of
    # freedom, 1 % point 92.0.
    c = spec.num_activities
    counts = np.zeros((2, c * c))
    for row, labels in enumerate((val, test)):
        np.add.at(counts[row], labels.activity * c + labels.background, 1)
    expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / counts.sum()
    assert ((counts - expected) ** 2 / expected).sum() < 92.0
    assert not np.array_equal(val.activity, test.activity)  # different draws
    small = ck.KitchenSpec(num_val=20, num_test=20, num_frames=8, frame_size=32)
    frames = {
        split: {e["frames"].tobytes() for _, e in ck.generate(small, split)}
        for split in ("val_shifted", "test_shifted")
    }
    assert len(frames["val_shifted"]) == len(frames["test_shifted"]) == 20
    assert not frames["val_shifted"] & frames["test_shifted"]


def test_order_blind_ceiling():
    spec = ck.KitchenSpec()  # 8 activities: 3 order-only pairs and 2 singletons
    unconfounded = ck.KitchenSpec(background_bias=1 / 8, salt_bias=0.5)
    for split in ck.SPLITS:
        assert ck.order_blind_ceiling(unconfounded, split) == pytest.approx(5 / 8)
    assert ck.order_blind_ceiling(spec, "test_shifted") == pytest.approx(5 / 8)
    assert ck.order_blind_ceiling(ck.KitchenSpec(background_bias=1.0), "train") == 1.0
    # The Bayes rule it implies, applied to a large draw, scores the ceiling.
    big = _big()
    labels = ck.sample_labels(big, "train")
    salt = len(ck.action_names(big)) - 1
    background_p, salt_p = ck.background_probs(big, "train"), ck.salt_probs(big, "train")
    sets = [frozenset(s) for _, s in ck.RECIPES[: big.num_activities]]
    correct = 0
    for a, z, steps in zip(labels.activity, labels.background, labels.steps, strict=True):
        shown = salt in steps
        members = [b for b in range(big.num_activities) if sets[b] == sets[a]]
        score = [background_p[b, z] * (salt_p[b] if shown else 1 - salt_p[b]) for b in members]
        correct += members[int(np.argmax(score))] == a
    ceiling = ck.order_blind_ceiling(big, "train")
    assert _within(correct / N, ceiling, N), (correct / N, ceiling)


def test_order_only_pairs_and_exclusive_actions():
    spec = ck.KitchenSpec()
    recipes = ck.RECIPES[: spec.num_activities]
    pairs = [
        (a, b)
        for a in range(len(recipes))
        for b in range(a + 1, len(recipes))
        if set(recipes[a][1]) == set(recipes[b][1]) and recipes[a][1] != recipes[b][1]
    ]
    assert len(pairs) >= 2
    counts = {}
    for _, steps in recipes:
        for step in set(steps):
            counts[step] = counts.get(step, 0) + 1
    assert any(n == 1 for n in counts.values())  # co-occurring causality
    assert ck.NONCAUSAL_ACTION not in counts


def test_builder_metadata_and_splits(kitchen):
    data_dir, config = kitchen
    builder = pipeline.load_builder("causal_kitchen", data_dir, config)
    assert {s: builder.info.splits[s].num_examples for s in ck.SPLITS} == {
        "train": 30, "test_iid": 13, "test_shifted": 13, "val_shifted": 11
    }  # fmt: skip
    example = builder.as_data_source("train")[0]
    assert example["frames"].shape == (8, 32, 32, 3) and example["frames"].dtype == np.uint8
    names = pipeline.class_names("causal_kitchen", "actions", data_dir, config)
    assert names[-1] == "add salt and pepper" and example["actions"].shape == (len(names),)
    assert pipeline.class_names("causal_kitchen", "activity", data_dir, config)[1] == (
        "make fried egg"
    )
