"""The ablation's tables (``python -m cmdcl_jax.ablate``), read from its runs' own logs.

A run's numbers are the evaluation lines of its ``metrics.jsonl`` at the step of its best
checkpoint: the evaluated step with the highest metric on the first eval split (ties: the
later step), as the run's checkpoint retention picks it. Nothing is evaluated again here;
the tables only gather those values, their means and standard deviations over seeds
(population, ddof 0) and per-seed differences.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from cmdcl_jax.train import metrics_log

VARIANTS = {  # paper Table 3: name -> (label, model.tci, model.vci)
    "variant1": ("Variant 1", False, False),
    "variant2_tci": ("Variant 2 (TCI)", True, False),
    "variant3_vci": ("Variant 3 (VCI)", False, True),
    "cmdcl": ("CMDCL", True, True),
}
IID, SHIFTED = "test_iid", "test_shifted"
FIT = 0.95  # a run fits its training data at this metric on the training split or more
COLLAPSED_CLASSES = 2  # a run predicting at most this many classes on test_iid collapsed
KEYS = ("data", "vlm", "variant", "seed")
COUNTS = ("fit", "collapsed")
PAIRED = ("cmdcl", "variant1")  # the paired comparison: the first against the second


def best_evaluation(workdir: Path, select_split: str, metric: str) -> tuple[int, dict]:
    """(step, ``{split: values}``) of the run in ``workdir`` at its best checkpoint."""
    file = workdir / "metrics.jsonl"
    scores = metrics_log.scores(file, select_split, metric)
    scored = [(v, s) for s, v in scores.items() if not math.isnan(v)]
    if not scored:
        raise ValueError(f"{file}: no evaluation of {select_split} with {metric}")
    step = max(scored)[1]
    return step, metrics_log.evaluation_at(file, step, metric)


def run_row(key: dict, step: int, evaluation: dict, splits: list[str], metric: str) -> dict:
    """One run's line: its key, step, ``<split>_<metric>`` for ``splits`` (the training
    split first), the test_iid minus test_shifted gap, test_shifted's shortcut rate and
    test_iid's predicted classes where the evaluation reports them, fit and collapse."""
    missing = [s for s in splits if metric not in evaluation.get(s, {})]
    if missing:
        raise ValueError(f"{key}: no {metric} for {missing} at step {step}")
    row = {**key, "step": step, **{f"{s}_{metric}": evaluation[s][metric] for s in splits}}
    row["gap"] = evaluation[IID][metric] - evaluation[SHIFTED][metric]
    if "shortcut_rate" in evaluation[SHIFTED]:
        row["shortcut_rate"] = evaluation[SHIFTED]["shortcut_rate"]
    row["fit"] = evaluation[splits[0]][metric] >= FIT
    if "predicted_classes" in evaluation[IID]:
        row["collapsed"] = evaluation[IID]["predicted_classes"] <= COLLAPSED_CLASSES
    return row


def _groups(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def _values(rows: list[dict]) -> list[str]:
    """The columns of ``rows`` averaged over seeds."""
    skip = {*KEYS, "step", *COUNTS}
    return [c for c in rows[0] if c not in skip]


def summary(rows: list[dict]) -> list[dict]:
    """Per (data, vlm, variant): seeds, mean and std of each value, and the counts."""
    out = []
    for (data, vlm, variant), group in _groups(rows, KEYS[:3]).items():
        line = {"data": data, "vlm": vlm, "variant": variant, "seeds": len(group)}
        for c in _values(rows):
            v = np.array([r[c] for r in group], np.float64)
            line[f"{c}_mean"], line[f"{c}_std"] = float(v.mean()), float(v.std())
        line.update({c: sum(bool(r[c]) for r in group) for c in COUNTS if c in rows[0]})
        out.append(line)
    return out


def paired(rows: list[dict], metric: str) -> list[dict]:
    """Per (data, vlm): CMDCL minus Variant 1 on test_shifted over the seeds both finished."""
    model, base = PAIRED
    column = f"{SHIFTED}_{metric}"
    out = []
    for (data, vlm), group in _groups(rows, KEYS[:2]).items():
        by = {(r["variant"], r["seed"]): r[column] for r in group}
        seeds = sorted(s for v, s in by if v == model and (base, s) in by)
        if not seeds:
            continue
        a = np.array([by[model, s] for s in seeds], np.float64)
        b = np.array([by[base, s] for s in seeds], np.float64)
        diff = a - b
        out.append(
            {
                "data": data,
                "vlm": vlm,
                "seeds": len(seeds),
                f"{base}_mean": float(b.mean()),
                f"{model}_mean": float(a.mean()),
                "diff_mean": float(diff.mean()),
                "diff_std": float(diff.std()),
                "diff_min": float(diff.min()),
                "diff_max": float(diff.max()),
                "ahead": int((diff > 0).sum()),
            }
        )
    return out


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _markdown(head: list[str], lines: list[list[str]]) -> str:
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(rows + ["| " + " | ".join(cells) + " |" for cells in lines])


def summary_markdown(table: list[dict], rows: list[dict]) -> str:
    values = _values(rows)
    counts = [c for c in COUNTS if c in rows[0]]
    head = ["data", "vlm", "variant", "seeds", *values, *counts]
    lines = [
        [
            t["data"],
            t["vlm"],
            VARIANTS[t["variant"]][0],
            str(t["seeds"]),
            *(f"{t[c + '_mean']:.3f} ± {t[c + '_std']:.3f}" for c in values),
            *(f"{t[c]}/{t['seeds']}" for c in counts),
        ]
        for t in table
    ]
    return _markdown(head, lines)


def paired_markdown(table: list[dict]) -> str:
    model, base = PAIRED
    head = ["data", "vlm", "seeds", VARIANTS[base][0], VARIANTS[model][0], "difference"]
    head += ["min", "max", "ahead"]
    lines = [
        [
            t["data"],
            t["vlm"],
            str(t["seeds"]),
            _cell(t[f"{base}_mean"]),
            _cell(t[f"{model}_mean"]),
            f"{t['diff_mean']:+.3f} ± {t['diff_std']:.3f}",
            f"{t['diff_min']:+.3f}",
            f"{t['diff_max']:+.3f}",
            f"{t['ahead']}/{t['seeds']}",
        ]
        for t in table
    ]
    return _markdown(head, lines)


def runs_markdown(rows: list[dict]) -> str:
    return _markdown(list(rows[0]), [[_cell(v) for v in r.values()] for r in rows])


def write_csv(file: Path, table: list[dict]) -> None:
    """``table`` as CSV, floats at full precision (as the logs hold them)."""
    with open(file, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]) if table else [])
        writer.writeheader()
        writer.writerows(table)
