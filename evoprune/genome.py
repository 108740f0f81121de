"""The chromosome layout of an individual, after the paper's Fig. 2.

An individual is a flat sequence of 0/1 genes: first the NEURON chromosome (one gene per channel, group after group,
in network order: 1 keeps the channel, 0 removes it), then the CONNECTION chromosome (one gene per connection unit:
0 cuts the connection and bypasses the unit). Individuals are plain lists of ints (DEAP's favourite container), so
they pickle small, and never carry a module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Where each group's genes and the connection genes sit in an individual."""

    group_names: tuple[str, ...]
    group_sizes: tuple[int, ...]
    connection_names: tuple[str, ...]

    @property
    def n_neurons(self) -> int:
        return int(sum(self.group_sizes))

    @property
    def n_connections(self) -> int:
        return len(self.connection_names)

    def __len__(self) -> int:
        return self.n_neurons + self.n_connections

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each group's genes; the last entry is where the connection chromosome starts."""
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.group_sizes, dtype=np.int64)]))

    def group_slice(self, i: int) -> slice:
        off = self.offsets
        return slice(off[i], off[i + 1])

    @property
    def connection_slice(self) -> slice:
        return slice(self.n_neurons, len(self))

    @property
    def boundaries(self) -> tuple[int, ...]:
        """Every position where a chromosome segment starts or ends (valid crossover cut points)."""
        cuts = list(self.offsets) + [self.n_neurons + i for i in range(1, self.n_connections + 1)]
        return tuple(sorted(set(cuts)))

    def kept_counts(self, genes: Sequence[int]) -> np.ndarray:
        arr = np.asarray(genes[: self.n_neurons], dtype=np.int64)
        return np.add.reduceat(arr, np.asarray(self.offsets[:-1]), dtype=np.int64) if len(arr) else arr

    def active_connections(self, genes: Sequence[int]) -> np.ndarray:
        return np.asarray(genes[self.n_neurons:], dtype=bool)

    def ones(self) -> list[int]:
        return [1] * len(self)
