"""The ablation (``python -m cmdcl_jax.ablate``): its tables hold the runs' logged numbers,
finished runs are read back, failed ones reported."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from synthetic_runs import KITCHEN, ROOT

from cmdcl_jax import ablate

SPLITS = ("val_shifted", "test_iid", "test_shifted", "train")
# Means and differences of at most a few float64 values in [0, 1]: rounding leaves
# ~1e-16 relative; 1e-12 relative and 1e-15 absolute leave three orders of magnitude.
CLOSE = {"rel": 1e-12, "abs": 1e-15}


def _read_csv(file):
    with open(file, newline="") as f:
        return list(csv.DictReader(f))


def _fake_evaluations(rng) -> dict[int, dict]:
    """{step: {split: values}} as the main job logs them, at two evaluated steps."""
    return {
        step: {
            s: {
                "acc1": float(rng.uniform()),
                "acc5": 1.0,
                "predicted_classes": int(rng.integers(1, 9)),
                "num_examples": 64,
                "shortcut_rate": float(rng.uniform()),
            }
            for s in SPLITS
        }
        for step in (10, 20)
    }


def _write_logs(workdir, evaluations: dict[int, dict]) -> None:
    lines = []
    for step, by_split in evaluations.items():
        lines.append({"step": step, "split": "train", "loss": 1.0, "grad_norm": 0.5})
        lines += [{"step": step, "split": s, **v} for s, v in by_split.items()]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (workdir / "result.json").write_text(json.dumps(evaluations[max(evaluations)]))


def test_tables_hold_the_logged_numbers_resume_and_failures(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    runs = [
        ablate.Run("default", vlm, variant, seed)
        for seed in range(3)
        for vlm in ablate.VLMS
        for variant in ("variant1", "cmdcl")
    ]
    failing = ablate.Run("default", "random", "cmdcl", 2)
    logs = {r: _fake_evaluations(rng) for r in runs if r != failing}
    started = []

    def fake_train_run(workdir, args):
        started.append((workdir, args))
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "main.log").write_text("boom\n")
        run = next(r for r in runs if r.workdir(tmp_path) == workdir)
        if run == failing:
            return 3
        _write_logs(workdir, logs[run])
        return 0

    monkeypatch.setattr(ablate, "train_run", fake_train_run)
    monkeypatch.setattr(ablate, "pretrained_vlm", lambda config: tmp_path / "vlm")
    config_file = str(ROOT / "configs/synthetic.py")
    rows, failures, metric = ablate.run_ablation(tmp_path, config_file, runs, [])
    ablate.write_tables(tmp_path, rows, failures, metric, "python -m cmdcl_jax.ablate")

    assert metric == "acc1" and len(started) == len(runs) and len(rows) == len(runs) - 1
    for workdir, args in started:
        pretrained, both = "pretrained" in workdir.parts, "cmdcl" in workdir.parts
        assert (f"--config.model.clip={tmp_path / 'vlm'}" in args) == pretrained
        assert f"--config.model.tci={both}" in args and f"--config.model.vci={both}" in args
    number = f"{runs.index(failing) + 1}/{len(runs)}"
    log = failing.workdir(tmp_path) / "main.log"
    assert failures == [
        f"[{number}] default random cmdcl seed 2: FAILED with exit status 3, log {log}: boom"
    ]
    markdown = (tmp_path / "ablation.md").read_text()
    assert f"- {failures[0]}" in markdown

    # Each run's line: the evaluation at the step best on val_shifted, as logged.
    best = {}
    for line in _read_csv(tmp_path / "ablation_runs.csv"):
        run = ablate.Run(line["data"], line["vlm"], line["variant"], int(line["seed"]))
        step = max(logs[run], key=lambda s: logs[run][s]["val_shifted"]["acc1"])
        best[run] = logs[run][step]
        assert int(line["step"]) == step
        for s in SPLITS:
            assert float(line[f"{s}_acc1"]) == best[run][s]["acc1"]
        assert float(line["shortcut_rate"]) == best[run]["test_shifted"]["shortcut_rate"]
        assert line["collapsed"] == str(best[run]["test_iid"]["predicted_classes"] <= 2)
    assert len(best) == len(rows)

    for line in _read_csv(tmp_path / "ablation.csv"):
        group = [e for r, e in best.items() if (r.vlm, r.variant) == (line["vlm"], line["variant"])]
        assert int(line["seeds"]) == len(group)
        for s in SPLITS:
            values = [e[s]["acc1"] for e in group]
            assert float(line[f"{s}_acc1_mean"]) == pytest.approx(np.mean(values), **CLOSE)
            assert float(line[f"{s}_acc1_std"]) == pytest.approx(np.std(values), **CLOSE)
        gaps = [e["test_iid"]["acc1"] - e["test_shifted"]["acc1"] for e in group]
        assert float(line["gap_mean"]) == pytest.approx(np.mean(gaps), **CLOSE)
        mean, std = float(line["test_shifted_acc1_mean"]), float(line["test_shifted_acc1_std"])
        assert f"{mean:.3f} ± {std:.3f}" in markdown

    pairs = {line["vlm"]: line for line in _read_csv(tmp_path / "ablation_paired.csv")}
    for vlm, seeds in (("random", (0, 1)), ("pretrained", (0, 1, 2))):
        diff = [
            best[ablate.Run("default", vlm, "cmdcl", s)]["test_shifted"]["acc1"]
            - best[ablate.Run("default", vlm, "variant1", s)]["test_shifted"]["acc1"]
            for s in seeds
        ]
        assert int(pairs[vlm]["seeds"]) == len(seeds)
        assert float(pairs[vlm]["diff_mean"]) == pytest.approx(np.mean(diff), **CLOSE)
        assert float(pairs[vlm]["diff_std"]) == pytest.approx(np.std(diff), **CLOSE)
        assert int(pairs[vlm]["ahead"]) == sum(d > 0 for d in diff)

    # Again: the finished runs are read back; only the failed one is started.
    started.clear()
    again, _, _ = ablate.run_ablation(tmp_path, config_file, runs, [])
    assert [w for w, _ in started] == [failing.workdir(tmp_path)]
    assert again == rows
    started.clear()
    finished, _, _ = ablate.run_ablation(tmp_path, config_file, runs, [], finished_only=True)
    assert not started and finished == rows

    with pytest.raises(ValueError, match="the ablation sets seed"):
        ablate.check_options(config_file, ["cmdcl"], ["random"], ["seed=3"])
    with pytest.raises(ValueError, match="unknown \\['clip'\\]"):
        ablate.check_options(config_file, ["cmdcl"], ["clip"], [])


def test_ablate_command_tabulates_a_tiny_run(tmp_path, data_dir):
    """The command on one 6-step run; its tables hold the run's logged evaluation. The
    training recipe is test_train's process-count test's, so that the two share one
    compiled train step through the session's compilation cache."""
    (tmp_path / "data").symlink_to(data_dir)  # the tests' kitchen, built once
    recipe = {"train.num_steps": 6, "train.learning_rate": 3e-3, "train.warmup_steps": 0}
    command = [
        sys.executable,
        "-m",
        "cmdcl_jax.ablate",
        "--config=configs/synthetic.py",
        f"--workdir={tmp_path}",
        "--seeds=1",
        "--variants=cmdcl",
        "--vlm=random",
        *(f"--set={key}={value}" for key, value in {**KITCHEN, **recipe}.items()),
    ]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    workdir = tmp_path / "default/random/cmdcl/seed0"
    logged = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    evaluation = {x["split"]: x for x in logged if "acc1" in x}
    assert set(evaluation) == set(SPLITS) and {x["step"] for x in evaluation.values()} == {6}
    # The main job's printed result (the mark of a finished run) is its logged evaluation.
    printed = json.loads((workdir / "result.json").read_text())
    drop = ("step", "split")
    assert printed == {
        s: {k: v for k, v in x.items() if k not in drop} for s, x in evaluation.items()
    }
    (line,) = _read_csv(tmp_path / "ablation_runs.csv")
    for s in SPLITS:
        assert float(line[f"{s}_acc1"]) == evaluation[s]["acc1"]
    assert float(line["shortcut_rate"]) == evaluation["test_shifted"]["shortcut_rate"]
    (summary,) = _read_csv(tmp_path / "ablation.csv")
    assert float(summary["test_iid_acc1_mean"]) == evaluation["test_iid"]["acc1"]
    assert float(summary["test_shifted_acc1_std"]) == 0.0
    assert "| default | random | CMDCL | 1 |" in (tmp_path / "ablation.md").read_text()
