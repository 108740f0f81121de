"""GA operators in DEAP's style: small functions that take individuals, change them in place and return a tuple.

Individuals are flat 0/1 lists laid out by :class:`evoprune.space.genome.Layout` (neuron genes group by group, then one
connection gene per unit). Randomness comes from Python's ``random`` module, as in DEAP, so ``random.seed`` makes a
run reproducible. ``ranks`` is a list, in group order, of each channel's importance rank in [0, 1]
(:func:`evoprune.space.importance.ranks`).
"""
from __future__ import annotations

import bisect
import math
import random
from typing import Sequence

import numpy as np
from deap import tools

from ..errors import ConfigError
from ..space.genome import Layout
from .budget import Budget

#: The names ``register(crossover=..., mutation=...)`` (and the CLI's --crossover, --mutation) choose from.
CROSSOVERS = ("paper", "uniform")
MUTATIONS = ("level", "mixed", "guided", "bitflip", "swap", "width")
OBJECTIVES = ("budget", "nsga2", "topk")  # the selections: sel_budget, sel_nsga2, sel_topk
INITS = ("importance", "random")  # the initialisations: init_importance, init_random


# ---------------------------------------------------------------------------------------------------- crossover
def cut_point(layout: Layout, p_c: float) -> int:
    """The paper's crossover point: ``p_c`` of the way along the encoding, snapped to the nearest group boundary."""
    target = p_c * len(layout)
    bounds = layout.boundaries
    i = bisect.bisect_left(bounds, target)
    near = [b for b in bounds[max(i - 1, 0): i + 1]]
    return min(near, key=lambda b: (abs(b - target), b))


def cx_paper(ind1, ind2, layout: Layout, p_c: float = 0.6):
    """One-point crossover at the cut point set by ``p_c`` (on a group boundary): the tails are swapped.

    Slices of lists are copies, so unlike ``tools.cxTwoPoint`` on numpy individuals no views are swapped.
    """
    cut = cut_point(layout, p_c)
    tail1, tail2 = list(ind1[cut:]), list(ind2[cut:])
    ind1[cut:], ind2[cut:] = tail2, tail1
    return ind1, ind2


def cx_group_uniform(ind1, ind2, layout: Layout, indpb: float = 0.5):
    """Swap whole groups (and single connection genes) between parents, each with probability ``indpb``."""
    segments = [layout.group_slice(i) for i in range(len(layout.group_sizes))]
    segments += [slice(layout.n_neurons + j, layout.n_neurons + j + 1) for j in range(layout.n_connections)]
    for sl in segments:
        if random.random() < indpb:
            a, b = list(ind1[sl]), list(ind2[sl])
            ind1[sl], ind2[sl] = b, a
    return ind1, ind2


# ---------------------------------------------------------------------------------------------------- mutation
def mut_guided(individual, layout: Layout, ranks: Sequence[np.ndarray], indpb: float, conn_indpb: float = 0.0,
               sharpness: float = 4.0):
    """Importance-guided mutation: about ``indpb`` of each group's channels change state; a switch-off prefers
    low-importance kept channels and a switch-on prefers high-importance removed ones (weights ``exp(±sharpness *
    rank)``). Each connection gene flips with probability ``conn_indpb``."""
    for i, r in enumerate(ranks):
        sl = layout.group_slice(i)
        genes = individual[sl]
        n = _binomial(len(genes), indpb)
        if n == 0:
            continue
        # the kept and removed channels in index order, with their weights, updated flip by flip
        on = [k for k, v in enumerate(genes) if v]
        off = [k for k, v in enumerate(genes) if not v]
        w_on = [math.exp(-sharpness * r[j]) for j in on]
        w_off = [math.exp(sharpness * r[j]) for j in off]
        for _ in range(n):
            if off and (not on or random.random() < 0.5):
                k = random.choices(off, weights=w_off)[0]
                genes[k] = 1
                _move(k, off, w_off, on, w_on, math.exp(-sharpness * r[k]))
            elif on:
                k = random.choices(on, weights=w_on)[0]
                genes[k] = 0
                _move(k, on, w_on, off, w_off, math.exp(sharpness * r[k]))
        individual[sl] = genes
    for j in range(layout.n_neurons, len(layout)):
        if random.random() < conn_indpb:
            individual[j] = 1 - individual[j]
    return (individual,)


def _move(k, src, w_src, dst, w_dst, weight):
    """Move channel ``k`` from the sorted list ``src`` to the sorted list ``dst``, with its weight."""
    i = bisect.bisect_left(src, k)
    del src[i], w_src[i]
    j = bisect.bisect_left(dst, k)
    dst.insert(j, k)
    w_dst.insert(j, weight)


