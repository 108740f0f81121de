"""The health of a population: how diverse its genomes are, and offspring that are new.

A GA stalls when its population collapses onto copies of a few plans: the children of near-identical parents are
their parents again, the fitness cache answers them for free, and a generation explores nothing. These are the
measures the search logs per generation (:func:`diversity`), the children of a generation (:func:`vary`), the
duplicate rejection it applies to them (:func:`fresh`) and the distinct plans it scores (:func:`distinct`).
"""
from __future__ import annotations

import random

import numpy as np
from deap import algorithms, base


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




def distinct(individuals) -> dict:
    """``{genome: the first individual with it}``: each distinct plan is scored once."""
    unique = {}
    for ind in individuals:
        unique.setdefault(tuple(ind), ind)
    return unique


def vary(toolbox: base.Toolbox, parents: list, n: int) -> list:
    """``n`` children of ``parents``: DEAP's ``algorithms.varAnd`` over ``n`` (rounded up to even) parents drawn in
    pairs of two different ones, with crossover always on (the paper's p_c is the cut point of
    :func:`evoprune.evolve.operators.cx_paper`, not a crossover rate) and mutation probability ``toolbox.p_mut`` per
    child. ``varAnd`` clones, so the parents are left as they are; fitnesses are invalidated."""
    drawn = []
    while len(drawn) < n:
        drawn.extend(random.sample(parents, 2) if len(parents) > 1 else parents * 2)
    return algorithms.varAnd(drawn, toolbox, cxpb=1.0, mutpb=toolbox.p_mut)[:n]


__all__ = ["diversity", "fresh", "vary", "distinct"]
