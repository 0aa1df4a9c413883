"""The paper's figures as PNG from a trained run's workdir, with the numbers they plot.

``python -m cmdcl_jax.report --workdir RUN [--compare RUN2] [--split test_shifted]
[--out DIR] [--step N] [--data_dir DIR] [--video I]``

Writes into ``--out`` (default ``RUN/report``): ``curves.png`` (metrics.jsonl),
``confusion.png`` (single-label tasks), ``per_class_ap.png``, and on CausalKitchen
``co_classification.png`` (Fig. 6) and ``matching.png`` (Figs. 1c / 5c, beside the
``--compare`` run's), and with TCI ``tci_scores.png`` (S over the frames of example
``--video``); and ``figures.json``: each figure's PNG and data, the checkpoint step used,
the run's logged evaluation of that step on the split, and why any figure was skipped.
The model comes from the newest readable checkpoint (or ``--step``) as in
``cmdcl_jax.predict``; the data from the run's ``dataset.data_dir`` unless ``--data_dir``.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags

from cmdcl_jax.cli import quiet_logs
from cmdcl_jax.report.build import make_report

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (holds run.json).", required=True)
_COMPARE = flags.DEFINE_string("compare", None, "A second run, for the matching figure.")
_SPLIT = flags.DEFINE_string("split", "test_shifted", "The split to evaluate on.")
_OUT = flags.DEFINE_string("out", None, "Where to write (default: WORKDIR/report).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest readable).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset dir (default: the run's).")
_VIDEO = flags.DEFINE_integer("video", 0, "Example of the split whose TCI scores are drawn.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_logs()
    workdir = Path(_WORKDIR.value)
    out = Path(_OUT.value) if _OUT.value else workdir / "report"
    compare = Path(_COMPARE.value) if _COMPARE.value else None
    report = make_report(
        workdir,
        out,
        _SPLIT.value,
        compare=compare,
        step=_STEP.value,
        data_dir=_DATA_DIR.value,
        video=_VIDEO.value,
    )
    for key, figure in report["figures"].items():
        print(f"{key}: {out / figure['png']}")
    for key, why in report["skipped"].items():
        print(f"{key}: skipped ({why})")
    print(f"data: {out / 'figures.json'}")


if __name__ == "__main__":
    app.run(main)
