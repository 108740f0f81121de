"""A knapsack allocator of layer widths (after HALP, NeurIPS 2022): the strongest non-evolutionary baseline for a
fixed cost budget, and a useful method in its own right (``method="knapsack"``: no fitness evaluations but one).

Each channel group chooses a width from its legal widths (multiples of ``round_to``, at least ``min_keep``). The value
of a width is the share of the group's summed importance that its most important channels kept carry, so every group is
worth 1 whole and a channel of a narrow group more than one of a wide group. The cost of a width is what it adds to the
plan's cost (MACs, params, or the latency table's predicted ms) with every other group held at the current widths: exact
for one group, a linearisation for all of them, since a conv's cost is the product of its input and output widths. A
multiple-choice knapsack over these (dynamic programming on a grid of ``bins`` cost steps) gives the widths of highest
value within the budget; the repair then makes them exactly feasible (and fills what is left), and the allocation is
linearised again around the result, ``iters`` times. The best value found wins. Connection units all stay active: the
knapsack allocates widths, not depth.

Values add up, so the knapsack empties the groups whose channels cost most (on ResNet-18 at CIFAR size, the stem
and the stage-1 residual stream) down to any floor it is given, and accuracy goes with them; each group keeps at
least :data:`MIN_RATIO` of its channels. The value normalisation (share of the group's sum) and the floor (0.3)
were chosen on B7's val-choose images (never on val-report) from {group mean, share of the sum, sum / sqrt(size)}
x {0.2, 0.3} x {L1, BN importance}; the floor mattered most (+9 pp at 0.3 over 0.2).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

MIN_RATIO = 0.3  # the share of every group the knapsack keeps at least (B7, chosen on val-choose)


def width_values(scores: np.ndarray, widths: Sequence[int]) -> np.ndarray:
    """The value of keeping each width of ``widths``: the share of the group's summed scores that many channels carry,
    most important first (1 for the whole group)."""
    s = np.sort(np.asarray(scores, dtype=float) / max(float(np.sum(scores)), 1e-12))[::-1]
    total = np.concatenate([[0.0], np.cumsum(s)])
    return total[np.asarray(widths, dtype=int)]


def legal_widths(size: int, min_keep: int, round_to: int | None, min_ratio: float = 0.0) -> list[int]:
    """The widths a group may keep: multiples of ``round_to`` (or every width), at least ``min_keep`` and
    ``min_ratio`` of the group, and the whole group."""
    step = round_to if round_to and round_to > 1 else 1
    low = max(1, min(max(min_keep, int(np.ceil(min_ratio * size))), size))
    out = [w for w in range(step, size + 1, step) if w >= low]
    if not out or out[-1] != size:
        out.append(size)
    return out


def solve(values: Sequence[np.ndarray], costs: Sequence[np.ndarray], capacity: float, bins: int = 1000) -> list[int]:
    """Multiple-choice knapsack by dynamic programming: one choice per group, maximising the summed value with the
    summed cost (every cost >= 0) at most ``capacity``. Costs are rounded UP to ``capacity / bins`` steps, so the
    answer never exceeds the capacity. Returns each group's choice index (the cheapest choices if nothing fits)."""
    if capacity <= 0:
        return [int(np.argmin(c)) for c in costs]
    unit = capacity / bins
    dp = np.zeros(bins + 1)  # dp[b]: the best value at total cost steps <= b
    picks = []
    for v, c in zip(values, costs):
        steps = np.ceil(np.asarray(c) / unit - 1e-9).astype(int)
        best = np.full(bins + 1, -np.inf)
        pick = np.zeros(bins + 1, dtype=np.int32)
        for j in np.flatnonzero(steps <= bins):
            w = steps[j]
            cand = np.full(bins + 1, -np.inf)
            cand[w:] = dp[: bins + 1 - w] + v[j]
            better = cand > best
            best[better], pick[better] = cand[better], j
        dp = best
        picks.append(pick)
    if not np.isfinite(dp[-1]):
        return [int(np.argmin(c)) for c in costs]
    choice, b = [], bins
    for pick, c in zip(reversed(picks), reversed(costs)):
        j = int(pick[b])
        choice.append(j)
        b -= int(np.ceil(c[j] / unit - 1e-9))
    return choice[::-1]


def allocate(sizes: Sequence[int], scores: Sequence[np.ndarray], cost: Callable[[list[int]], float], budget: float,
             repair: Callable[[list[int]], list[int]], *, min_keep: int = 1, round_to: int | None = None,
             min_ratio: float = MIN_RATIO, iters: int = 4, bins: int = 1000) -> list[int]:
    """Per-group kept counts of the highest value whose ``cost(counts)`` fits ``budget``, from ``iters`` rounds of
    linearise-and-solve (module docstring), each group keeping at least ``min_ratio`` of its channels.
    ``repair(counts)`` returns legal counts within the budget (the uniform start is ``repair(sizes)``)."""
    widths = [legal_widths(n, min_keep, round_to, min_ratio) for n in sizes]
    values = [width_values(s, w) for s, w in zip(scores, widths)]
    counts = repair(list(sizes))

    def value(cs):
        return sum(float(width_values(s, [c])[0]) for s, c in zip(scores, cs))

    best, best_value = counts, value(counts)
    for _ in range(iters):
        base = cost(counts)
        deltas = []
        for g, ws in enumerate(widths):
            trial = list(counts)
            row = []
            for w in ws:
                trial[g] = w
                row.append(cost(trial) - base)
            deltas.append(np.asarray(row))
        low = [float(d.min()) for d in deltas]
        capacity = budget - base - sum(low)
        choice = solve(values, [d - m for d, m in zip(deltas, low)], capacity, bins)
        counts = repair([ws[j] for ws, j in zip(widths, choice)])
        v = value(counts)
        if v > best_value + 1e-9 and cost(counts) <= budget:
            best, best_value = counts, v
    return best


__all__ = ["allocate", "legal_widths", "solve", "width_values"]
