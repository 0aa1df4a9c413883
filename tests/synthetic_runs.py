"""Helpers of the training tests: the synthetic config, the command line, on-disk state."""

import hashlib
import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

ROOT = Path(__file__).resolve().parents[1]
# The tests' CausalKitchen: the default knobs on fewer, shorter, smaller videos than the
# quickstart's (building and evaluating it is most of a short test run's time).
NUM_TEST = 64
KITCHEN = {
    "dataset.kitchen.num_train": 160,
    "dataset.kitchen.num_val": NUM_TEST,
    "dataset.kitchen.num_test": NUM_TEST,
    "dataset.kitchen.num_frames": 16,
    "dataset.kitchen.frame_size": 32,
}
# The shared run's overrides: 300 steps of the width-32 model, whatever the quickstart's
# recipe, evaluated every 100 steps and saved every 25.
TRAINED = {
    "train.num_steps": 300,
    "model.width": 32,
    "eval.every_steps": 100,
    "checkpoint.every_steps": 25,
}
sys.path.insert(0, str(ROOT))  # the configs package, as `python -m cmdcl_jax.main` sees it


def synthetic(data_dir, **overrides):
    """``configs/synthetic.py`` on the tests' kitchen in ``data_dir``, with ``{"a.b": value}``
    overrides."""
    config = importlib.import_module("configs.synthetic").get_config()
    config.dataset.data_dir = str(data_dir)
    for key, value in {**KITCHEN, **overrides}.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config


def _main_command(workdir, data_dir, devices: int, args) -> tuple[list[str], dict]:
    """The command line and environment of ``python -m cmdcl_jax.main`` on the synthetic
    config and the tests' kitchen, on ``devices`` CPU devices."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    cmd = [
        sys.executable,
        "-m",
        "cmdcl_jax.main",
        "--config",
        "configs/synthetic.py",
        "--workdir",
        str(workdir),
        f"--config.dataset.data_dir={data_dir}",
        *(f"--config.{key}={value}" for key, value in KITCHEN.items()),
        *args,
    ]
    return cmd, env


def run_main(workdir, data_dir, *args, devices=8, wait=True):
    """``python -m cmdcl_jax.main`` on the synthetic config and the tests' kitchen, on
    ``devices`` CPU devices."""
    cmd, env = _main_command(workdir, data_dir, devices, args)
    if not wait:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def run_processes(workdir, data_dir, *args, num_processes=2, devices=4) -> list[str]:
    """One run of ``python -m cmdcl_jax.main`` as ``num_processes`` processes on localhost
    with ``devices`` CPU devices each; asserts that each one succeeds.

    Returns:
      Each process's output (written to files: pipes left unread could stall them all).
    """
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workdir = Path(workdir)
    logs = [workdir.with_name(f"{workdir.name}.process_{i}.log") for i in range(num_processes)]
    procs = []
    for i, log in enumerate(logs):
        flags = [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}"]
        cmd, env = _main_command(workdir, data_dir, devices, [*args, *flags, f"--process_id={i}"])
        with log.open("w") as out:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out))
    try:
        codes = [proc.wait(timeout=600) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()  # only ever needed when one timed out or failed
    outputs = [log.read_text() for log in logs]
    for i, (code, output) in enumerate(zip(codes, outputs, strict=True)):
        assert code == 0, f"process {i} of {num_processes} failed:\n{output[-3000:]}"
    return outputs


def final_results(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{\n") :])


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def saved_state(workdir: Path, step: int, like=None) -> dict:
    """The state saved at ``step``; on the shardings of the arrays ``like`` if given (as a
    checkpoint saved by other processes needs)."""
    target = None if like is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return ocp.StandardCheckpointer().restore(
        (workdir / "checkpoints" / str(step) / "state").absolute(), target
    )


def snapshot(directory: Path) -> dict[str, str]:
    """``{relative path: SHA-256}`` of every file below ``directory``."""
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def metrics_lines(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