def mut_swap(individual, layout: Layout, ranks: Sequence[np.ndarray], indpb: float, sharpness: float = 0.0):
    """Channel identity at constant widths: in every group about ``indpb`` of the kept channels trade places with as
    many removed ones, so each layer's width (and the plan's MACs) stay the same while WHICH channels are kept
    changes. ``sharpness`` biases the trade by importance rank (weights ``exp(±sharpness * rank)``, as in
    :func:`mut_guided`); 0 chooses uniformly, so importance can bias the search but does not fix it."""
    for i, r in enumerate(ranks):
        sl = layout.group_slice(i)
        genes = individual[sl]
        on = [k for k, v in enumerate(genes) if v]
        off = [k for k, v in enumerate(genes) if not v]
        n = min(_binomial(len(on), indpb), len(off))
        if n == 0:
            continue
        for k in _weighted_sample(on, [-sharpness * r[k] for k in on], n):
            genes[k] = 0
        for k in _weighted_sample(off, [sharpness * r[k] for k in off], n):
            genes[k] = 1
        individual[sl] = genes
    return (individual,)


def mut_width(individual, layout: Layout, ranks: Sequence[np.ndarray], sigma: float = 0.35, n_groups: int = 1):
    """Layer widths: ``n_groups`` random groups grow or shrink by a factor ``exp(N(0, sigma))`` (the most important
    removed channels come back first, the least important kept ones go first). Under a budget, the repair that
    follows (the toolbox decorates every mutation with it) scales all groups back to the budget, so width moves
    between layers at (nearly) equal MACs. Connection genes are left alone."""
    n_groups = min(n_groups, len(ranks))
    for i in random.sample(range(len(ranks)), n_groups):
        sl = layout.group_slice(i)
        genes = individual[sl]
        have = sum(genes)
        want = min(len(genes), max(1, round(have * math.exp(random.gauss(0.0, sigma)))))
        if want == have:
            want = min(len(genes), have + 1) if random.random() < 0.5 else max(1, have - 1)
        individual[sl] = _set_count(genes, want, ranks[i])
    return (individual,)


def mut_mixed(individual, layout: Layout, ranks: Sequence[np.ndarray], indpb: float, conn_indpb: float = 0.0,
              sigma: float = 0.35):
    """The three moves together: a width move (:func:`mut_width`, one group), a channel-identity trade at constant
    widths (:func:`mut_swap`, uniform choice) and, with probability ``conn_indpb`` each, connection-gene flips."""
    mut_width(individual, layout, ranks, sigma=sigma)
    mut_swap(individual, layout, ranks, indpb)
    for j in range(layout.n_neurons, len(layout)):
        if random.random() < conn_indpb:
            individual[j] = 1 - individual[j]
    return (individual,)


def mut_level(individual, layout: Layout, ranks: Sequence[np.ndarray], cost, *, min_keep: int = 1,
              round_to: int | None = None, levels: int = 16, conn_indpb: float = 0.0, swap_indpb: float = 0.0):
    """Level-switch (after EvoPress): width moves from one group to another at equal cost. A random group gives up
    one level (``size / levels`` channels, in multiples of ``round_to``; its least important kept ones go) and a
    second group takes as many levels as fit in the cost freed (its most important removed ones come back), so a
    child costs at most what its parent did and differs from it in one place. ``cost(counts, active)`` is the
    plan cost (MACs, params or predicted ms) of per-group kept counts and active units. Geometrically many moves
    (one half the time, two a quarter...); then about ``swap_indpb`` of every group's kept channels trade places
    with removed ones (:func:`mut_swap`) and each connection gene flips with probability ``conn_indpb`` (the
    repair that follows rebalances the widths around a toggled unit)."""
    counts = [int(c) for c in layout.kept_counts(individual)]
    active = layout.active_connections(individual)
    sizes = layout.group_sizes
    moves = 1
    while moves < 4 and random.random() < 0.5:
        moves += 1
    for _ in range(moves if len(sizes) > 1 else 0):
        a, b = random.sample(range(len(sizes)), 2)
        step_a, step_b = (_level(sizes[i], levels, round_to) for i in (a, b))
        if counts[a] - step_a < max(min_keep, 1) or counts[b] >= sizes[b]:
            continue
        before = cost(counts, active)
        counts[a] -= step_a
        while counts[b] < sizes[b]:
            trial = counts[:b] + [min(sizes[b], counts[b] + step_b)] + counts[b + 1:]
            if cost(trial, active) > before:
                break
            counts = trial
    for i, want in enumerate(counts):
        sl = layout.group_slice(i)
        individual[sl] = _set_count(individual[sl], want, ranks[i])
    if swap_indpb:
        mut_swap(individual, layout, ranks, swap_indpb)
    for j in range(layout.n_neurons, len(layout)):
        if random.random() < conn_indpb:
            individual[j] = 1 - individual[j]
    return (individual,)


