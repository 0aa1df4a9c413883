"""The main job on CausalKitchen: learning, kill and resume, resume on another process count,
sharding, bad input, predict."""

import importlib
import json
import platform
import shutil
import signal
import time

import jax
import numpy as np
import optax
import pytest
from synthetic_runs import (
    NUM_TEST,
    TRAINED,
    checkpoint_steps,
    final_results,
    metrics_lines,
    run_main,
    run_processes,
    saved_state,
    synthetic,
)

from cmdcl_jax import sharding, train
from cmdcl_jax.data import pipeline
from cmdcl_jax.data.transforms import take_frames
from cmdcl_jax.data.video import write_video
from cmdcl_jax.train import clip_cache, setup, steps
from cmdcl_jax.train.checkpoints import Checkpoints


def build(config, workdir):
    """The run that training would build for ``config`` in ``workdir`` (no checkpoint)."""
    task = setup.prepare_task(config)
    model_cfg = setup.model_config(config, workdir)
    setup.ensure_tiny_clip(model_cfg, task, workdir, config.dataset.crop_size)
    return setup.build_run(config, task, model_cfg)


def test_synthetic_run_learns(trained, data_dir):
    workdir, results = trained
    chance = 1 / 8
    print(f"\nsynthetic run: {json.dumps(results)}")
    assert results["test_iid"]["acc1"] > 4 * chance
    assert results["test_iid"]["num_examples"] == NUM_TEST
    lines = metrics_lines(workdir)
    losses = [x["loss"] for x in lines if x["split"] == "train"]
    assert losses[-1] < losses[0] - 0.5
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    # Retention: exactly the last checkpoint.keep=2 (of 12 saved) plus the best on
    # val_shifted, the first eval split.
    acc = {x["step"]: x["acc1"] for x in lines if x["split"] == "val_shifted"}
    assert sorted(acc) == [100, 200, 300]
    best = max((a, s) for s, a in acc.items())[1]
    assert checkpoint_steps(workdir) == sorted({275, 300, best})
    # Started again, the finished run trains no further and reports the same evaluation.
    config = synthetic(data_dir, **TRAINED)
    assert train.train_and_evaluate(config, workdir) == results
    assert metrics_lines(workdir) == lines


def test_checkpoint_from_8_devices_evaluates_on_1(trained, data_dir):
    workdir, results = trained
    out = run_main(workdir, data_dir, "--mode=eval", devices=1)
    assert out.returncode == 0, out.stdout + out.stderr
    restored = final_results(out.stdout)
    # Logits differ in float32 rounding across meshes (~1e-6), which may flip a near-tie in
    # one of the test videos, no more.
    for split in ("test_iid", "test_shifted"):
        want = pytest.approx(results[split]["acc1"], rel=0, abs=1 / NUM_TEST)
        assert restored[split]["acc1"] == want


def test_predict_prints_top_classes(trained, data_dir, tmp_path):
    from cmdcl_jax.predict import load_model, predict

    source = pipeline.load_builder("causal_kitchen", str(data_dir)).as_data_source("test_iid")
    example = source[0]
    path = str(tmp_path / "clip.mp4")
    write_video(path, take_frames(example["frames"], np.arange(len(example["frames"]))), fps=8)
    model, run = load_model(trained[0])
    ((name, top, error),) = predict(model, run, [path], top_k=3)
    assert name == path and error is None
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    assert all(name in run["class_names"] for name, _ in top)
    assert sum(p for _, p in top) <= 1.0 + 1e-5  # a float32 softmax sums to 1 within C eps


