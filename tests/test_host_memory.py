"""``--reuse_cpu_scratch`` (on by default on the CPU): a jitted call's scratch buffer is
not faulted in again at every call."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cmdcl_jax
from cmdcl_jax import host_memory

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")

# A jitted call whose intermediates (64 MiB each) do not fit in its output: XLA gives it a
# scratch buffer per call. Prints the minor page faults per call after a warm-up.
CALLS = """
import json, resource, sys

from cmdcl_jax import host_memory

if sys.argv[1] == "keep":  # in main's order: inline calls, the backend, then the heap
    host_memory.run_cpu_calls_inline()
import jax
import jax.numpy as jnp

assert jax.default_backend() == "cpu"
kept = host_memory.keep_freed_blocks() if sys.argv[1] == "keep" else None

f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x))
x = jnp.ones((4096, 64), jnp.float32) / 64  # x @ x.T: 4096 x 4096 float32, 64 MiB
jax.block_until_ready(f(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    jax.block_until_ready(f(x))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"kept": kept, "faults_per_call": faults}))
"""


def _faults_per_call(mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(cmdcl_jax.__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", CALLS, mode], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reused_scratch_spares_the_page_faults_of_every_call():
    plain = _faults_per_call("plain")
    kept = _faults_per_call("keep")
    if not kept["kept"]:  # not glibc: nothing was changed, nothing to compare
        assert host_memory.keep_freed_blocks() is False
        return
    # Plain glibc maps the 64 MiB scratch anew per call: 16,384 pages of 4 KiB faulted in,
    # unless the kernel backs every mapping with 2 MiB pages (transparent huge pages
    # "always"; the usual default, "madvise", leaves malloc's mappings at 4 KiB).
    if plain["faults_per_call"] <= 4096 and THP.exists() and "[always]" in THP.read_text():
        pytest.skip(f"huge pages back every mapping here: {plain['faults_per_call']} faults")
    assert plain["faults_per_call"] > 4096, plain
    # Kept: the pages stay mapped; what remains are Python's and the runtime's own small
    # allocations, far under one scratch buffer.
    assert kept["faults_per_call"] < plain["faults_per_call"] / 10, (plain, kept)
