"""CausalKitchen: determinism, the confounder's association by split, order-only pairs."""

import dataclasses

import numpy as np

from cmdcl_jax.data import causal_kitchen as ck
from cmdcl_jax.data import pipeline


def _draw(spec, split):
    examples = [e for _, e in ck.generate(spec, split)]
    activity = np.array([e["activity"] for e in examples])
    background = np.array([e["background"] for e in examples])
    return examples, activity, background


def test_deterministic_from_seed():
    spec = ck.KitchenSpec(seed=5, num_train=6, num_test=4, num_frames=8, frame_size=32)
    a, b = list(ck.generate(spec, "test_shifted")), list(ck.generate(spec, "test_shifted"))
    for (key_a, ex_a), (key_b, ex_b) in zip(a, b, strict=True):
        assert key_a == key_b and ex_a["actions"] == ex_b["actions"]
        np.testing.assert_array_equal(ex_a["frames"], ex_b["frames"])
    other = ck.generate(dataclasses.replace(spec, seed=6), "test_shifted")
    pairs = zip(a, other, strict=True)
    assert any(not np.array_equal(x["frames"], y["frames"]) for (_, x), (_, y) in pairs)


def test_background_confounds_activity_in_train_only():
    spec = ck.KitchenSpec(num_train=400, num_test=400, num_frames=4, frame_size=16, bias=0.9)
    chance = 1 / spec.num_activities
    _, activity, background = _draw(spec, "train")
    typical = np.mean(background == activity)  # the rule "background -> its activity"
    # Sampling bounds, not rounding: a share of 400 draws has standard deviation
    # sqrt(p (1 - p) / 400), 0.015 at p = 0.91 and 0.017 at p = 1/8; 0.05 and 0.06 are
    # about 3.5 of them.
    assert abs(typical - (0.9 + 0.1 * chance)) < 0.05, typical
    _, activity, background = _draw(spec, "test_shifted")
    typical = np.mean(background == activity)
    assert abs(typical - chance) < 0.06, typical
    # Independence: chi-square of the C x C contingency table, well under the 1% point
    # of chi2 with 49 degrees of freedom (74.9).
    table = np.zeros((spec.num_activities,) * 2)
    np.add.at(table, (activity, background), 1)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    assert ((table - expected) ** 2 / expected).sum() < 74.9


def test_noncausal_action_biased_in_train_only():
    spec = ck.KitchenSpec(num_train=400, num_test=400, num_frames=4, frame_size=16, bias=0.9)
    salt = len(ck.action_names(spec)) - 1
    for split, low, high in (("train", 0.75, 0.25), ("test_shifted", 0.35, 0.65)):
        examples, activity, _ = _draw(spec, split)
        present = np.array([salt in e["actions"] for e in examples])
        in_biased = present[activity == spec.bias_activity].mean()
        in_others = present[activity != spec.bias_activity].mean()
        if split == "train":
            assert in_biased > low and in_others < high, (in_biased, in_others)
        else:
            assert low < in_biased < high and low < in_others < high, (in_biased, in_others)


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
        "train": 30, "test_iid": 13, "test_shifted": 13
    }  # fmt: skip
    example = builder.as_data_source("train")[0]
    assert example["frames"].shape == (8, 32, 32, 3) and example["frames"].dtype == np.uint8
    names = pipeline.class_names("causal_kitchen", "actions", data_dir, config)
    assert names[-1] == "add salt and pepper" and example["actions"].shape == (len(names),)
    assert pipeline.class_names("causal_kitchen", "activity", data_dir, config)[1] == (
        "make fried egg"
    )
