"""Nothing of a run lost or silently corrupted: start-up files written whole, the workdir
lock, run.json, retention, restores that check and fall back, checks before step 1,
predict. Each case asserts its message and that nothing else on disk changed."""

import json
import os
import shutil
import socket
import subprocess
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from flax import nnx
from synthetic_runs import (
    TRAINED,
    checkpoint_steps,
    metrics_lines,
    saved_state,
    snapshot,
    synthetic,
)

from cmdcl_jax import atomic, train
from cmdcl_jax.data import pipeline
from cmdcl_jax.data.transforms import take_frames
from cmdcl_jax.data.video import write_video
from cmdcl_jax.train import loop, metrics_log, run_record, setup, validation
from cmdcl_jax.train.checkpoints import CheckpointMismatchError, Checkpoints, retained_steps
from cmdcl_jax.train.lock import WorkdirLock, WorkdirLockedError

NAMES = tuple(f"make dish {i}" for i in range(8))


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the shared trained workdir, free to damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    return copy


def _tiny_clip_setup(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    task = setup.Task("causal_kitchen", "activity", "single", NAMES, None)
    model_cfg = setup.model_config(synthetic(tmp_path / "data"), workdir)
    return workdir, task, model_cfg


def _assert_prompts_distinct(clip_dir, model_cfg):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(clip_dir))
    ids = {tuple(tokenizer(model_cfg.prompt_template.format(n))["input_ids"]) for n in NAMES}
    assert len(ids) == len(NAMES)
    assert atomic.directory_damage(clip_dir) is None


