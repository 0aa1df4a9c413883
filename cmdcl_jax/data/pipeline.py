"""Grain input pipelines over the frame shards written by `cmdcl_jax.data.builders`.

Both loaders return a grain `DatasetIterator` of batches

* `video`: uint8 [B_local, L, S, S, 3] ([B_local, V, L, S, S, 3] with V > 1 test views);
  normalisation happens on the device;
* `label`: int32 [B_local] for single-label tasks, float32 multi-hot [B_local, C] else;
* `index`: int32 [B_local], the example's position in its split;
* `mask`: bool [B_local], False for entries that only pad the last batch.

`batch_size` is global: each of the `process_count` processes gets B_local =
batch_size / process_count examples. Training reads one global stream (`order.EpochOrder`)
whose global batches do not depend on the process count: process p takes the p-th
contiguous B_local of each, and a run resumes from its step alone (`start_step`).
Evaluation gives process p the examples p, p + P, ... of the split.
"""

from __future__ import annotations

import math
from pathlib import Path

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader

from cmdcl_jax.data import builders, order
from cmdcl_jax.data.transforms import EvalTransform, LabelledFrames, TrainTransform


def task_type(dataset: str, task: str) -> str:
    """ "single" (softmax, accuracy) or "multi" (sigmoid, mAP) for a dataset's task."""
    try:
        return builders.TASKS[dataset][task][0]
    except KeyError:
        tasks = {d: list(t) for d, t in builders.TASKS.items()}
        raise KeyError(f"unknown dataset/task {dataset!r}/{task!r}; known: {tasks}") from None


def dataset_dir(dataset: str, data_dir: str, config: str | None = None) -> Path:
    """`<data_dir>/<dataset>/<config>/<newest version>`; `config` may be left out if one."""
    root = Path(data_dir) / dataset
    if config is None:
        configs = sorted(p.name for p in root.glob("[!.]*") if p.is_dir())
        if len(configs) != 1:
            raise FileNotFoundError(f"{root}: pass config=, one of {configs}")
        config = configs[0]
    versions = sorted(
        (p for p in (root / config).glob("*.*.*") if (p / "dataset_info.json").exists()),
        key=lambda p: tuple(int(x) for x in p.name.split(".")),
    )
    if not versions:
        raise FileNotFoundError(f"{root / config}: no prepared version (run cmdcl_jax.prepare)")
    return versions[-1]


def load_builder(dataset: str, data_dir: str, config: str | None = None):
    """The read-only TFDS builder of a prepared dataset."""
    return tfds.builder_from_directory(dataset_dir(dataset, data_dir, config))


def check_split(builder, split: str) -> None:
    """Checks that ``split`` exists and that each of its shards opens with its recorded
    number of records.

    Raises:
        KeyError: no such split, naming the splits there are.
        OSError: naming the first shard that cannot be read (truncated, overwritten).
    """
    if split not in builder.info.splits:
        raise KeyError(f"{builder.data_path}: no split {split!r}; has {list(builder.info.splits)}")
    info = builder.info.splits[split]
    for path, expected in zip(info.filepaths, info.shard_lengths, strict=True):
        try:
            reader = ArrayRecordReader(str(path))
            found = reader.num_records()
            reader.close()
        except Exception as err:  # noqa: BLE001 - the reader's errors have no common type
            raise OSError(f"{path}: unreadable shard ({err}); prepare the dataset again") from err
        if found != expected:
            raise OSError(f"{path}: {found} records, expected {expected}; prepare it again")


class NamedShards:
    """A split's data source whose read errors name the shard file (grain workers pickle it)."""

    def __init__(self, source, paths: list, lengths: list[int]):
        self.source, self.paths = source, [str(p) for p in paths]
        self.ends = np.cumsum(lengths)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            return self.source[index]
        except Exception as err:  # noqa: BLE001 - the reader's errors have no common type
            shard = int(np.searchsorted(self.ends, index, side="right"))
            raise OSError(
                f"{self.paths[shard]}: unreadable record ({err}); prepare the dataset again"
            ) from err


def open_split(dataset: str, data_dir: str, split: str, config: str | None = None):
    """The split's random-access data source, after :func:`check_split`."""
    builder = load_builder(dataset, data_dir, config)
    check_split(builder, split)
    info = builder.info.splits[split]
    return NamedShards(builder.as_data_source(split), info.filepaths, info.shard_lengths)


def split_column(
    dataset: str, data_dir: str, split: str, field: str, config: str | None = None
) -> np.ndarray:
    """One scalar field of every example of a split, by example index: [N]."""
    source = open_split(dataset, data_dir, split, config)
    return np.array([source[i][field] for i in range(len(source))])


def class_names(dataset: str, task: str, data_dir: str, config: str | None = None) -> list[str]:
    """Readable class names of a task, in label order, from the dataset's metadata."""
    task_type(dataset, task)
    return list(load_builder(dataset, data_dir, config).info.metadata["tasks"][task]["names"])


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} not in [0, {count})")
    return index, count


def _local_batch(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} not divisible by {process_count} processes")
    return batch_size // process_count


def _finish(ds: grain.MapDataset, num_workers: int, prefetch: int) -> grain.DatasetIterator:
    """Batches (already formed) -> threads and worker processes -> an iterator."""
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch))
    if num_workers > 0:
        options = grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=prefetch
        )
        it = it.mp_prefetch(options)
    return iter(it)