def _level(size: int, levels: int, round_to: int | None) -> int:
    """One level of a group's width: ``size / levels`` channels, a multiple of ``round_to`` (at least one)."""
    step = max(1, round(size / levels))
    if round_to and round_to > 1:
        step = max(round_to, round(step / round_to) * round_to)
    return min(step, size)


def _weighted_sample(items: list, logits: list, n: int) -> list:
    """``n`` distinct items drawn without replacement with probabilities ``softmax(logits)``, seeded from Python's
    ``random``."""
    w = np.exp(np.asarray(logits, dtype=float) - max(logits))
    rng = np.random.default_rng(random.getrandbits(64))
    return [items[j] for j in rng.choice(len(items), size=n, replace=False, p=w / w.sum())]


def _binomial(n: int, p: float) -> int:
    """A Binomial(n, p) draw from numpy's exact sampler, seeded from Python's ``random`` (DEAP's source of
    randomness), so that ``random.seed`` alone still makes the operators reproducible."""
    return int(np.random.default_rng(random.getrandbits(64)).binomial(n, p))


# ---------------------------------------------------------------------------------------------------- repair
def repair(individual, space, ranks: Sequence[np.ndarray], *, macs_budget: float | None = None,
           params_budget: float | None = None, fill: float | None = None, latency=None,
           latency_budget: float | None = None):
    """Enforce ``space.min_keep`` and ``space.round_to`` in every group, then shrink the individual until it fits
    the MACs/params budget, and the latency budget in ms (``latency``: a :class:`evoprune.deploy.latency.LatencyTable`
    of ``space`` that predicts it).

    Shrinking keeps the most important of the currently kept channels of every group, by one common factor found by
    bisection on the analytic cost. An individual that cannot fit even at ``min_keep`` is left at its smallest.
    With ``fill`` (e.g. 0.98), an individual using less than ``fill`` of the budget grows back towards it, switching
    on the most important removed channels of every group by one common factor: plans then compete on their shape
    at (nearly) equal cost.
    """
    layout = space.layout
    counts = []
    for i, g in enumerate(space.groups):
        sl = layout.group_slice(i)
        genes = individual[sl]
        want = _legal_count(sum(genes), g.size, space.min_keep, space.round_to)
        individual[sl] = _set_count(genes, want, ranks[i])
        counts.append(want)
    if latency_budget is not None and latency is None:
        raise ConfigError("latency_budget needs latency, a LatencyTable of the space")
    limits = [(lim, i) for i, lim in enumerate((macs_budget, params_budget, latency_budget)) if lim is not None]
    if not limits:
        return (individual,)
    active = layout.active_connections(individual)

    def used(cs):  # the share of each budget that counts ``cs`` use
        analytic = macs_budget is not None or params_budget is not None
        costs = (*(space.cost_from_counts(cs, active) if analytic else (0, 0)),
                 latency.predict_counts(cs, active) if latency_budget is not None else 0.0)
        return [costs[i] / lim if lim > 0 else (0.0 if costs[i] <= 0 else math.inf) for lim, i in limits]

    def fits(cs):
        return all(u <= 1.0 for u in used(cs))

    def legal(cs):
        return [_legal_count(c, g.size, space.min_keep, space.round_to, up=False) for c, g in zip(cs, space.groups)]

    if fits(counts):
        if fill is None or all(u >= fill for u in used(counts)):
            return (individual,)
        def counts_for(f):  # grow: switch on the same share f of every group's removed channels
            return legal([c + int(f * (g.size - c)) for c, g in zip(counts, space.groups)])
    else:
        def counts_for(f):  # shrink: keep the same share f of every group's kept channels
            return legal([max(1, round(f * c)) for c in counts])
    final = counts_for(_largest_fitting(counts_for, fits))
    for i, want in enumerate(final):
        sl = layout.group_slice(i)
        individual[sl] = _set_count(individual[sl], want, ranks[i])
    return (individual,)


def _largest_fitting(counts_for, fits, steps: int = 20) -> float:
    """The largest ``f`` in [0, 1] (to ``2**-steps``) with ``fits(counts_for(f))``, by bisection; 0 if none."""
    if fits(counts_for(1.0)):
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if fits(counts_for(mid)):
            lo = mid
        else:
            hi = mid
    return lo