def test_tiny_clip_killed_between_weights_and_tokenizer_leaves_no_directory(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    workdir, task, model_cfg = _tiny_clip_setup(tmp_path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        setup.ensure_tiny_clip(model_cfg, task, workdir, 32)
    assert not (workdir / "tiny_clip").exists()  # the weights went to a temporary name
    monkeypatch.undo()
    setup.ensure_tiny_clip(model_cfg, task, workdir, 32)
    assert sorted(p.name for p in workdir.iterdir()) == ["tiny_clip"]  # the partial is gone
    _assert_prompts_distinct(workdir / "tiny_clip", model_cfg)


def test_half_written_tiny_clip_is_named_and_rebuilt(tmp_path, caplog):
    workdir, task, model_cfg = _tiny_clip_setup(tmp_path)
    setup.ensure_tiny_clip(model_cfg, task, workdir, 32)
    clip_dir = workdir / "tiny_clip"
    whole = snapshot(clip_dir)
    for p in clip_dir.iterdir():  # what an unprotected write killed after the weights leaves
        if p.name != "model.safetensors":
            p.unlink()
    setup.ensure_tiny_clip(model_cfg, task, workdir, 32)
    assert f"{clip_dir} is damaged (no .manifest.json" in caplog.text
    assert snapshot(clip_dir).keys() == whole.keys()
    _assert_prompts_distinct(clip_dir, model_cfg)


def test_truncated_run_json_is_named_and_restored_from_a_checkpoint(run_copy, caplog):
    file = run_copy / "run.json"
    original = file.read_text()
    file.write_text(original[: len(original) // 2])
    before = snapshot(run_copy)
    with pytest.raises(run_record.RunRecordError, match=f"{file}: damaged, not JSON"):
        run_record.read(run_copy)
    checkpoints = Checkpoints(run_copy)
    kwargs = dict(
        latest_step=checkpoints.latest_step(),
        allow_config_change=False,
        recover=checkpoints.run_record,
    )
    run_record.reconcile(run_copy, json.loads(original), **kwargs)
    assert f"{file}: damaged, not JSON" in caplog.text
    assert json.loads(file.read_text()) == json.loads(original)
    after = snapshot(run_copy)
    assert after.pop("run.json.damaged") == before.pop("run.json")
    after.pop("run.json")
    assert after == before
    file.unlink()  # a missing one too
    run_record.reconcile(run_copy, json.loads(original), **kwargs)
    assert f"{file}: missing; rewritten from the newest checkpoint's copy" in caplog.text
    assert json.loads(file.read_text()) == json.loads(original)


def test_truncated_run_json_without_checkpoints_is_rewritten(tmp_path, caplog):
    record = {key: key for key in run_record.REQUIRED}
    (tmp_path / "run.json").write_text('{"dataset": "causal_ki')
    kwargs = dict(latest_step=None, allow_config_change=False, recover=lambda: None)
    run_record.reconcile(tmp_path, record, **kwargs)
    assert "rewritten from this config (no checkpoint)" in caplog.text
    assert run_record.read(tmp_path) == {**record, "config_changes": []}
    assert (tmp_path / "run.json.damaged").read_text() == '{"dataset": "causal_ki'
    (tmp_path / "run.json").write_text("")  # with checkpoints and no copy: refused
    with pytest.raises(run_record.RunRecordError, match=r"run\.json: damaged.*restore the file"):
        run_record.reconcile(tmp_path, record, **{**kwargs, "latest_step": 10})


def test_changed_config_is_listed_and_refused(run_copy, data_dir):
    before = snapshot(run_copy)
    config = synthetic(data_dir, **{**TRAINED, "train.learning_rate": 1e-3})
    with pytest.raises(
        run_record.RunRecordError,
        match=r"config\.train\.learning_rate: 0\.003 -> 0\.001\nPass --allow_config_change",
    ):
        train.train_and_evaluate(config, run_copy)
    assert snapshot(run_copy) == before


def test_accepted_and_resumable_changes(tmp_path):
    record = {"config": {"train": {"learning_rate": 0.1}, "eval": {"batch_size": 8}}}
    for key in run_record.REQUIRED:
        record.setdefault(key, key)
    kwargs = dict(allow_config_change=False, recover=lambda: None)
    run_record.reconcile(tmp_path, record, latest_step=None, **kwargs)
    faster = json.loads(json.dumps(record))
    faster["config"]["train"]["learning_rate"] = 0.2
    with pytest.raises(run_record.RunRecordError, match="learning_rate: 0.1 -> 0.2"):
        run_record.reconcile(tmp_path, faster, latest_step=30, **kwargs)
    run_record.reconcile(
        tmp_path, faster, latest_step=30, **{**kwargs, "allow_config_change": True}
    )
    (change,) = run_record.read(tmp_path)["config_changes"]
    assert change["step"] == 30
    assert change["changes"] == {"config.train.learning_rate": [0.1, 0.2]}
    bigger_eval = json.loads(json.dumps(faster))
    bigger_eval["config"]["eval"]["batch_size"] = 64  # resumable: accepted without the flag
    run_record.reconcile(tmp_path, bigger_eval, latest_step=40, **kwargs)
    written = run_record.read(tmp_path)
    assert written["config"]["eval"]["batch_size"] == 64 and len(written["config_changes"]) == 1
    newer_code = json.loads(json.dumps(bigger_eval))  # a field the recorded run did not have
    newer_code["config"]["train"]["new_knob"] = "off"
    run_record.reconcile(tmp_path, newer_code, latest_step=50, **kwargs)
    assert run_record.read(tmp_path)["config"]["train"]["new_knob"] == "off"
    removed = json.loads(json.dumps(newer_code))
    del removed["config"]["train"]["learning_rate"]  # one it had is still a change
    with pytest.raises(run_record.RunRecordError, match="learning_rate: 0.2 -> null"):
        run_record.reconcile(tmp_path, removed, latest_step=60, **kwargs)


def test_retention_is_the_last_keep_plus_the_best():
    steps = [10, 20, 30, 40, 50, 60]
    assert retained_steps(steps, 2, {}) == {50, 60}
    assert retained_steps(steps, 2, {10: 0.9, 20: 0.5, 60: 0.7}) == {10, 50, 60}
    assert retained_steps(steps, 1, {20: 0.9, 40: 0.9, 30: float("nan")}) == {40, 60}
    assert retained_steps([30], 3, {30: 0.1}) == {30}


def test_misspelt_eval_split_stops_the_run_before_step_1(run_copy, data_dir):
    before = snapshot(run_copy)
    config = synthetic(
        data_dir, **{"dataset.eval_splits": ("test_iid", "test_shiftd"), "train.num_steps": 400}
    )
    with pytest.raises(
        ValueError, match=r"config\.dataset\.eval_splits: .*no split 'test_shiftd'; has .*"
    ):
        train.train_and_evaluate(config, run_copy, allow_config_change=True)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"checkpoint.every_steps": 0}, r"config\.checkpoint\.every_steps=0: must be at least 1"),
        ({"log_every": 0}, r"config\.log_every=0: must be at least 1"),
        ({"train.accum_steps": 3}, r"config\.train\.batch_size=16: not divisible by accum"),
        ({"eval.batch_size": -8}, r"config\.eval\.batch_size=-8: must be at least 1"),
        ({"dataset.eval_splits": ()}, r"config\.dataset\.eval_splits=\(\): needs at least one"),
    ],
)
def test_bad_config_is_named_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(synthetic(tmp_path / "data", **overrides), tmp_path / "run")
    assert not list(tmp_path.iterdir())
    validation.check_config(synthetic(tmp_path, **{"eval.every_steps": 0}), 1)  # end only


