r"""Benchmark: the four Table 3 variants x seeds on CausalKitchen, unconfounded and default.

Each run is the main job (``python -m cmdcl_jax.main --config configs/synthetic.py``) in
a process of its own, with ``--config.seed`` = the seed (model initialisation, data order
and augmentation; the dataset is the same for every seed) and the variant's
``model.tci``/``model.vci``; it also evaluates the training split, without augmentation.
A finished run is read back, not rerun, so an interrupted benchmark continues;
``--finished_only`` tabulates the finished runs and starts none.

Prints, per data setting and variant, the mean and standard deviation over seeds of:
training accuracy, accuracy on test_iid, val_shifted and test_shifted, the shortcut rate
on test_shifted (predictions equal to the background's activity; about 1/C when the
background is ignored), the number of seeds that fit (training accuracy >= 0.95) and of
collapsed seeds (predicting at most two classes on test_iid); writes ``kitchen_seeds.md``
and ``kitchen_seeds.csv`` in --workdir.

  python benchmarks/kitchen_seeds.py --workdir /tmp/kitchen_seeds --seeds 5
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # paper Table 3
    "variant1": (False, False),
    "variant2_tci": (True, False),
    "variant3_vci": (False, True),
    "cmdcl": (True, True),
}
DATA = ("unconfounded", "default")  # configs/synthetic.py:<arg>
SPLITS = ("train", "test_iid", "val_shifted", "test_shifted")
COLLAPSED_CLASSES = 2
FIT_ACCURACY = 0.95  # a run fits its training data at this training accuracy or more

_WORKDIR = flags.DEFINE_string("workdir", None, "Runs, data and the tables go here.", required=True)
_SEEDS = flags.DEFINE_integer("seeds", 5, "Seeds 0..N-1 per variant and data setting.")
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Variants to run.")
_DATA = flags.DEFINE_list("data", list(DATA), "Data settings (configs/synthetic.py args).")
_FINISHED_ONLY = flags.DEFINE_bool(
    "finished_only", False, "Tabulate the runs already finished in --workdir; start none."
)
_OVERRIDES = flags.DEFINE_multi_string(
    "set", [], "Extra config override for every run, e.g. --set train.num_steps=500."
)


def run_one(workdir: Path, data: str, variant: str, seed: int, overrides: list[str]) -> dict:
    """Trains and evaluates one run (or reads its result): {split: metrics}."""
    result_file = workdir / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    tci, vci = VARIANTS[variant]
    cmd = [
        sys.executable,
        "-m",
        "cmdcl_jax.main",
        "--config",
        f"configs/synthetic.py:{data}",
        "--workdir",
        str(workdir),
        f"--config.dataset.data_dir={Path(_WORKDIR.value).absolute() / 'data'}",
        f"--config.seed={seed}",
        f"--config.model.tci={tci}",
        f"--config.model.vci={vci}",
        f"--config.dataset.eval_splits={SPLITS[1:] + SPLITS[:1]}",
        *(f"--config.{o}" for o in overrides),
    ]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"run failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    results = json.loads(out.stdout[out.stdout.index("{\n") :])
    result_file.write_text(json.dumps(results, indent=2))
    return results


def row(data: str, variant: str, seed: int, results: dict) -> dict:
    return {
        "data": data,
        "variant": variant,
        "seed": seed,
        **{f"{s}_acc1": results[s]["acc1"] for s in SPLITS},
        "shortcut_rate": results["test_shifted"]["shortcut_rate"],
        "fit": results["train"]["acc1"] >= FIT_ACCURACY,
        "collapsed": results["test_iid"]["predicted_classes"] <= COLLAPSED_CLASSES,
    }


def summary_table(rows: list[dict]) -> str:
    cols = [f"{s}_acc1" for s in SPLITS] + ["shortcut_rate"]
    counts = ["fit", "collapsed"]
    head = ["data", "variant", "seeds", *(c.removesuffix("_acc1") for c in cols), *counts]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["variant"]), []).append(r)
    for (data, variant), group in groups.items():
        cells = [data, variant, str(len(group))]
        for c in cols:
            v = np.array([r[c] for r in group])
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
        cells.extend(str(sum(r[c] for r in group)) for c in counts)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    root = Path(_WORKDIR.value)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    start = time.time()
    # Seed-major, so an interrupted benchmark has covered every variant and data setting.
    for seed in range(_SEEDS.value):
        for data in _DATA.value:
            for variant in _VARIANTS.value:
                t = time.time()
                workdir = root / data / variant / f"seed{seed}"
                if _FINISHED_ONLY.value and not (workdir / "result.json").exists():
                    continue
                results = run_one(workdir, data, variant, seed, _OVERRIDES.value)
                rows.append(row(data, variant, seed, results))
                print(
                    f"{data} {variant} seed {seed}: "
                    + " ".join(f"{k}={v:.3f}" for k, v in rows[-1].items() if "acc1" in k)
                    + f" shortcut={rows[-1]['shortcut_rate']:.3f} ({time.time() - t:.0f} s)",
                    flush=True,
                )
    table = summary_table(rows)
    print(f"\n{table}\n\n{len(rows)} runs in {time.time() - start:.0f} s")
    (root / "kitchen_seeds.md").write_text(table + "\n")
    with open(root / "kitchen_seeds.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    app.run(main)
