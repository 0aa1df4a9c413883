r"""The paper's Table 3 ablation: the four variants x seeds x VLMs x data settings.

  python -m cmdcl_jax.ablate --config configs/synthetic.py --seeds 5 --workdir DIR

Each run is the main job (``python -m cmdcl_jax.main``) in a process of its own, on
``--config <config>:<data>`` with ``--config.seed`` = the seed (initialisation, data
order, augmentation; the dataset is the same for every seed), the variant's
``model.tci``/``model.vci``, and for the ``pretrained`` VLM ``model.clip`` = the
pretrained tiny VLM (``cmdcl_jax.pretrain_vlm``, built into the data directory on first
use); ``random`` leaves ``model.clip`` unset (the tiny random CLIP). Every run also
evaluates the training split, without augmentation. ``--set key=value`` overrides a
config field of every run (``--set dataset.task=actions``, ``--set train.num_steps=500``).

In ``--workdir``: ``data/`` (the dataset and the pretrained VLM, shared by every run),
``<data>/<vlm>/<variant>/seed<k>/`` (each run's workdir, with ``main.log``, the run's
console output, and ``result.json``, the final evaluation it printed, written when the
run ends well), and the tables (``cmdcl_jax.ablation_table``): ``ablation.md``,
``ablation.csv`` (per data, VLM and variant: mean and std over seeds),
``ablation_paired.csv`` (CMDCL against Variant 1 on test_shifted, paired by seed) and
``ablation_runs.csv`` (one line per run). A run with a ``result.json`` is read back, not
rerun, so an interrupted ablation continues (an unfinished run resumes from its last
checkpoint); a failed run is reported with its log and the others go on; the command
exits with status 1 if any failed. ``--finished_only`` tabulates the finished runs and
starts none.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from cmdcl_jax import ablation_table as table
from cmdcl_jax import atomic
from cmdcl_jax.cli import quiet_logs

VLMS = ("random", "pretrained")
# Fields each run gets from the ablation itself; --set may not change them.
OWN_FIELDS = ("seed", "model.tci", "model.vci", "model.clip", "dataset.data_dir")


@dataclasses.dataclass(frozen=True)
class Run:
    data: str
    vlm: str
    variant: str
    seed: int

    def workdir(self, root: Path) -> Path:
        return root / self.data / self.vlm / self.variant / f"seed{self.seed}"

    def key(self) -> dict:
        return dataclasses.asdict(self)


def load_config(config_file: str, data: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """``config_file:data`` with ``--config.<override>`` applied, parsed as the main job
    parses them (a misspelt key or a bad value fails here, before any run starts)."""
    argv = ["ablate", f"--config={config_file}:{data}", *(f"--config.{o}" for o in overrides)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


def check_options(config_file: str, variants, vlms, overrides) -> None:
    if ":" in Path(config_file).name:
        raise ValueError(f"--config={config_file}: give the config's argument with --data")
    for name, given, known in (("variants", variants, table.VARIANTS), ("vlm", vlms, VLMS)):
        unknown = [v for v in given if v not in known]
        if unknown:
            raise ValueError(f"--{name}: unknown {unknown}; expected some of {list(known)}")
    own = [o for o in overrides if o.split("=", 1)[0] in OWN_FIELDS]
    if own:
        raise ValueError(f"--set {own}: the ablation sets {', '.join(OWN_FIELDS)} itself")


def eval_splits(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The config's eval splits plus the training split (last: the first picks the best
    checkpoint); they must include test_iid and test_shifted."""
    d = config.dataset
    missing = [s for s in (table.IID, table.SHIFTED) if s not in d.eval_splits]
    if missing:
        raise ValueError(f"dataset.eval_splits={d.eval_splits} lacks {missing}")
    return tuple(s for s in d.eval_splits if s != d.train_split) + (d.train_split,)


