"""The health of a population: how diverse its genomes are, and offspring that are new.

A GA stalls when its population collapses onto copies of a few plans: the children of near-identical parents are
their parents again, the fitness cache answers them for free, and a generation explores nothing. These are the
measures the search logs per generation (:func:`diversity`) and the duplicate rejection it applies to every
generation's children (:func:`fresh`).
"""
from __future__ import annotations

import numpy as np


def diversity(population, layout) -> dict:
    """``hamming``: the mean pairwise Hamming distance between the genomes, as a share of the genome's length;
    ``distinct``: the number of distinct width vectors (kept channels per group, and the connection genes)."""
    n = len(population)
    if n == 0:
        return {"hamming": 0.0, "distinct": 0}
    g = np.asarray([list(ind) for ind in population], dtype=np.float32)
    ones = g.sum(1)
    # |a xor b| = |a| + |b| - 2 a.b over every pair, the diagonal (0) left out of the mean
    dist = ones[:, None] + ones[None, :] - 2.0 * (g @ g.T)
    hamming = float(dist.sum() / (n * (n - 1)) / g.shape[1]) if n > 1 else 0.0
    widths = {tuple(layout.kept_counts(ind).tolist()) + tuple(ind[layout.n_neurons:]) for ind in population}
    return {"hamming": round(hamming, 6), "distinct": len(widths)}


def fresh(toolbox, children: list, others, tries: int = 5) -> list:
    """``children`` with every duplicate (of ``others``, e.g. the current population, or of an earlier child)
    mutated again, up to ``tries`` times (``toolbox.mutate``, which repairs); a child still a copy after that is
    kept. In place; returns the list."""
    seen = {tuple(ind) for ind in others}
    for child in children:
        toolbox.settle([child])
        for _ in range(tries):
            if tuple(child) not in seen:
                break
            toolbox.mutate(child)
            del child.fitness.values
        seen.add(tuple(child))
    return children


__all__ = ["diversity", "fresh"]
