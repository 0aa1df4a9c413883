"""Grain loaders: shapes, the global training order on any process count, resumption from
a step, deterministic test views."""

import pickle
import shutil

import numpy as np
import pytest

from cmdcl_jax.data import order, pipeline
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


def _take(it, num_batches: int) -> list[dict]:
    batches = [next(it) for _ in range(num_batches)]
    it.close()
    return batches


def test_processes_share_the_global_batches_and_resume_from_a_step(kitchen):
    # 30 examples in global batches of 4: 7 an epoch, 2 examples left out of each.
    one = _take(_train(kitchen, seed=7, num_workers=0), 9)  # crosses the epoch boundary
    parts = [
        _take(_train(kitchen, seed=7, num_workers=0, process_index=p, process_count=2), 9)
        for p in range(2)
    ]
    for g, want in enumerate(one):
        for key in want:  # pixel for pixel: the augmentation ignores the process layout
            got = np.concatenate([parts[0][g][key], parts[1][g][key]])
            np.testing.assert_array_equal(got, want[key], err_msg=f"batch {g} {key}")
    epochs = [np.concatenate([b["index"] for b in one[:7]]), one[7]["index"]]
    assert len(set(epochs[0])) == 28 and set(epochs[0]) <= set(range(30))
    assert not np.array_equal(epochs[1], epochs[0][:4])  # epoch 1 is shuffled anew
    resumed = _take(_train(kitchen, seed=7, num_workers=0, start_step=5, process_index=1,
                           process_count=2), 4)  # fmt: skip
    for g, got in enumerate(resumed, start=5):
        for key in got:
            np.testing.assert_array_equal(got[key], parts[1][g][key], err_msg=f"batch {g} {key}")
    other_seed = _take(_train(kitchen, seed=8, num_workers=0), 1)[0]
    assert not np.array_equal(other_seed["video"], one[0]["video"])


def test_epoch_order_is_whole_batches_of_a_fresh_permutation():
    stream = order.EpochOrder(10, 4, seed=3, num_epochs=2)
    assert len(stream) == 16  # floor(10 / 4) = 2 batches an epoch
    epochs = [[stream[i] for i in range(8 * e, 8 * e + 8)] for e in range(2)]
    for e, taken in enumerate(epochs):
        assert taken == list(stream.permutation(e)[:8]) and len(set(taken)) == 8
    assert epochs[0] != epochs[1]
    copy = pickle.loads(pickle.dumps(stream))  # as grain's worker processes get it
    assert [copy[i] for i in range(16)] == epochs[0] + epochs[1]
    with pytest.raises(IndexError, match="stream position 16 not in"):
        stream[16]
    with pytest.raises(ValueError, match="batch_size 12 is more than the 10 examples"):
        order.EpochOrder(10, 12, seed=3, num_epochs=None)


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