def task_metric(config: ml_collections.ConfigDict) -> str:
    """acc1 or mAP: what the run's task is scored by."""
    from cmdcl_jax.data.pipeline import task_type  # here: it starts JAX's import
    from cmdcl_jax.train.setup import BEST_METRIC

    return BEST_METRIC[task_type(config.dataset.name, config.dataset.task)]


def pretrained_vlm(config: ml_collections.ConfigDict) -> Path:
    """The pretrained tiny VLM's directory, built into the data directory if missing."""
    from cmdcl_jax.pretrain_vlm import ensure_pretrained_vlm

    return ensure_pretrained_vlm(config)


def main_args(config_file: str, run: Run, data_dir: Path, splits, clip, overrides) -> list[str]:
    """The main job's command-line arguments for ``run``."""
    tci, vci = table.VARIANTS[run.variant][1:]
    args = [
        "--config",
        f"{Path(config_file).absolute()}:{run.data}",
        *(f"--config.{o}" for o in overrides),
        f"--config.dataset.data_dir={data_dir}",
        f"--config.dataset.eval_splits={splits}",
        f"--config.seed={run.seed}",
        f"--config.model.tci={tci}",
        f"--config.model.vci={vci}",
    ]
    return args + ([f"--config.model.clip={clip}"] if clip is not None else [])


