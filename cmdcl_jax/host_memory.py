"""``--reuse_cpu_scratch``: keeps XLA's per-call scratch memory mapped on the CPU.

On the CPU, XLA allocates each call's scratch buffer with ``malloc`` and frees it when the
call ends (~190 MB for the ``small`` benchmark preset's training step). JAX runs a call on
one of its own threads, whose glibc ``malloc`` serves a block over 32 MB with a fresh
``mmap`` and unmaps it on ``free``, so every step touches the whole buffer again
through page faults, 4 KB each: 47,260 per ``small`` step. :func:`reuse_cpu_scratch`
runs single-device CPU calls on the calling thread instead
(``jax_cpu_enable_async_dispatch=False``), whose main arena grows by ``brk``, and tells
glibc to serve large blocks from it and not to trim it, so the next call reuses the pages.
A call runs on the calling thread only if its inputs are ready when it is made: one handed
an array that XLA is still copying from the host runs on XLA's worker thread when the copy
lands, whose malloc arena maps a block over its 64 MB heaps anew whatever the settings, so
``sharding.place_batch`` waits for a batch's copy on the CPU. Trimming is turned off with
-1: the largest positive threshold (2**31 - 1, mallopt's value is an int) still let glibc
give back a freed heap top over 2 GiB, and the ``base`` preset's step (8 frames of 224 px)
faulted 1.28 million pages in again each call, 13.1 s a step against 8.6 s untrimmed.

Measured (BENCHMARKS.md, interleaved runs of 8 and 12 rounds, three 2-core machines): the
``small`` step 1.22-1.25x faster on a Zen 4 CPU, 1.34-1.45x on a Zen 5 one and 1.24x on
an Intel Xeon, the ``tiny`` step alone 1.08-1.18x slower, as the next step's dispatch no
longer overlaps the running one (a model whose scratch stays under 32 MB has no faults to
spare); the whole quickstart, where the input pipeline shares the cores with the step,
faster with it on the Zen 5 machine (69.1 and 69.2 s against 71.5 and 72.6 s), not on the
Intel one (113.2-125.4 s against 112.9-114.9). Hence on
by default in ``main`` when the backend is the CPU (``--noreuse_cpu_scratch`` turns it
off): :func:`run_cpu_calls_inline` before the backend starts, :func:`keep_freed_blocks`
once it is known to be the CPU, so a GPU host's ``malloc`` is left as it is. Peak
resident size within 11 % of the default's (higher in one run, lower in another). Calls
over several devices still run on JAX's threads. Capping ``malloc`` at one arena spares
the faults as well but made the ``tiny`` step 1.5x slower (lock contention).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1  # free heap top above this many bytes goes back to the system
_M_MMAP_MAX = -4  # at most this many blocks served by mmap; 0: none


def reuse_cpu_scratch() -> bool:
    """:func:`run_cpu_calls_inline`, then :func:`keep_freed_blocks`: call it before JAX
    starts its backend. Returns False, changing nothing, where the C library is not glibc."""
    return run_cpu_calls_inline() and keep_freed_blocks()


def run_cpu_calls_inline() -> bool:
    """Runs single-device CPU calls on the calling thread, where glibc can then keep their
    scratch (else returns False, changing nothing). Call it before JAX starts its backend
    (the first computation or ``jax.devices()``): the setting is read when the CPU client
    is made. No effect on GPU or TPU calls."""
    if not _glibc():
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


def keep_freed_blocks() -> bool:
    """Tells glibc to serve large blocks from the heap and not to trim it (at any time).
    Returns False, changing nothing, where the C library is not glibc (macOS, musl)."""
    if not _glibc():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # a threshold of -1: never trim
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def _glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
