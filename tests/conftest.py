"""Test set-up: 8 host CPU devices, so that sharding is exercised without accelerators;
the synthetic run that the training tests share."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()

import pytest  # noqa: E402 - after the environment that JAX reads
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()  # grain workers and absl-using code outside app.run


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """A persistent XLA cache for the ``python -m cmdcl_jax.main`` subprocesses: a resumed or
    repeated run compiles the same steps (measured: 50 s of CPU instead of 118 s for a
    6-step run done twice). This process's JAX read its settings before this runs."""
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    yield
    del os.environ["JAX_COMPILATION_CACHE_DIR"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Where the training tests build CausalKitchen (once)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory):
    """A full default synthetic run (300 steps on 8 CPU devices, evaluated every 100,
    saved every 25): (workdir, final results). Tests that change the workdir use a copy."""
    from synthetic_runs import TRAINED, synthetic

    from cmdcl_jax import train

    workdir = tmp_path_factory.mktemp("trained")
    config = synthetic(data_dir, **TRAINED)
    return workdir, train.train_and_evaluate(config, workdir)