def train_run(workdir: Path, args: list[str]) -> int:
    """Runs the main job in ``workdir``, its console in ``main.log``; on success writes
    the evaluation it printed to ``result.json``. Returns its exit status."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cmdcl_jax.main", "--workdir", str(workdir), *args]
    with open(workdir / "main.log", "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        out = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True)
        log.write(out.stdout)
    if out.returncode == 0:
        result = json.loads(out.stdout[out.stdout.index("{\n") :])
        atomic.write_text(workdir / "result.json", json.dumps(result, indent=2) + "\n")
    return out.returncode


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def run_ablation(
    root: Path,
    config_file: str,
    runs: list[Run],
    overrides: list[str],
    *,
    finished_only: bool = False,
) -> tuple[list[dict], list[str], str]:
    """Trains the unfinished ``runs`` (unless ``finished_only``) and reads every finished
    one. Returns one row per finished run, one line per failed run naming its log, and
    the metric of the task (acc1 or mAP)."""
    data_dir = (root / "data").absolute()
    configs = {
        data: load_config(config_file, data, [*overrides, f"dataset.data_dir={data_dir}"])
        for data in dict.fromkeys(r.data for r in runs)
    }
    metric = task_metric(next(iter(configs.values())))
    clips: dict[str, Path] = {}
    rows, failures, trained_seconds, trained = [], [], 0.0, 0
    todo = [r for r in runs if not (r.workdir(root) / "result.json").exists()]
    start = time.time()
    for i, run in enumerate(runs, 1):
        workdir, config = run.workdir(root), configs[run.data]
        name = f"[{i}/{len(runs)}] {run.data} {run.vlm} {run.variant} seed {run.seed}"
        splits = eval_splits(config)
        if not (workdir / "result.json").exists():
            if finished_only:
                continue
            clip = None
            if run.vlm == "pretrained":
                if run.data not in clips:
                    clips[run.data] = pretrained_vlm(config)
                clip = clips[run.data]
            print(f"{name}: training, log {workdir / 'main.log'}", flush=True)
            t = time.time()
            args = main_args(config_file, run, data_dir, splits, clip, overrides)
            code = train_run(workdir, args)
            trained_seconds += time.time() - t
            trained += 1
            left = len(todo) - trained
            eta = trained_seconds / trained * left
            timing = f"{_minutes(time.time() - t)}; elapsed {_minutes(time.time() - start)}"
            timing += f", ETA {_minutes(eta)} for {left} more"
            if code:
                log = workdir / "main.log"
                error = next((x for x in reversed(log.read_text().splitlines()) if x.strip()), "")
                failures.append(f"{name}: FAILED with exit status {code}, log {log}: {error}")
                print(f"{failures[-1]} ({timing})", flush=True)
                continue
        else:
            timing = "finished before, read back"
        step, evaluation = table.best_evaluation(workdir, splits[0], metric)
        # The training split first: the fit check reads it.
        ordered = [splits[-1], *splits[:-1]]
        rows.append(table.run_row(run.key(), step, evaluation, ordered, metric))
        values = " ".join(f"{k}={v:.3f}" for k, v in rows[-1].items() if isinstance(v, float))
        print(f"{name}: step {step} {values} ({timing})", flush=True)
    return rows, failures, metric


def write_tables(
    root: Path, rows: list[dict], failures: list[str], metric: str, command: str
) -> str:
    """Writes ablation.md (headed by the ``command`` that made it) and the CSVs in
    ``root``; returns the markdown."""
    summary, pairs = table.summary(rows), table.paired(rows, metric)
    parts = [
        "# Ablation (paper Table 3)",
        f"`{command}`",
        f"Mean ± std (population) over seeds of {metric} at each run's best checkpoint "
        f"(picked on the first eval split); gap: {table.IID} minus {table.SHIFTED}; "
        f"fit: {metric} >= {table.FIT} on the training split"
        + (
            f"; collapsed: at most {table.COLLAPSED_CLASSES} classes predicted on {table.IID}."
            if rows and "collapsed" in rows[0]
            else "."
        ),
    ]
    if rows:
        parts += ["## Variants", table.summary_markdown(summary, rows)]
    if pairs:
        parts += [
            f"## CMDCL against Variant 1 on {table.SHIFTED}, paired by seed ({metric})",
            table.paired_markdown(pairs),
        ]
    if rows:
        parts += ["## Runs", table.runs_markdown(rows)]
    if failures:
        parts += ["## Failed runs", "\n".join(f"- {f}" for f in failures)]
    markdown = "\n\n".join(parts) + "\n"
    (root / "ablation.md").write_text(markdown)
    table.write_csv(root / "ablation.csv", summary)
    table.write_csv(root / "ablation_paired.csv", pairs)
    table.write_csv(root / "ablation_runs.csv", rows)
    return markdown


def define_flags() -> None:
    """The command's flags, defined only when it is the entry point: the module is also
    imported as a library beside other entry points' flags (``--workdir``, ``--config``)."""
    flags.DEFINE_string(
        "config", "configs/synthetic.py", "Run config file; its argument comes from --data."
    )
    flags.DEFINE_string("workdir", None, "Runs, data and the tables go here.", required=True)
    flags.DEFINE_integer("seeds", 5, "Seeds 0..N-1 of every variant, VLM and data.")
    flags.DEFINE_list("variants", list(table.VARIANTS), "Variants (paper Table 3).")
    flags.DEFINE_list("vlm", list(VLMS), "The frozen CLIP: random, pretrained or both.")
    flags.DEFINE_list("data", ["default"], "Config arguments, e.g. default,unconfounded.")
    flags.DEFINE_multi_string("set", [], "Config override for every run: key=value.")
    flags.DEFINE_bool(
        "finished_only", False, "Tabulate the runs finished in --workdir; start none."
    )


def main(argv):
    del argv
    quiet_logs()
    f = flags.FLAGS
    check_options(f.config, f.variants, f.vlm, f.set)
    root = Path(f.workdir)
    root.mkdir(parents=True, exist_ok=True)
    # Seed-major, so an interrupted ablation has covered every variant, VLM and data.
    runs = [
        Run(data, vlm, variant, seed)
        for seed in range(f.seeds)
        for data in f.data
        for vlm in f.vlm
        for variant in f.variants
    ]
    start = time.time()
    rows, failures, metric = run_ablation(
        root, f.config, runs, f.set, finished_only=f.finished_only
    )
    command = "python -m cmdcl_jax.ablate " + shlex.join(sys.argv[1:])
    print("\n" + write_tables(root, rows, failures, metric, command))
    print(f"{len(rows)} runs finished, {len(failures)} failed, in {_minutes(time.time() - start)}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