def test_second_run_is_refused_naming_the_holder(run_copy, data_dir):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock = {"host": socket.gethostname(), "pid": holder.pid, "started": time.time()}
        (run_copy / "lock").write_text(json.dumps(lock))
        before = snapshot(run_copy)
        with pytest.raises(
            WorkdirLockedError, match=f"in use by another run \\(PID {holder.pid} on "
        ):
            train.train_and_evaluate(synthetic(data_dir, **TRAINED), run_copy)
        assert snapshot(run_copy) == before
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_and_another_host_is_refused(tmp_path, caplog):
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock_file = tmp_path / "lock"
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "started": 1}))
    with WorkdirLock(tmp_path):
        assert f"taking over the stale lock of PID {gone.pid}" in caplog.text
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists()
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": gone.pid, "started": 1}))
    with pytest.raises(WorkdirLockedError, match=f"PID {gone.pid} on elsewhere"):
        WorkdirLock(tmp_path).__enter__()
    assert json.loads(lock_file.read_text())["host"] == "elsewhere"
    lock_file.write_text("{")
    with pytest.raises(WorkdirLockedError, match=f"{lock_file}: unreadable lock"):
        WorkdirLock(tmp_path).__enter__()


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(
    trained, run_copy, data_dir, monkeypatch, caplog
):
    """Also shows that the final checkpoint is saved before the evaluation starts."""
    steps = checkpoint_steps(run_copy)
    newest = run_copy / "checkpoints" / "300"
    for data_file in newest.glob("state/**/d/*"):  # the array data, cut short
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    damaged = snapshot(newest)

    def failing(*args):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(loop, "evaluate_splits", failing)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train.train_and_evaluate(synthetic(data_dir, **TRAINED), run_copy)
    assert f"checkpoint step 300 is damaged ({newest}" in caplog.text
    assert f'of local file "{newest}/state/d/' in caplog.text  # the damaged file
    assert snapshot(run_copy / "damaged_checkpoints" / "300") == damaged
    assert checkpoint_steps(run_copy) == steps
    want, got = saved_state(trained[0], 300), saved_state(run_copy, 300)
    pairs = list(zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True))
    assert pairs and all(np.array_equal(a, b) for a, b in pairs)
    logged = [(x["step"], x["split"]) for x in metrics_lines(run_copy)]
    assert len(logged) == len(set(logged))


def test_checkpoint_that_still_holds_iterator_state_restores(tmp_path):
    """Checkpoints once held every process's grain iterator state as item ``data``."""
    state = {"step": jnp.int32(3), "params": {"w": jnp.arange(4.0)}}
    iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
    next(iterator)
    handlers = {
        "state": ocp.PyTreeCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "run": ocp.JsonCheckpointHandler(),
    }
    with ocp.CheckpointManager(tmp_path / "checkpoints", item_handlers=handlers) as old:
        old.save(
            3,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data=grain.checkpoint.CheckpointSave(iterator),
                run=ocp.args.JsonSave({"seed": 0}),
            ),
        )
    assert (tmp_path / "checkpoints/3/data").is_dir()
    checkpoints = Checkpoints(tmp_path, async_save=False)
    restored, step = checkpoints.restore({"step": jnp.int32(0), "params": {"w": jnp.zeros(4)}})
    assert step == 3 and int(restored["step"]) == 3
    np.testing.assert_array_equal(restored["params"]["w"], [0.0, 1.0, 2.0, 3.0])
    assert checkpoints.run_record() == {"seed": 0}