def test_killed_and_resumed_run_ends_bitwise_identical(data_dir, tmp_path):
    args = [
        "--config.train.num_steps=40",
        "--config.checkpoint.every_steps=10",
        "--config.log_every=5",
    ]
    straight = run_main(tmp_path / "straight", data_dir, *args, "--verbosity=0", devices=1)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    if platform.libc_ver()[0] == "glibc":  # main's default on a CPU: steps run inline
        assert "CPU scratch reused: True" in straight.stderr

    proc = run_main(tmp_path / "killed", data_dir, *args, devices=1, wait=False)
    first = tmp_path / "killed" / "checkpoints" / "20"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = run_main(tmp_path / "killed", data_dir, *args, devices=1)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    want, got = saved_state(tmp_path / "straight", 40), saved_state(tmp_path / "killed", 40)
    pairs = list(zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True))
    assert pairs and all(np.array_equal(a, b) for a, b in pairs)
    assert final_results(resumed.stdout) == final_results(straight.stdout)
    # metrics.jsonl holds each step once: the killed run's lines after step 20 were dropped.
    logged = [(x["step"], x["split"]) for x in metrics_lines(tmp_path / "killed")]
    assert logged == [(x["step"], x["split"]) for x in metrics_lines(tmp_path / "straight")]


def test_checkpoints_resume_on_another_process_count(data_dir, tmp_path):
    """1 process x 8 devices to step 2, 2 processes x 4 to step 4, 1 x 8 to step 6 ends
    where an uninterrupted 1 x 8 run does."""
    steps, learning_rate = 6, 3e-3
    args = [
        f"--config.train.num_steps={steps}",
        f"--config.train.learning_rate={learning_rate}",
        "--config.train.warmup_steps=0",
        "--config.model.width=32",
        "--config.checkpoint.every_steps=2",
        "--config.checkpoint.keep=3",
        "--config.log_every=1",
        "--config.dataset.eval_splits=('val_shifted',)",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = run_main(straight, data_dir, *args, devices=8)
    assert out.returncode == 0, out.stdout + out.stderr
    assert checkpoint_steps(straight) == [2, 4, 6]
    shutil.copytree(straight, resumed)
    for step in (4, 6):
        shutil.rmtree(resumed / "checkpoints" / str(step))
    run_processes(resumed, data_dir, *args, num_processes=2, devices=4)
    assert (resumed / "checkpoints/4/state/ocdbt.process_1").is_dir()  # two processes wrote it
    want = saved_state(straight, steps)
    two_processes = saved_state(resumed, steps, like=want)
    shutil.rmtree(resumed / "checkpoints" / str(steps))
    out = run_main(resumed, data_dir, *args, devices=8)  # from the 2-process step 4
    assert out.returncode == 0, out.stdout + out.stderr

    # The runs sum the same float32 terms in other orders (8 devices of one process, or 4
    # of each of 2 all-reduced over gloo): the losses agree to float32 rounding (~1e-7
    # relative, measured), while another batch changes a loss by ~1e-2. Parameters whose
    # gradient is not zero agree to ~1e-6 (measured); those whose gradient is analytically
    # zero (attention key biases: softmax ignores them) get rounding noise of <= 5e-10
    # (see assert_same_step), which Adam's g / (|g| + 1e-8) turns into moves of up to 5 %
    # of the learning rate a step: at most 0.05 * steps * lr = 9e-4 over the run (2e-5
    # measured). A step on another batch moves most entries by ~lr = 3e-3 elsewhere.
    def train_losses(workdir):
        return [x["loss"] for x in metrics_lines(workdir) if x["split"] == "train"]

    assert len(train_losses(resumed)) == steps
    assert train_losses(resumed) == pytest.approx(train_losses(straight), rel=1e-5)
    atol = 0.05 * steps * learning_rate
    for got in (two_processes, saved_state(resumed, steps)):
        assert int(got["step"]) == steps
        pairs = zip(jax.tree.leaves(want["params"]), jax.tree.leaves(got["params"]), strict=True)
        for a, b in pairs:
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=atol)


