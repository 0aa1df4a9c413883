r"""Benchmark: clips/s of the grain pipeline from frame shards vs decoding videos with PyAV.

Writes synthetic H.264 videos in the Charades layout, prepares them into shards (JPEG and
raw), then times training batches of L frames cropped to S from (a) the shards and (b) the
videos decoded on the fly (L segment-centre frames per clip, short side 256), with the
same augmentation, batching and worker processes.

  python benchmarks/input_pipeline.py --num_videos 24 --seconds 60 --workers 2
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import grain
import numpy as np
from absl import app, flags

from cmdcl_jax import prepare
from cmdcl_jax.data import pipeline, video
from cmdcl_jax.data.transforms import TrainTransform

_NUM_VIDEOS = flags.DEFINE_integer("num_videos", 24, "Videos to write.")
_SECONDS = flags.DEFINE_integer("seconds", 60, "Length of each video, seconds.")
_FPS = flags.DEFINE_integer("fps", 15, "Frame rate of the videos.")
_STORED = flags.DEFINE_integer("stored_frames", 64, "F, frames per video in the shards.")
_FRAMES = flags.DEFINE_integer("clip_length", 8, "L, frames per clip.")
_CROP = flags.DEFINE_integer("crop_size", 224, "S, crop side.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Clips per batch.")
_BATCHES = flags.DEFINE_integer("batches", 12, "Batches timed, after one warm-up batch.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Grain worker processes.")


def write_videos(root: Path, num_videos: int, seconds: int, fps: int) -> None:
    """Charades-layout copy of moving, textured 320x240 H.264 videos."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "Charades_v1_classes.txt").write_text(
        "".join(f"c{i:03d} class {i}\n" for i in range(157))
    )
    header = (
        "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length"
    )
    rows = [header]
    yy, xx = np.mgrid[:240, :320]
    texture = rng.integers(0, 60, (240, 320, 3)) + (yy % 32)[..., None]  # [H, W, 3]
    for v in range(num_videos):
        frames = (
            (((xx + 3 * t + 40 * v) % 256)[..., None] * 0.7 + texture) % 256
            for t in range(seconds * fps)
        )  # a horizontally moving ramp over a fixed texture, [H, W, 3] each
        video.write_video(str(root / f"V{v:04d}.mp4"), frames, fps, "libx264")
        rows.append(f"V{v:04d},S,K,5,5,Yes,x,,,c{v % 157:03d} 0.0 1.0,{seconds}.0")
    (root / "Charades_v1_train.csv").write_text("\n".join(rows) + "\n")
    (root / "Charades_v1_test.csv").write_text(header + "\n")


class OnTheFly:
    """A data source that decodes L segment-centre frames of each video with PyAV."""

    def __init__(self, paths: list[str], num_frames: int):
        self.paths, self.num_frames = paths, num_frames

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        frames = video.read_frames(self.paths[i], self.num_frames, short_side=256)
        return {"frames": frames, "label": np.int32(0), "index": np.int32(i)}


def on_the_fly_loader(paths: list[str]) -> grain.DatasetIterator:
    """The training pipeline of `pipeline.make_train_loader`, reading the videos instead."""
    transform = TrainTransform(_FRAMES.value, _CROP.value)
    ds = (
        grain.MapDataset.source(OnTheFly(paths, _FRAMES.value))
        .shuffle(seed=0)
        .repeat()
        .random_map(transform, seed=0)
        .batch(_BATCH.value, drop_remainder=True)
        .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    )
    if _WORKERS.value:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=_WORKERS.value))
    return iter(ds)


def clips_per_second(it: grain.DatasetIterator) -> float:
    """Clips/s over `batches` batches after one warm-up batch (worker start-up excluded)."""
    batch = next(it)
    assert batch["video"].shape == (_BATCH.value, _FRAMES.value, _CROP.value, _CROP.value, 3)
    start = time.perf_counter()
    for _ in range(_BATCHES.value):
        next(it)
    rate = _BATCHES.value * _BATCH.value / (time.perf_counter() - start)
    it.close()
    return rate


def main(argv):
    del argv
    with tempfile.TemporaryDirectory() as tmp:
        manual, data_dir = Path(tmp) / "videos", str(Path(tmp) / "tfds")
        write_videos(manual, _NUM_VIDEOS.value, _SECONDS.value, _FPS.value)
        rows = []
        for encoding in ("jpeg", "raw"):
            start = time.perf_counter()
            report = prepare.prepare(
                "charades", str(manual), data_dir, num_frames=_STORED.value,
                short_side=256, encoding=encoding, num_workers=_WORKERS.value,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            config = report["config"]
            size = sum(p.stat().st_size for p in (Path(data_dir) / "charades" / config).rglob("*"))
            it = pipeline.make_train_loader(
                "charades", data_dir, task="action", config=config, batch_size=_BATCH.value,
                num_frames=_FRAMES.value, crop_size=_CROP.value, num_workers=_WORKERS.value,
            )  # fmt: skip
            rows.append(
                (f"grain, shards ({encoding}, F={_STORED.value})", clips_per_second(it),
                 f"{seconds:.0f} s prepare, {size / 2**20:.0f} MiB")
            )  # fmt: skip
        paths = sorted(str(p) for p in manual.glob("*.mp4"))
        rows.append(
            ("grain, PyAV decode on the fly", clips_per_second(on_the_fly_loader(paths)), "")
        )
    print(
        f"{_NUM_VIDEOS.value} videos of {_SECONDS.value} s at {_FPS.value} fps, 320x240 H.264; "
        f"L={_FRAMES.value}, crop {_CROP.value}, batch {_BATCH.value}, {_WORKERS.value} workers"
    )
    print("| source | clips/s | notes |\n| --- | --- | --- |")
    for name, rate, notes in rows:
        print(f"| {name} | {rate:.1f} | {notes} |")


if __name__ == "__main__":
    app.run(main)
