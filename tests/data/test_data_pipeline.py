"""Grain loaders: shapes, per-process shards, resumption, deterministic test views."""

import json
import shutil

import numpy as np
import pytest

from cmdcl_jax.data import pipeline
from cmdcl_jax.data.transforms import segment_indices


def _train(kitchen, **kwargs):
    data_dir, config = kitchen
    args = dict(task="activity", batch_size=4, num_frames=4, crop_size=16, config=config)
    return pipeline.make_train_loader("causal_kitchen", data_dir, **{**args, **kwargs})


def _eval(kitchen, **kwargs):
    data_dir, config = kitchen
    args = dict(task="actions", batch_size=6, num_frames=4, crop_size=16, config=config)
    args.update(split="test_shifted", num_workers=0)
    return pipeline.make_eval_loader("causal_kitchen", data_dir, **{**args, **kwargs})


def test_segment_sampling():
    np.testing.assert_array_equal(segment_indices(8, 4), [1, 3, 5, 7])
    np.testing.assert_array_equal(segment_indices(8, 4, offset=0.0), [0, 2, 4, 6])
    drawn = segment_indices(8, 4, rng=np.random.default_rng(0))
    assert all(2 * i <= j < 2 * i + 2 for i, j in enumerate(drawn))
    np.testing.assert_array_equal(segment_indices(2, 4), [0, 0, 1, 1])


def test_batch_shapes_and_dtypes(kitchen):
    it = _train(kitchen, num_workers=0)
    batch = next(it)
    assert batch["video"].shape == (4, 4, 16, 16, 3) and batch["video"].dtype == np.uint8
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert batch["index"].dtype == np.int32 and batch["mask"].all()
    batch = next(_eval(kitchen, num_clips=2, num_crops=3))
    assert batch["video"].shape == (6, 6, 4, 16, 16, 3)
    assert batch["label"].shape == (6, 14) and batch["label"].dtype == np.float32


def test_breakfast_jpeg_shards_through_the_loader(prepared):
    data_dir, _ = prepared["breakfast"]
    it = pipeline.make_eval_loader(
        "breakfast", data_dir, task="actions", batch_size=2, num_frames=3, crop_size=12,
        split="train", num_workers=0,
    )  # fmt: skip
    batch = next(it)
    assert batch["video"].shape == (2, 3, 12, 12, 3) and batch["label"].shape == (2, 48)
    assert pipeline.task_type("breakfast", "actions") == "multi"
    assert pipeline.task_type("coin", "task") == "single"


def test_eval_shards_disjoint_and_cover_split(kitchen):
    seen, num_batches = [], set()
    for process in range(3):
        batches = list(_eval(kitchen, process_index=process, process_count=3))
        num_batches.add(len(batches))
        for b in batches:
            assert b["video"].shape[0] == 2  # B_local = 6 / 3
            seen += list(b["index"][b["mask"]])
    assert sorted(seen) == list(range(13))  # every test video exactly once
    assert num_batches == {3}  # ceil(ceil(13 / 3) / 2): equal on every process


def test_train_shards_disjoint_and_cover_split(kitchen):
    shards = []
    for process in range(2):
        it = _train(kitchen, batch_size=2, num_epochs=1, num_workers=0,
                    process_index=process, process_count=2)  # fmt: skip
        shards.append({int(i) for b in it for i in b["index"]})
    assert not shards[0] & shards[1]
    assert shards[0] | shards[1] == set(range(30))


def test_resume_gives_identical_batches(kitchen):
    it = _train(kitchen, num_workers=2, seed=7)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(9)]  # crosses the 7-batch epoch boundary
    it.close()
    resumed = _train(kitchen, num_workers=2, seed=7)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    resumed.close()


def test_test_time_sampling_is_deterministic(kitchen):
    first = list(_eval(kitchen))
    second = list(_eval(kitchen, num_workers=2))
    assert len(first) == len(second) == 3
    for a, b in zip(first, second, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_garbled_record_is_named_by_its_shard(kitchen, tmp_path):
    data_dir, config = kitchen
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    shard = sorted(copy.glob("causal_kitchen/*/*/*train.array_record*"))[0]
    data = bytearray(shard.read_bytes())
    data[2000:2100] = bytes(b ^ 0xFF for b in data[2000:2100])  # inside a chunk of records
    shard.write_bytes(bytes(data))
    source = pipeline.open_split("causal_kitchen", str(copy), "train", config)  # index intact
    with pytest.raises(OSError, match=f"{shard}: unreadable record"):
        for i in range(len(source)):
            source[i]