def _legal_count(count: int, size: int, min_keep: int, round_to: int | None, up: bool = True) -> int:
    count = max(count, min(min_keep, size))
    if round_to and round_to > 1 and count < size:
        lower = (count // round_to) * round_to
        upper = lower + round_to if lower < count else lower
        count = upper if up else lower
        count = min(max(count, round_to, min(min_keep, size)), size)
    return min(count, size)


def _set_count(genes: list, want: int, rank: np.ndarray) -> list:
    """Switch channels on (most important first) or off (least important first) until ``want`` are on."""
    arr = np.asarray(genes, dtype=np.int64)
    have = int(arr.sum())
    if have < want:
        off = np.flatnonzero(arr == 0)
        arr[off[np.argsort(-rank[off], kind="stable")[: want - have]]] = 1
    elif have > want:
        on = np.flatnonzero(arr)
        arr[on[np.argsort(rank[on], kind="stable")[: have - want]]] = 0
    else:
        return list(genes)
    return arr.tolist()


# ---------------------------------------------------------------------------------------------------- initialisation
def init_importance(icls, layout: Layout, ranks: Sequence[np.ndarray], keep_range=(0.2, 1.0), noise: float = 0.02,
                    spread: float = 0.0, scores: Sequence[np.ndarray] | None = None, p_global: float = 0.0,
                    p_cut: float | Sequence[float] = 0.0):
    """An individual seeded from importance; each connection unit cut with probability ``p_cut`` (one for all units,
    or one per unit; default 0: all active). Called N times it seeds a spread of keep ratios and of layer-width
    allocations:

    * a keep ratio ``r`` is drawn from ``keep_range``;
    * with probability ``p_global`` (needs raw ``scores``), channels are ranked ACROSS groups (each score divided by
      its group's mean, as torch-pruning's global pruning does) and the top ``r`` of all channels are kept;
    * otherwise each group keeps its top ``r * exp(N(0, spread))`` channels (``spread=0``: uniform widths);
    * finally each gene flips with probability ``noise``.
    """
    lo, hi = keep_range
    r = random.uniform(lo, hi)
    genes = []
    if scores is not None and random.random() < p_global:
        normed = [np.asarray(s, dtype=float) / max(float(np.mean(s)), 1e-12) for s in scores]
        threshold = np.quantile(np.concatenate(normed), 1.0 - r)
        for s, rank in zip(normed, ranks):
            keep = s >= threshold
            if not keep.any():
                keep = rank >= rank.max()  # never empty a group: keep its most important channel
            genes.extend(int(x) for x in keep)
    else:
        for rank in ranks:
            ratio = min(1.0, r * math.exp(random.gauss(0.0, spread))) if spread else r
            n = max(1, round(ratio * len(rank)))
            genes.extend(int(x) for x in (rank >= np.sort(rank)[len(rank) - n]))
    genes.extend([1] * layout.n_connections)
    ind = icls(genes)
    if noise:
        tools.mutFlipBit(ind, noise)
        ind[layout.n_neurons:] = [1] * layout.n_connections
    probs = [p_cut] * layout.n_connections if isinstance(p_cut, (int, float)) else list(p_cut)
    if any(probs):
        ind[layout.n_neurons:] = [int(not p or random.random() >= p) for p in probs]
    return ind


def init_random(icls, layout: Layout, keep_range=(0.3, 1.0), conn_keep: float = 0.8):
    """A random individual: each channel kept with a probability drawn from ``keep_range``."""
    p = random.uniform(*keep_range)
    genes = [int(random.random() < p) for _ in range(layout.n_neurons)]
    genes += [int(random.random() < conn_keep) for _ in range(layout.n_connections)]
    return icls(genes)


# ---------------------------------------------------------------------------------------------------- selection
def sel_topk(individuals, k: int):
    """Truncation selection: the ``k`` best by (accuracy, then fewer MACs)."""
    return sorted(individuals, key=lambda ind: (ind.fitness.values[0], -ind.fitness.values[1]), reverse=True)[:k]


def sel_budget(individuals, k: int, budget, space=None):
    """Budget mode: feasible individuals first, by score then lower cost; infeasible ones after every feasible one,
    least over the budget first. ``budget``: a :class:`~evoprune.evolve.budget.Budget` (``space`` counts a params
    budget's cost), or a number compared with the fitness's cost (MACs, or ms with a latency table). A number must be
    > 0: :class:`~evoprune.errors.ConfigError` otherwise (evoprune 0.1 ranked every individual infeasible)."""
    if not isinstance(budget, Budget):
        budget = Budget("macs", budget)  # a bare limit on the fitness's cost, whatever its unit
    return sorted(individuals, key=lambda ind: budget.rank(ind, space), reverse=True)[:k]


def sel_nsga2(individuals, k: int):
    """NSGA-II over (accuracy up, MACs down): ``tools.selNSGA2``."""
    return tools.selNSGA2(individuals, k)
