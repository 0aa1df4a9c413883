"""The global training order: which example fills each position of the training stream.

The stream is the same whatever the number of processes: epoch e is a permutation of the
whole split drawn from (seed, e), cut to whole global batches. This module imports no JAX,
so that grain worker processes (which unpickle it) start quickly.
"""

from __future__ import annotations

import sys

import numpy as np


class EpochOrder:
    """Element `i` is the split index of the example at global stream position `i`.

    Each epoch holds `batches_per_epoch(num_examples, batch_size)` whole global batches of
    a fresh permutation; the remaining examples of the permutation are left out of that
    epoch (another permutation leaves out others).
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, num_epochs: int | None):
        self.num_examples, self.seed = num_examples, seed
        self.epoch_length = batches_per_epoch(num_examples, batch_size) * batch_size
        self.length = sys.maxsize if num_epochs is None else num_epochs * self.epoch_length
        self._cached = (-1, np.empty(0, np.int64))  # (epoch, its permutation)

    def __len__(self) -> int:
        return self.length

    def permutation(self, epoch: int) -> np.ndarray:
        """int [N]: the order of the examples in `epoch`, a function of (seed, epoch)."""
        cached_epoch, order = self._cached  # one read: grain reads from several threads
        if cached_epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            self._cached = (epoch, order)
        return order

    def __getitem__(self, position: int) -> int:
        if not 0 <= position < self.length:
            raise IndexError(f"stream position {position} not in [0, {self.length})")
        epoch, offset = divmod(position, self.epoch_length)
        return int(self.permutation(epoch)[offset])


def batches_per_epoch(num_examples: int, batch_size: int) -> int:
    """floor(N / B), the global batches of an epoch; at least one."""
    if num_examples < batch_size:
        raise ValueError(f"batch_size {batch_size} is more than the {num_examples} examples")
    return num_examples // batch_size