def test_saving_a_replicated_state_in_one_process_compiles_nothing(tmp_path):
    # Orbax's replica-parallel saving cuts a replicated array into one slice per device,
    # each a jitted slice compiled per shape and device: 128 compilations (~5 s) at the
    # first save of the tests' 8-device runs. One process has no other to share the
    # writing with. Shapes of this test alone, so that no earlier save compiled them.
    mesh = sharding.make_mesh(devices=jax.devices())
    assert mesh.size == 8  # conftest's devices: replica-parallel would cut 8 slices
    host = {"step": np.int32(3), "params": {"w": np.arange(56 * 37.0).reshape(56, 37)}}
    state = jax.device_put(host, sharding.replicated(mesh))
    compiled = []

    def record(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs)

    checkpoints = Checkpoints(tmp_path, async_save=False)
    jax.monitoring.register_event_duration_secs_listener(record)
    try:
        checkpoints.save(3, state, {})
        checkpoints.prune()
    finally:
        jax.monitoring.unregister_event_duration_listener(record)
    assert compiled == []
    zeros = jax.tree.map(np.zeros_like, host)
    restored, step = Checkpoints(tmp_path, read_only=True).restore(zeros)
    assert step == 3
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), host["params"]["w"])


def test_sharded_step_matches_single_device(data_dir, tmp_path):
    config = synthetic(data_dir, **{"train.batch_size": 8})
    run = build(config, tmp_path)
    batch = next(iter(setup.make_loader(config, run.task, split="train", training=True)))
    batch = {"video": batch["video"], "label": batch["label"]}
    initial = jax.device_get(run.state["params"])
    outcomes = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.make_mesh(devices=devices)
        host_state, host_frozen = jax.device_get((gradient_state(run.state), run.frozen))
        state = jax.device_put(host_state, sharding.tree_shardings(host_state, mesh))
        frozen = jax.device_put(host_frozen, sharding.tree_shardings(host_frozen, mesh))
        state, metrics = steps.train_step(
            state,
            frozen,
            sharding.place_batch(batch, mesh),
            jax.random.key(0),
            graphdef=run.graphdef,
            tx=GRADIENT_STEP,
            kind=run.task.kind,
            accum_steps=1,
        )
        outcomes.append((float(metrics["loss"]), jax.device_get(state["params"])))
    assert len(jax.devices()) == 8
    assert_same_step(initial, *outcomes[0], *outcomes[1])


# One plain gradient step (SGD, learning rate 1): the parameters move by minus the
# gradient, so two ways of computing a step are compared on their gradients. (Adam's first
# step, g / (|g| + 1e-8), turns the rounding noise of gradients that are analytically zero,
# such as attention key biases', into moves of up to the learning rate.)
GRADIENT_STEP = optax.sgd(1.0)


def gradient_state(state):
    """``state`` with the optimizer state of :data:`GRADIENT_STEP`."""
    return {**state, "opt_state": GRADIENT_STEP.init(state["params"])}


def assert_same_step(initial, loss_a, params_a, loss_b, params_b):
    """One gradient step from the parameters ``initial``, computed two ways (another device
    count, another accumulation).

    float32 sums ordered differently give losses (~2) that agree to ~1e-6 relative and
    gradients that agree to ~1e-6 relative plus ~1e-9 absolute (the rounding noise of
    gradients that are analytically zero, measured <= 5e-10), against a largest entry of
    ~1. A wrong gradient (a shard or a micro-batch missed, a mean over the wrong axis) is
    off by a sizeable share of the entries it touches. So the moves must agree to 1e-4
    relative plus 1e-6 of the largest move.
    """
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-6)
    leaves = list(zip(*map(jax.tree.leaves, (initial, params_a, params_b)), strict=True))
    largest_move = max(float(np.abs(a - p0).max()) for p0, a, _ in leaves)
    assert largest_move > 1e-2  # the step did move them
    for p0, a, b in leaves:
        np.testing.assert_allclose(b - p0, a - p0, rtol=1e-4, atol=1e-6 * largest_move)


