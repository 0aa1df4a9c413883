"""``--reuse_cpu_scratch`` (on by default on the CPU): a jitted call's scratch buffer is
not faulted in again at every call, and a call on a batch just placed runs where it can
reuse it."""

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


def _run(script: str, mode: str) -> dict:
    """What ``script`` prints last, as JSON, run in a fresh process with ``mode``."""
    env = {**os.environ, "PYTHONPATH": str(Path(cmdcl_jax.__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-c", script, mode], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reused_scratch_spares_the_page_faults_of_every_call():
    plain = _run(CALLS, "plain")
    kept = _run(CALLS, "keep")
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


# Calls given a freshly placed uint8 batch each time, as the training loop gives its step
# one: 16 MiB from a host buffer one byte off alignment, which XLA copies on a worker
# thread (an aligned one it may alias instead). Each call records the thread it runs on
# from a host callback. "device_put" hands the array over at once; "place_batch" waits for
# the copy on the CPU.
PLACED_BATCH_CALLS = """
import json, sys, threading

from cmdcl_jax import host_memory

host_memory.run_cpu_calls_inline()
import jax
import numpy as np
from jax.experimental import io_callback

from cmdcl_jax import sharding

mesh = sharding.make_mesh(devices=jax.devices()[:1])
raw = np.random.default_rng(0).integers(0, 256, 2**24 + 1, dtype=np.uint8)
video = np.frombuffer(raw, np.uint8, 2**24, offset=1).reshape(16, -1)
threads = []


def record(x):
    threads.append(threading.get_native_id())
    return x


f = jax.jit(lambda v: io_callback(record, jax.ShapeDtypeStruct((), np.uint8), v[0, 0]))
for _ in range(10):
    if sys.argv[1] == "device_put":
        v = jax.device_put(video, sharding.batch_sharding(mesh))
    else:
        v = sharding.place_batch({"video": video}, mesh)["video"]
    jax.block_until_ready(f(v))
inline = sum(t == threading.get_native_id() for t in threads)
print(json.dumps({"calls": len(threads), "on_the_calling_thread": inline}))
"""


def test_a_call_on_a_placed_batch_runs_on_the_calling_thread():
    # Handed over mid-copy, a call runs on the worker thread when the copy lands, where its
    # scratch would come from that thread's malloc arena: mapped anew whatever the settings
    # for a block over the arena's 64 MiB heaps (BENCHMARKS.md). Without the wait in
    # place_batch, 1-3 of 10 calls ran on the calling thread in three runs.
    handed_over = _run(PLACED_BATCH_CALLS, "device_put")
    if handed_over["on_the_calling_thread"] == handed_over["calls"]:
        pytest.skip(f"every copy here landed before its call: {handed_over}")
    placed = _run(PLACED_BATCH_CALLS, "place_batch")
    assert placed["calls"] == 10
    assert placed["on_the_calling_thread"] == 10, (handed_over, placed)


# A block over 2 GiB (the base preset's training step has ~5 GB of scratch on the CPU)
# taken from the heap and freed: does the heap's top go back to the system? Only the
# program break is read, so none of the block is touched.
LARGE_BLOCK = """
import ctypes, ctypes.util, json

from cmdcl_jax import host_memory

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
kept = host_memory.keep_freed_blocks()
start = libc.sbrk(0)
block = libc.malloc(2**31 + 2**28)  # 2.25 GiB
top = libc.sbrk(0)
libc.free(block)
print(json.dumps({"kept": kept, "grown": top - start, "released": top - libc.sbrk(0)}))
"""


def test_kept_heap_is_not_trimmed_after_a_block_over_2_gib():
    # mallopt's M_TRIM_THRESHOLD is an int: 2**31 - 1, its largest positive value, still
    # let glibc trim a freed top over 2 GiB, so the base step faulted 1.27 million pages
    # (4.9 GiB) in again each call (BENCHMARKS.md); -1 turns trimming off.
    got = _run(LARGE_BLOCK, "keep")
    if not got["kept"]:
        pytest.skip("not glibc: keep_freed_blocks changes nothing")
    assert got["grown"] >= 2**31 + 2**28, got  # served from the heap, not by mmap
    assert got["released"] == 0, got
