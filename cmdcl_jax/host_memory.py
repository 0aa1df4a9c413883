"""Keeps freed host memory in the process, so XLA's per-call buffers are not faulted in anew.

On the CPU, XLA allocates each call's scratch buffer with ``malloc`` and frees it when the
call ends (195 MB for the ``small`` preset's training step). glibc serves a block that
large with a fresh ``mmap`` and unmaps it on ``free``, so every step touches the whole
buffer again through page faults, 4 KB each: about 50,000 per ``small`` step, a fifth of
its time (BENCHMARKS.md). :func:`keep_freed_memory` tells glibc to take such blocks from
its heap and keep them there once freed, so the next step reuses the same pages.

The cost: memory freed by the process is not returned to the system until it exits (its
resident size stays at its peak), and all threads share one ``malloc`` arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1  # free heap top above this many bytes goes back to the system
_M_MMAP_MAX = -4  # at most this many blocks served by mmap; 0: none
_M_ARENA_MAX = -8  # at most this many arenas; blocks of other arenas' threads are mmapped


def keep_freed_memory() -> bool:
    """Sets glibc's ``malloc`` to serve large blocks from one heap that it never trims.

    Call it before JAX starts its backend (the first computation or ``jax.devices()``):
    threads that have already allocated keep their own arenas, whose large blocks glibc
    still maps and unmaps per call. Returns False, changing nothing, where the C library is
    not glibc (macOS, musl).
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