def test_gradient_accumulation_matches_one_big_batch(data_dir, tmp_path):
    config = synthetic(data_dir, **{"train.batch_size": 8, "model.dropout": 0.0})
    run = build(config, tmp_path)
    batch = next(iter(setup.make_loader(config, run.task, split="train", training=True)))
    placed = sharding.place_batch({"video": batch["video"], "label": batch["label"]}, run.mesh)
    initial = jax.device_get(run.state["params"])
    results = []
    for accum in (1, 2):
        state = gradient_state(jax.tree.map(lambda x: x.copy(), run.state))
        state, metrics = steps.train_step(
            state,
            run.frozen,
            placed,
            jax.random.key(0),
            graphdef=run.graphdef,
            tx=GRADIENT_STEP,
            kind="single",
            accum_steps=accum,
        )
        results.append((float(metrics["loss"]), jax.device_get(state["params"])))
    assert_same_step(initial, *results[0], *results[1])


def test_the_loops_step_on_flat_leaves_computes_train_step_bitwise(data_dir, tmp_path):
    """:class:`steps.BoundTrainStep` (the training loop's step, on the state's leaves)
    computes what ``train_step`` computes on the state tree, bit for bit, two steps running
    (TCI's dictionary, rebuilt inside the step, included), and rebuilds the tree."""
    config = synthetic(
        data_dir,
        **{"train.batch_size": 8, "model.tci_mode": "dictionary", "model.num_confounders": 4},
    )
    run = build(config, tmp_path)
    loader = iter(setup.make_loader(config, run.task, split="train", training=True))
    static = dict(
        graphdef=run.graphdef,
        tx=run.tx,
        kind=run.task.kind,
        accum_steps=1,
        mesh=run.mesh,
        fsdp_min_size=config.mesh.fsdp_min_size,
    )
    tree = jax.tree.map(lambda x: x.copy(), run.state)
    bound = steps.BoundTrainStep(run.state, run.frozen, **static)
    leaves = bound.leaves(run.state)
    for _ in range(2):
        batch = next(loader)
        placed = sharding.place_batch({"video": batch["video"], "label": batch["label"]}, run.mesh)
        tree, tree_metrics = steps.train_step(tree, run.frozen, placed, jax.random.key(0), **static)
        leaves, leaf_metrics = bound(leaves, placed, jax.random.key(0))
        assert jax.device_get(leaf_metrics) == jax.device_get(tree_metrics)
    state = bound.state(leaves)
    assert jax.tree.structure(state) == jax.tree.structure(tree)
    assert int(state["step"]) == 2
    pairs = list(zip(*map(jax.tree.leaves, jax.device_get((tree, state))), strict=True))
    assert len(pairs) == len(leaves)
    assert all(np.array_equal(a, b) for a, b in pairs)
    assert np.abs(jax.device_get(state["confounders"]["confounders"]["prototypes"][...])).max() > 0


def test_classes_that_do_not_match_the_data_stop_the_run(data_dir):
    with pytest.raises(ValueError, match=r"num_classes=10 but causal_kitchen/activity .* 8"):
        setup.prepare_task(synthetic(data_dir, **{"dataset.num_classes": 10}))


def test_nan_loss_stops_without_overwriting_the_last_good_checkpoint(data_dir, tmp_path):
    train.train_and_evaluate(
        synthetic(data_dir, **{"train.num_steps": 20, "checkpoint.every_steps": 10}), tmp_path
    )
    exploding = synthetic(
        data_dir,
        **{"train.num_steps": 40, "checkpoint.every_steps": 10, "train.learning_rate": 1e30},
    )
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        train.train_and_evaluate(exploding, tmp_path, allow_config_change=True)
    assert checkpoint_steps(tmp_path)[-1] == 20
    state = saved_state(tmp_path, 20)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