def make_train_loader(
    dataset: str,
    data_dir: str,
    *,
    task: str,
    batch_size: int,
    num_frames: int,
    crop_size: int,
    config: str | None = None,
    split: str = "train",
    seed: int = 0,
    num_epochs: int | None = None,
    start_step: int = 0,
    scale: tuple[float, float] = (0.25, 1.0),
    flip: bool = True,
    fixed_view: bool = False,
    num_workers: int = 2,
    prefetch: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """This process's part of the global batches of the training stream, from `start_step`.

    Global batch g is positions [g * B, (g + 1) * B) of the stream (`order.EpochOrder`: a
    permutation of the split per epoch from (seed, epoch), floor(N / B) batches an epoch);
    process p gets positions [g * B + p * B_local, g * B + (p + 1) * B_local). The
    augmentation of each position is drawn from (seed, position), so the global batches are
    the same, pixel for pixel, on any number of processes.

    Args:
        dataset: "breakfast", "coin", "charades" or "causal_kitchen".
        data_dir: the TFDS data dir the dataset was prepared into.
        task: the task whose label goes in `label` (see `builders.TASKS`).
        batch_size: global batch size B, divisible by the process count.
        num_frames: L, frames sampled per clip (one per segment, random in the segment).
        crop_size: S, the side of the random resized crop.
        config: the builder config name, if the dataset has several.
        split: split to read.
        seed: seeds the order and the augmentation; the same seed gives the same batches.
        num_epochs: None repeats forever.
        start_step: global batches already consumed (a resumed run's step); the iterator
            starts with global batch `start_step`.
        scale: range of the crop's share of the frame area.
        flip: random horizontal flip.
        fixed_view: every clip in the evaluation view instead (segment middles, centre
            crop, no flip; `scale` and `flip` unused): the view a CLIP feature cache
            holds exactly.
        num_workers: grain worker processes (0: in this process).
        prefetch: batches buffered per worker.
        process_index: this process; defaults to `jax.process_index()`.
        process_count: defaults to `jax.process_count()`.
    """
    index, count = _process(process_index, process_count)
    local_batch = _local_batch(batch_size, count)
    source = open_split(dataset, data_dir, split, config)
    stream = order.EpochOrder(len(source), batch_size, seed, num_epochs)
    multi = task_type(dataset, task) == "multi"
    ds = grain.MapDataset.source(LabelledFrames(source, stream, None, task, multi))
    if fixed_view:
        ds = ds.map(eval_transform(num_frames, crop_size))
    else:  # random_map seeds each element by its index in `ds`: the global stream position.
        ds = ds.random_map(TrainTransform(num_frames, crop_size, scale=scale, flip=flip), seed=seed)
    # Chunk k of B_local positions is process k % P's part of global batch k // P.
    ds = ds.batch(local_batch)[start_step * count + index :: count]
    return _finish(ds, num_workers, prefetch)


def eval_transform(
    num_frames: int,
    crop_size: int,
    resize_to: int | None = None,
    num_clips: int = 1,
    num_crops: int = 1,
) -> EvalTransform:
    """The evaluation view; ``resize_to`` defaults to crop_size * 8 / 7 (256 for 224)."""
    resize_to = resize_to or round(crop_size * 8 / 7)
    return EvalTransform(num_frames, crop_size, resize_to, num_clips, num_crops)


def eval_indices(
    num_examples: int, process_index: int, process_count: int, local_batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """This process's examples for evaluation, padded so every process has as many batches.

    Process p takes examples p, p + P, ...; every process pads to
    ceil(ceil(N / P) / B_local) * B_local entries with copies of its first example.

    Returns:
        (int [n] example indices, bool [n] mask of the real entries).
    """
    own = np.arange(process_index, num_examples, process_count)
    padded = math.ceil(math.ceil(num_examples / process_count) / local_batch) * local_batch
    indices = np.full(padded, own[0] if len(own) else 0, np.int64)
    indices[: len(own)] = own
    return indices, np.arange(padded) < len(own)


def make_eval_loader(
    dataset: str,
    data_dir: str,
    *,
    task: str,
    batch_size: int,
    num_frames: int,
    crop_size: int,
    config: str | None = None,
    split: str = "test",
    resize_to: int | None = None,
    num_clips: int = 1,
    num_crops: int = 1,
    num_workers: int = 2,
    prefetch: int = 2,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """One deterministic pass over a split; every example is in exactly one process's batches.

    Args:
        dataset, data_dir, task, batch_size, num_frames, crop_size, config, num_workers,
        prefetch, process_index, process_count: as for `make_train_loader`.
        split: split to read ("test", or "test_iid" / "test_shifted" for CausalKitchen).
        resize_to: short side before the centre crop (default: see `eval_transform`).
        num_clips: temporal views (offsets within each segment).
        num_crops: spatial views along the long side.
    """
    index, count = _process(process_index, process_count)
    source = open_split(dataset, data_dir, split, config)
    indices, mask = eval_indices(len(source), index, count, _local_batch(batch_size, count))
    multi = task_type(dataset, task) == "multi"
    transform = eval_transform(num_frames, crop_size, resize_to, num_clips, num_crops)
    ds = grain.MapDataset.source(LabelledFrames(source, indices, mask, task, multi))
    ds = ds.map(transform).batch(_local_batch(batch_size, count))
    return _finish(ds, num_workers, prefetch)
