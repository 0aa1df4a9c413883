"""The entry points' console: JAX starts without a GPU-probe traceback, libraries stay quiet."""

import os
import subprocess
import sys
from pathlib import Path

import cmdcl_jax

# An entry point's start, as in `main.py`: absl parses the flags, then `quiet_logs` runs
# before anything starts JAX or imports transformers.
START = """
from absl import app

from cmdcl_jax.cli import quiet_logs


def main(argv):
    quiet_logs()
    import jax
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_logger("transformers").warning("library chatter")
    print(jax.devices()[0].platform)


app.run(main)
"""


def _start(*flags: str) -> subprocess.CompletedProcess:
    """Runs START in a fresh process with JAX free to pick its platform."""
    unset = ("JAX_PLATFORMS", "XLA_FLAGS", "TRANSFORMERS_VERBOSITY")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["PYTHONPATH"] = str(Path(cmdcl_jax.__file__).resolve().parents[1])
    return subprocess.run(
        [sys.executable, "-c", START, *flags], env=env, capture_output=True, text=True
    )


def test_start_prints_the_platform_and_nothing_else():
    """Where jax[cuda12] is installed and no GPU is visible (as on the CPU test machine),
    the CUDA plugin's failed cuInit used to log a traceback here."""
    result = _start()
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip() in {"cpu", "gpu", "tpu"}


def test_verbosity_brings_the_library_logs_back():
    result = _start("--verbosity=0")
    assert result.returncode == 0, result.stderr
    assert "library chatter" in result.stderr