def test_every_config_loads_and_a_misspelt_override_fails(data_dir, tmp_path):
    configs = {
        "synthetic": ["default", "unconfounded"],
        "breakfast": ["activity", "actions"],
        "coin": ["task", "step"],
        "charades": [None],
    }
    for name, args in configs.items():
        module = importlib.import_module(f"configs.{name}")
        for arg in args:
            config = module.get_config() if arg is None else module.get_config(arg)
            config.lock()
            assert config.dataset.name and config.dataset.task
            assert config.model.num_frames == config.dataset.num_frames
    out = run_main(tmp_path, data_dir, "--config.train.batch_sise=4")
    assert out.returncode != 0 and "batch_sise" in out.stderr


def fsdp_split(tree) -> list:
    """The leaves of ``tree`` split over the ``fsdp`` mesh axis."""
    return [x for x in jax.tree.leaves(tree) if "fsdp" in tuple(x.sharding.spec)]


def test_fsdp_shards_the_state_trains_as_data_parallel_and_restores_on_one_device(
    data_dir, tmp_path
):
    # Arrays of >= 1024 elements (the tiny model's 32 x 32 kernels and larger) are split.
    mesh_fields = {"mesh.fsdp": 8, "mesh.fsdp_min_size": 1024}
    config = synthetic(data_dir, **{"train.batch_size": 8, **mesh_fields})
    run = build(config, tmp_path)
    assert dict(run.mesh.shape) == {"data": 1, "fsdp": 8}
    for tree in (run.state["params"], run.state["opt_state"], run.frozen):
        split, leaves = fsdp_split(tree), jax.tree.leaves(tree)
        assert split and len(split) < len(leaves)  # the small ones stay replicated
    loader = iter(setup.make_loader(config, run.task, split="train", training=True))
    batches = [next(loader) for _ in range(3)]
    host_state, host_frozen = jax.device_get((run.state, run.frozen))
    losses, states = {}, {}
    for fsdp in (8, 1):
        mesh = sharding.make_mesh(fsdp=fsdp)
        state = jax.device_put(host_state, sharding.tree_shardings(host_state, mesh, 1024))
        frozen = jax.device_put(host_frozen, sharding.tree_shardings(host_frozen, mesh, 1024))
        losses[fsdp] = []
        for batch in batches:
            state, metrics = steps.train_step(
                state,
                frozen,
                sharding.place_batch({"video": batch["video"], "label": batch["label"]}, mesh),
                jax.random.key(0),
                graphdef=run.graphdef,
                tx=run.tx,
                kind=run.task.kind,
                accum_steps=1,
                mesh=mesh,
                fsdp_min_size=1024,
            )
            losses[fsdp].append(float(metrics["loss"]))
        states[fsdp] = state
    assert len(fsdp_split(states[8]["params"])) == len(fsdp_split(run.state["params"]))
    assert not fsdp_split(states[1])
    # The same sums, with the gradient reductions over devices grouped otherwise: float32
    # rounding (~1e-7 relative per sum) may reach ~1e-6 relative in the losses (~2) after
    # a few Adam steps; a parameter shard missed or applied twice moves them by far more.
    assert losses[8] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)

    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(3, states[8], {})
    checkpoints.prune()
    restored, step = checkpoints.restore(states[1])
    assert step == 3 and not fsdp_split(restored)
    pairs = list(zip(*map(jax.tree.leaves, jax.device_get((states[8], restored))), strict=True))
    assert pairs and all(np.array_equal(a, b) for a, b in pairs)