@pytest.mark.parametrize("change", ["one class fewer", "no VCI", "classes swapped"])
def test_predict_refuses_a_run_json_that_does_not_fit_the_checkpoint(run_copy, change):
    from cmdcl_jax.predict import load_model

    file = run_copy / "run.json"
    run = json.loads(file.read_text())
    if change == "one class fewer":
        run["class_names"] = run["class_names"][:-1]
        error, message = CheckpointMismatchError, r"does not fit this model .* vs model"
    elif change == "no VCI":
        run["model"]["vci"] = False
        error, message = CheckpointMismatchError, r"in the checkpoint, not in the model"
    else:
        run["class_names"] = run["class_names"][::-1]
        error, message = run_record.RunRecordError, r"another model or task.*\n  class_names"
    file.write_text(json.dumps(run))
    before = snapshot(run_copy)
    with pytest.raises(error, match=message):
        load_model(run_copy)
    assert snapshot(run_copy) == before


def test_predict_prints_each_video_and_fails_for_a_bad_one(trained, data_dir, tmp_path, capsys):
    from cmdcl_jax import predict

    source = pipeline.load_builder("causal_kitchen", str(data_dir)).as_data_source("test_iid")
    frames = source[0]["frames"]
    good = str(tmp_path / "clip.mp4")
    write_video(good, take_frames(frames, np.arange(len(frames))), fps=8)
    missing = str(tmp_path / "missing.mp4")
    flags.FLAGS.workdir = str(trained[0])
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["predict", missing, good])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1
    assert out.startswith(f"{good}\n") and len(out.splitlines()) == 1 + flags.FLAGS.top_k
    assert f"{missing}: failed" in err and "1 of 2 videos failed" in err


def test_resumed_metrics_log_has_each_step_once(tmp_path):
    file = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 10, "split": "train", "loss": 1.0},
        {"step": 10, "split": "test", "acc1": 0.5},
        {"step": 20, "split": "eval_test", "acc1": 0.6},
        {"step": 20, "split": "train", "loss": 0.9},
    ]
    file.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 25, "spl')
    metrics_log.truncate_after(file, 10)
    assert [json.loads(x) for x in file.read_text().splitlines()] == lines[:3]
    assert metrics_log.scores(file, "test", "acc1") == {10: 0.5}


def test_unwritable_workdir_still_gets_its_evaluation(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").mkdir()  # stands for a read-only file (the tests run as root)
    loop._record_evaluation(tmp_path, 30, {"test": {"acc1": 0.5}})
    assert "evaluation not recorded" in caplog.text


def test_damaged_kitchen_build_is_named_and_rebuilt(tmp_path, caplog):
    spec = dict(seed=1, num_train=16, num_test=8, num_frames=8, frame_size=32)
    config = synthetic(tmp_path, **{f"dataset.kitchen.{k}": v for k, v in spec.items()})
    task = setup.prepare_task(config)
    builder = pipeline.load_builder("causal_kitchen", str(tmp_path), task.data_config)
    shard = sorted(builder.data_path.glob("*test_iid.array_record*"))[0]
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # a copy cut short
    with pytest.raises(OSError, match=f"{shard}: unreadable shard"):
        validation.check_data(config, task, training=True)
    setup.prepare_task(config)
    assert (
        f"{shard}: unreadable shard" in caplog.text
        and "building CausalKitchen again" in caplog.text
    )
    assert shard.read_bytes() == whole  # the same seed builds the same bytes


def test_copied_workdir_is_the_same_run_at_its_new_path(trained, run_copy, data_dir):
    from cmdcl_jax.predict import load_model

    record = run_record.read(run_copy)
    assert record["model"]["clip"] == "tiny_clip"  # relative: no path of the original
    before = snapshot(run_copy)
    config = synthetic(data_dir, **TRAINED)
    task = setup.prepare_task(config)
    model_cfg = setup.model_config(config, run_copy)
    assert model_cfg.clip == str(run_copy.absolute() / "tiny_clip")
    checkpoints = Checkpoints(run_copy)
    # Training's check before it resumes: the copy's run.json is this run's, unchanged.
    reconciled = run_record.reconcile(
        run_copy,
        run_record.make_record(config, task, model_cfg, run_copy),
        latest_step=checkpoints.latest_step(),
        allow_config_change=False,
        recover=checkpoints.run_record,
    )
    assert reconciled == record
    assert snapshot(run_copy) == before
    # Prediction finds the copy's CLIP and restores the same weights as the original's.
    model, _ = load_model(run_copy)
    original, _ = load_model(trained[0])
    pairs = list(zip(*map(jax.tree.leaves, (nnx.state(model), nnx.state(original))), strict=True))
    assert pairs and all(np.array_equal(a, b) for a, b in pairs)
