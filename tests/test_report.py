"""The report on the shared trained run: every figure drawn, and its data equal to what the
run logged and to the split's labels."""

import json

import numpy as np
import pytest
from synthetic_runs import NUM_TEST, metrics_lines

from cmdcl_jax.data import causal_kitchen, pipeline
from cmdcl_jax.report.build import make_report
from cmdcl_jax.report.figure_data import TRAIN_EVAL, training_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A float32 softmax of C or L terms sums to 1 within a few ulps per term (eps 1.2e-7);
# averaged in float64 it keeps that bound: 1e-5 leaves 10x at C = L = 8.
SOFTMAX_SUM = 1e-5


def test_report_draws_every_figure_from_the_run_logs(trained, data_dir, tmp_path):
    workdir, results = trained
    split = "test_shifted"
    # The run compared with itself: both matching panels come from the same weights.
    report = make_report(workdir, tmp_path, split, compare=workdir, video=3)
    figures = report["figures"]
    assert set(figures) == {
        "curves",
        "confusion",
        "per_class_ap",
        "co_classification",
        "matching",
        "tci_scores",
    }
    assert report["skipped"] == {}
    for figure in figures.values():
        png = (tmp_path / figure["png"]).read_bytes()
        assert png.startswith(PNG_SIGNATURE) and len(png) > 1000, figure["png"]
    assert (tmp_path / "figures.json").is_file()

    # Curves: every metrics.jsonl line, in order, per split.
    lines = metrics_lines(workdir)
    curves = figures["curves"]["data"]
    assert set(curves) == {x["split"] for x in lines}
    for name, curve in curves.items():
        own = [x for x in lines if x["split"] == name]
        assert curve["step"] == [x["step"] for x in own]
        for key, values in curve.items():
            if key != "step":
                assert values == [x[key] for x in own], (name, key)

    # Confusion: the newest checkpoint (the final step), its logged accuracy on the split.
    # The training run evaluated on 8 devices, the report on 1: logits differ in float32
    # rounding (~1e-6), which may flip a near-tie in one video, no more.
    assert report["step"] == 300
    assert report["logged"]["acc1"] == results[split]["acc1"]
    confusion = figures["confusion"]["data"]
    counts = np.array(confusion["counts"])
    assert counts.sum() == confusion["num_examples"] == NUM_TEST
    assert confusion["correct"] == np.trace(counts)
    assert confusion["accuracy"] == pytest.approx(results[split]["acc1"], rel=0, abs=1 / NUM_TEST)
    source = pipeline.open_split("causal_kitchen", str(data_dir), split)
    activity = np.array([source[i]["activity"] for i in range(len(source))])
    shown = np.stack([source[i]["actions"] for i in range(len(source))])  # [N, K]
    assert counts.sum(axis=1).tolist() == np.bincount(activity, minlength=8).tolist()
    assert figures["per_class_ap"]["data"]["positives"] == counts.sum(axis=1).tolist()

    # Co-classification: an activity's prediction classifies its recipe's actions.
    spec = causal_kitchen.KitchenSpec(
        **pipeline.load_builder("causal_kitchen", str(data_dir)).info.metadata["spec"]
    )
    recipes = causal_kitchen.recipe_actions(spec)  # [C, K]
    co = figures["co_classification"]["data"]
    assert co["classified_count"] == (counts.sum(axis=0) @ recipes).tolist()
    assert co["shown_count"] == shown.sum(axis=0).tolist()
    present = np.array(co["shown_count"]) > 0
    assert np.array(co["shown"], dtype=float).diagonal()[present].tolist() == [1.0] * present.sum()

    # Matching: per-frame distributions over activities; the same run gives the same panel.
    data, again = figures["matching"]["data"]["panels"]
    assert {**data, "run": ""} == {**again, "run": ""}
    assert data["in_recipe"] == recipes.T.tolist()
    num_frames = json.loads((workdir / "run.json").read_text())["inference"]["num_frames"]
    assert sum(data["frames"]) == NUM_TEST * num_frames
    for key in ("clip", "video"):
        probs = np.array(data[key], dtype=float)[np.array(data["frames"]) > 0]
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=0, atol=SOFTMAX_SUM)

    # TCI scores: a softmax over frames per class; the frames' actions follow the video's steps.
    tci = figures["tci_scores"]["data"]
    assert tci["id"] == source[3]["id"].decode() and len(tci["frame_actions"]) == num_frames
    np.testing.assert_allclose(np.sum(tci["scores"], axis=1), 1.0, rtol=0, atol=SOFTMAX_SUM)
    generated = int(tci["id"].rsplit("_", 1)[1])
    steps = causal_kitchen.sample_labels(spec, split).steps[generated]
    names = causal_kitchen.action_names(spec)
    runs = [
        a for i, a in enumerate(tci["frame_actions"]) if i == 0 or a != tci["frame_actions"][i - 1]
    ]
    assert is_subsequence([names.index(a) for a in runs], steps), (runs, steps)


def is_subsequence(items: list, sequence: list) -> bool:
    rest = iter(sequence)
    return all(item in rest for item in items)


def test_curves_keep_the_training_loss_apart_from_evaluations_of_the_training_split():
    """A run that also evaluates its training split (as `ablate` runs do) logs ``train``
    lines of two kinds; the loss curve holds the loss lines only."""
    lines = [
        {"step": 20, "split": "train", "loss": 2.0, "grad_norm": 1.5},
        {"step": 40, "split": "train", "loss": 1.0, "grad_norm": 1.0},
        {"step": 40, "split": "train", "acc1": 0.5, "num_examples": 32},
        {"step": 40, "split": "val", "acc1": 0.25, "num_examples": 16},
    ]
    curves = training_curves(lines)
    assert curves["train"] == {"step": [20, 40], "loss": [2.0, 1.0], "grad_norm": [1.5, 1.0]}
    assert curves[TRAIN_EVAL] == {"step": [40], "acc1": [0.5], "num_examples": [32]}
    assert curves["val"] == {"step": [40], "acc1": [0.25], "num_examples": [16]}
