"""``--reuse_cpu_scratch`` (on by default on the CPU): a jitted call's scratch buffer is
not faulted in again at every call, including calls on a batch just placed."""

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


def _faults_per_call(mode: str, script: str = CALLS) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(cmdcl_jax.__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", script, mode], env=env, capture_output=True, text=True, check=True
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


# The same call given a freshly placed uint8 batch each time, as the training loop gives
# its step: 16 MiB from a host buffer one byte off alignment, which XLA copies on a worker
# thread (an aligned one it may alias instead). "device_put" hands the array over at once;
# "place_batch" waits for the copy on the CPU.
PLACED_BATCH_CALLS = """
import json, resource, sys

from cmdcl_jax import host_memory

host_memory.run_cpu_calls_inline()
import jax
import jax.numpy as jnp
import numpy as np

from cmdcl_jax import sharding

kept = host_memory.keep_freed_blocks()
mesh = sharding.make_mesh(devices=jax.devices()[:1])
raw = np.random.default_rng(0).integers(0, 256, 4096 * 4096 + 1, dtype=np.uint8)
video = np.frombuffer(raw, np.uint8, 4096 * 4096, offset=1).reshape(4096, 4096)


def place():
    if sys.argv[1] == "device_put":
        return jax.device_put(video, sharding.batch_sharding(mesh))
    return sharding.place_batch({"video": video}, mesh)["video"]


f = jax.jit(lambda x, v: jnp.sum(jnp.tanh(x @ x.T) @ x) + v[0, 0])
x = jnp.ones((4096, 64), jnp.float32) / 64
jax.block_until_ready(f(x, place()))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    jax.block_until_ready(f(x, place()))
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"kept": kept, "faults_per_call": faults}))
"""
SCRATCH_PAGES = 64 * 2**20 // 4096


def test_a_call_on_a_placed_batch_keeps_its_scratch():
    handed_over = _faults_per_call("device_put", PLACED_BATCH_CALLS)
    if not handed_over["kept"]:
        pytest.skip("not glibc: no scratch is kept")
    placed = _faults_per_call("place_batch", PLACED_BATCH_CALLS)
    # Handed over mid-copy, the call runs on XLA's worker thread when the copy lands, whose
    # malloc arena maps a block over its 64 MiB heaps anew whatever the settings: the
    # scratch's 16,384 pages faulted in again per call (unless huge pages back every
    # mapping).
    if handed_over["faults_per_call"] <= 4096 and THP.exists() and "[always]" in THP.read_text():
        pytest.skip(f"huge pages back every mapping here: {handed_over['faults_per_call']} faults")
    assert handed_over["faults_per_call"] > SCRATCH_PAGES / 2, handed_over
    # Placed: the call runs on the calling thread and reuses the heap's pages. What faults
    # remain is the batch's 16 MiB copy (4,096 pages) landing on pages new to the heap.
    assert placed["faults_per_call"] < SCRATCH_PAGES / 2, (handed_over, placed)