def test_confounder_dictionary_updates_in_the_train_step_and_is_checkpointed(data_dir, tmp_path):
    """tci_mode="dictionary": the first step fills TCI's dictionary, the next moves it;
    a checkpoint holds it and a fresh run restores it exactly, and evaluation uses it."""
    config = synthetic(
        data_dir,
        **{"train.batch_size": 8, "model.tci_mode": "dictionary", "model.num_confounders": 4},
    )
    run = build(config, tmp_path)
    assert not any(np.any(x) for x in jax.tree.leaves(run.state["confounders"]))  # empty
    loader = iter(setup.make_loader(config, run.task, split="train", training=True))
    states = []
    for _ in range(2):
        batch = next(loader)
        placed = sharding.place_batch({"video": batch["video"], "label": batch["label"]}, run.mesh)
        run.state, _ = steps.train_step(
            run.state,
            run.frozen,
            placed,
            jax.random.key(0),
            graphdef=run.graphdef,
            tx=run.tx,
            kind=run.task.kind,
            accum_steps=1,
        )
        states.append(jax.device_get(run.state["confounders"]))
    frequencies = [s["confounders"]["frequencies"][...] for s in states]
    np.testing.assert_allclose(frequencies[0], np.full(4, 0.25), rtol=1e-6)  # filled
    np.testing.assert_allclose(frequencies[1].sum(), 1.0, rtol=1e-6)
    prototypes = [s["confounders"]["prototypes"][...] for s in states]
    assert np.abs(prototypes[0]).max() > 0 and not np.array_equal(*prototypes)  # moved
    checkpoints = Checkpoints(tmp_path, async_save=False)
    checkpoints.save(2, run.state, {})
    checkpoints.prune()
    fresh = build(config, tmp_path)
    restored, _ = Checkpoints(tmp_path, read_only=True).restore(fresh.state)
    for a, b in zip(*map(jax.tree.leaves, (states[1], restored["confounders"])), strict=True):
        np.testing.assert_array_equal(np.asarray(b), a)
    video = jax.device_put(batch["video"][:2])
    logits = [
        steps.eval_step(s["params"], run.frozen, video, s["confounders"], graphdef=run.graphdef)
        for s in (run.state, restored)
    ]
    np.testing.assert_array_equal(*map(np.asarray, logits))


def test_clip_cache_holds_what_the_step_computes(data_dir, tmp_path):
    """train.clip_cache: training reads the evaluation view, the cache holds V_P of exactly
    those pixels by example index, and a step fed the cache is the step computing V_P.

    Both sides run the same float32 ops on the same pixels, batched differently, so V_P
    agree to rounding (~1e-7 on unit vectors) and the losses to ~1e-7 relative. The random
    view's V_P differ by more: measured 3.1e-3 here, where crops keep 90-100 % of a frame
    and the tiny CLIP is random, so 1e-5 tells the views apart."""
    config = synthetic(
        data_dir,
        **{
            "train.batch_size": 8,
            "train.clip_cache": True,
            "train.num_steps": 2,
            "dataset.eval_splits": ("val_shifted",),
        },
    )
    results = train.train_and_evaluate(config, tmp_path)  # the loop, with the cache
    assert results["val_shifted"]["num_examples"] == NUM_TEST
    run = build(config, tmp_path / "fresh")
    cache = clip_cache.clip_features(config, run)
    assert cache.shape == (160, config.dataset.num_frames, 32)
    error = {}
    for fixed in (False, True):
        config.train.clip_cache = fixed
        batch = next(iter(setup.make_loader(config, run.task, split="train", training=True)))
        video = jax.device_put(batch["video"])
        v_p = steps.clip_step(run.state["params"], run.frozen, video, graphdef=run.graphdef)
        error[fixed] = np.abs(np.asarray(v_p) - cache[batch["index"]]).max()
    assert error[True] < 1e-5 < 1e-3 < error[False]
    losses = []
    for fields in ({}, {"frames_clip": cache[batch["index"]]}):
        placed = sharding.place_batch(
            {"video": batch["video"], "label": batch["label"], **fields}, run.mesh
        )
        _, metrics = steps.train_step(
            gradient_state(jax.tree.map(lambda x: x.copy(), run.state)),
            run.frozen,
            placed,
            jax.random.key(0),
            graphdef=run.graphdef,
            tx=GRADIENT_STEP,
            kind=run.task.kind,
            accum_steps=1,
        )
        losses.append(float(metrics["loss"]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
