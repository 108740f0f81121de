"""The chromosome layout of an individual, after the paper's Fig. 2.

An individual is a flat sequence of 0/1 genes: first the NEURON chromosome (one gene per channel, group after group,
in network order: 1 keeps the channel, 0 removes it), then the CONNECTION chromosome (one gene per connection unit:
0 cuts the connection and bypasses the unit). Individuals are plain lists of ints (DEAP's favourite container), so
they pickle small, and never carry a module. :func:`decode` and :func:`encode` turn individuals into
:class:`~evoprune.space.plan.PruningPlan` objects and back for a space.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import PlanError
from .plan import PruningPlan, validate


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

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each group's genes; the last entry is where the connection chromosome starts."""
        return tuple(int(x) for x in np.concatenate([[0], np.cumsum(self.group_sizes, dtype=np.int64)]))

    @functools.cached_property
    def slices(self) -> tuple[slice, ...]:
        """Each group's genes."""
        off = self.offsets
        return tuple(slice(a, b) for a, b in zip(off[:-1], off[1:]))

    def group_slice(self, i: int) -> slice:
        return self.slices[i]

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
        return np.add.reduceat(arr, self._starts, dtype=np.int64) if len(arr) else arr

    @functools.cached_property
    def _starts(self) -> np.ndarray:
        return np.asarray(self.offsets[:-1])

    def active_connections(self, genes: Sequence[int]) -> np.ndarray:
        return np.asarray(genes[self.n_neurons:], dtype=bool)

    def ones(self) -> list[int]:
        return [1] * len(self)


# ---------------------------------------------------------------------------------------------------- genes <-> plans
def check_genes(space, individual: Sequence[int]) -> np.ndarray:
    """The genes as a uint8 array; :class:`PlanError` unless ``individual`` is a 0/1 sequence of ``space``'s
    length."""
    try:
        n = len(individual)
    except TypeError:
        raise PlanError(f"an individual must be a sequence of 0/1 genes, got {type(individual).__name__}") \
            from None
    if n != len(space.layout):
        raise PlanError(f"individual has {n} genes, this space needs {len(space.layout)} "
                        f"({space.layout.n_neurons} neuron + {space.layout.n_connections} connection genes)")
    try:  # the common case, a list of 0/1 ints, in one C call
        arr = np.frombuffer(bytearray(individual), dtype=np.uint8)
        if arr.max(initial=0) <= 1:
            return arr
    except (TypeError, ValueError):  # floats, numpy arrays of other dtypes, or out-of-range values
        pass
    try:
        arr = np.asarray(individual)
        fine = arr.ndim == 1 and arr.dtype.kind in "biuf" and bool(np.isin(arr, (0, 1)).all())
    except Exception:  # ragged, nested or undecodable genes: find the culprit one by one
        fine = False
    if not fine:
        for i, v in enumerate(individual):
            if not isinstance(v, (bool, int, float, np.integer, np.floating, np.bool_)) or v not in (0, 1):
                raise PlanError(f"gene {i} is {v!r}; genes must be 0 or 1")
    return arr.astype(np.uint8)


def decode(space, individual: Sequence[int], *, check: bool = True) -> PruningPlan:
    """The plan an individual encodes. Raises :class:`PlanError` for a malformed individual (``check=False``: the
    caller already ran :func:`check_genes`)."""
    arr = check_genes(space, individual) if check else np.asarray(individual, dtype=np.uint8)
    groups = {}
    layout = space.layout
    for g, sl in zip(space.groups, layout.slices):
        kept = np.flatnonzero(arr[sl])
        if len(kept) < space.min_keep:
            raise PlanError(f"group {g.name!r} keeps {len(kept)} of {g.size} channels, below "
                            f"min_keep={space.min_keep}; repair the individual first")
        groups[g.name] = tuple(kept.tolist())
    conns = {u.name: bool(arr[layout.n_neurons + j]) for j, u in enumerate(space.units)}
    return PruningPlan(groups, conns, fingerprint=space.fingerprint)


def encode(space, plan: PruningPlan) -> list[int]:
    """The individual of a valid ``plan`` (groups missing from it are kept whole, units missing stay active)."""
    validate(space, plan)
    genes = space.layout.ones()
    for i, g in enumerate(space.groups):
        if g.name in plan.groups:
            sl = space.layout.group_slice(i)
            bits = [0] * g.size
            for k in plan.groups[g.name]:
                bits[k] = 1
            genes[sl] = bits
    for j, u in enumerate(space.units):
        genes[space.layout.n_neurons + j] = int(plan.connections.get(u.name, True))
    return genes
