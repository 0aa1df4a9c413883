r"""Writes a dataset's frame shards: `python -m cmdcl_jax.prepare <dataset> [flags]`.

  python -m cmdcl_jax.prepare breakfast --manual_dir ~/breakfast --data_dir ~/tfds \
      --num_frames 64 --short_side 256 --encoding jpeg --num_workers 8
  python -m cmdcl_jax.prepare causal_kitchen --data_dir ~/tfds --seed 0

Videos that are missing, fail to decode, have no label or a malformed annotation are
skipped; the list, with counts and the file and line of each malformed annotation, goes to
`prepare_report.json` beside the shards and to the console. `--strict` stops at the first
malformed annotation instead. An interrupted run resumes from the decoded-video cache on
the next call.
"""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

from absl import app, flags

from cmdcl_jax.cli import quiet_logs
from cmdcl_jax.data import builders

_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "The user's copy: videos + annotations.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir to write into.")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 64, "F, frames stored per video.")
_SHORT_SIDE = flags.DEFINE_integer("short_side", 256, "Frames' short side after resizing.")
_ENCODING = flags.DEFINE_enum("encoding", "jpeg", builders.ENCODINGS, "Frame storage.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 4, "Decoding processes (0: in-process).")
_STRICT = flags.DEFINE_bool(
    "strict", False, "Stop at a malformed annotation instead of skipping its video."
)
_SEED = flags.DEFINE_integer("seed", 0, "causal_kitchen only: the generator seed.")

REPORT_NAME = "prepare_report.json"


def prepare(
    dataset: str,
    manual_dir: str,
    data_dir: str,
    *,
    num_frames: int = 64,
    short_side: int = 256,
    encoding: str = "jpeg",
    num_workers: int = 0,
    strict: bool = False,
) -> dict:
    """Builds a real dataset's shards and its report of skipped videos.

    Args:
        strict: raise `AnnotationError` at the first malformed annotation instead of
            skipping its video.

    Returns:
        The report: dataset, config, written examples per split, skip counts by reason
        and the skipped videos. A dataset already prepared returns its stored report.
    """
    if dataset not in builders.BUILDERS:
        raise ValueError(f"unknown dataset {dataset!r}; one of {sorted(builders.BUILDERS)}")
    config = builders.video_config(num_frames, short_side, encoding)
    builder = builders.make_builder(
        builders.BUILDERS[dataset], config, data_dir, num_workers=num_workers, strict=strict
    )
    report_path = Path(builder.data_dir) / REPORT_NAME
    if builder.is_prepared() and report_path.exists():
        return json.loads(report_path.read_text())
    builder.download_and_prepare(
        download_config=builders.tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    reasons = collections.Counter(s["reason"].split(":")[0] for s in builder.skipped)
    report = {
        "dataset": dataset,
        "config": config.name,
        "written": {name: info.num_examples for name, info in builder.info.splits.items()},
        "skipped_counts": dict(sorted(reasons.items())),
        "skipped": builder.skipped,
    }
    report_path.write_text(json.dumps(report, indent=1))
    if builder.cache_dir is not None:
        shutil.rmtree(builder.cache_dir, ignore_errors=True)
    return report


def format_report(report: dict) -> str:
    """The console summary of a report."""
    lines = [f"{report['dataset']} ({report['config']}): written {report['written']}"]
    lines += [f"  skipped {n}: {reason}" for reason, n in report["skipped_counts"].items()]
    lines += [f"    {s['split']} {s['id']}: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    quiet_logs()
    if len(argv) != 2:
        raise app.UsageError(
            f"usage: prepare <dataset>, one of {[*builders.BUILDERS, 'causal_kitchen']}"
        )
    dataset = argv[1]
    if dataset == "causal_kitchen":
        config = builders.build_causal_kitchen(_DATA_DIR.value, seed=_SEED.value)
        print(f"causal_kitchen written to {_DATA_DIR.value}, config {config}")
        return
    if _MANUAL_DIR.value is None:
        raise app.UsageError(f"{dataset} needs --manual_dir")
    report = prepare(
        dataset,
        _MANUAL_DIR.value,
        _DATA_DIR.value,
        num_frames=_NUM_FRAMES.value,
        short_side=_SHORT_SIDE.value,
        encoding=_ENCODING.value,
        num_workers=_NUM_WORKERS.value,
        strict=_STRICT.value,
    )
    print(format_report(report))


if __name__ == "__main__":
    flags.mark_flag_as_required("data_dir")
    app.run(main)
