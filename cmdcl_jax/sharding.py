"""Device mesh, parameter and batch shardings.

The mesh has two axes: ``data`` (batch parallel) and ``fsdp`` (batch parallel too, and
parameters plus optimizer state sharded over it). A size of -1 fills the devices left.
With ``fsdp == 1`` (the default) every parameter is replicated: plain data parallelism
over every device of every process. With ``fsdp > 1`` an array of at least ``min_size``
elements is split over ``fsdp``; smaller ones stay replicated (splitting them saves
little memory for the gathers it costs).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 2**14  # elements; the default of ``config.mesh.fsdp_min_size``


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (all devices of all processes by default)."""
    devices = jax.devices() if devices is None else devices
    sizes = [data, fsdp]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data} fsdp={fsdp}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices do not divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} != {len(devices)} devices")
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def param_sharding(
    shape: tuple[int, ...], mesh: Mesh, min_size: int = MIN_SHARDED_SIZE
) -> NamedSharding:
    """Replicated, or with ``fsdp > 1`` split over ``fsdp`` along the largest axis that
    divides by it (arrays under ``min_size`` elements or indivisible stay replicated)."""
    n = mesh.shape["fsdp"]
    if n == 1 or math.prod(shape) < min_size:
        return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % n == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    """A whole copy on every device."""
    return NamedSharding(mesh, P())


def tree_shardings(tree, mesh: Mesh, min_size: int = MIN_SHARDED_SIZE):
    """:func:`param_sharding` for every array leaf of ``tree``."""
    return jax.tree.map(lambda x: param_sharding(np.shape(x), mesh, min_size), tree)


def place_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local host arrays -> global arrays sharded over the batch axes.

    On CPU devices this returns once the arrays are copied. XLA copies a host array that it
    cannot alias on a worker thread; a call given an array still being copied then runs on
    that thread when the copy lands, not on the calling one, and there glibc maps and unmaps
    the call's scratch every time, which ``--reuse_cpu_scratch`` exists to spare
    (``host_memory``): up to 47,000 page faults and 20-50 ms per ``small`` benchmark step
    (BENCHMARKS.md). The copy itself is a ``memcpy`` of the batch.
    """
    sharding = batch_sharding(mesh)
    placed = {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }
    if mesh.devices.flat[0].platform == "cpu":
        jax.block_until_ready(placed)
    return placed
