"""GA operators: alignment, rates, guided preferences, repair invariants, selection order."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from deap import base, tools

from evoprune import ConfigError, PruningSpace
from evoprune.evolve import operators as ops
from evoprune.validators import check_probability
from evoprune.space.genome import Layout
from evoprune.space.importance import channel_importance, ranks as to_ranks
from evoprune.evolve import vary
from evoprune.evolve.toolbox import creator_types, register


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)).eval()


@pytest.fixture(scope="module")
def setup():
    model = small_model()
    x = torch.randn(1, 3, 8, 8)
    space = PruningSpace.from_model(model, x, min_keep=2)
    imp = channel_importance(model, space, x, "l1")
    rank_map = to_ranks(imp)
    return model, x, space, [rank_map[g.name] for g in space.groups]


def segments(layout: Layout):
    return [layout.group_slice(i) for i in range(len(layout.group_sizes))] + \
        [slice(layout.n_neurons + j, layout.n_neurons + j + 1) for j in range(layout.n_connections)]


def test_cut_point_snaps_to_a_group_boundary():
    layout = Layout(("a", "b", "c"), (10, 20, 30), ("u",))
    assert layout.boundaries == (0, 10, 30, 60, 61)
    assert ops.cut_point(layout, 0.0) == 0
    assert ops.cut_point(layout, 1.0) == 61
    assert ops.cut_point(layout, 0.6) == 30  # 36.6 -> nearest boundary 30
    assert ops.cut_point(layout, 0.9) == 60


def test_paper_crossover_swaps_tails_at_the_boundary_and_keeps_alignment():
    layout = Layout(("a", "b", "c"), (10, 20, 30), ("u", "v"))
    a, b = [1] * len(layout), [0] * len(layout)
    c1, c2 = ops.cx_paper(a, b, layout, p_c=0.6)
    cut = ops.cut_point(layout, 0.6)
    assert len(c1) == len(c2) == len(layout)
    assert c1 == [1] * cut + [0] * (len(layout) - cut)
    assert c2 == [0] * cut + [1] * (len(layout) - cut)


def test_paper_crossover_on_numpy_individuals_swaps_copies_not_views():
    layout = Layout(("a", "b"), (4, 4), ())
    a, b = np.ones(8, dtype=int), np.zeros(8, dtype=int)
    ops.cx_paper(a, b, layout, p_c=0.5)
    assert a.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert b.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_group_uniform_crossover_moves_whole_groups():
    random.seed(1)
    layout = Layout(("a", "b", "c", "d"), (5, 6, 7, 8), ("u", "v", "w"))
    for _ in range(50):
        a, b = [1] * len(layout), [0] * len(layout)
        c1, c2 = ops.cx_group_uniform(a, b, layout)
        assert len(c1) == len(c2) == len(layout)
        for sl in segments(layout):
            assert len(set(c1[sl])) == 1 and len(set(c2[sl])) == 1  # each segment whole, from one parent
            assert c1[sl][0] != c2[sl][0]


def test_bitflip_rate_matches_indpb():
    random.seed(0)
    ind = [0] * 20000
    tools.mutFlipBit(ind, 0.1)
    assert abs(sum(ind) / len(ind) - 0.1) < 0.01


def test_mutation_is_applied_with_probability_p_mut_per_child(setup):
    model, x, space, ranks = setup
    tb = register(base.Toolbox(), space, lambda ind: (0.0, 0.0), p_mut=0.6, objective="topk", seed=3)
    calls = []
    tb.register("mutate", lambda ind: calls.append(1) or (ind,))
    parents = tb.population(4)
    for p in parents:
        p.fitness.values = (0.5, 1.0)
    children = vary(tb, parents, 2000)
    assert len(children) == 2000 and all(not c.fitness.valid for c in children)
    assert abs(len(calls) / 2000 - 0.6) < 0.04  # binomial sd ~ 0.011


def test_binomial_draws_follow_the_exact_distribution_at_small_n_p():
    """The default guided mutation flips about 3 of 512 channels: the count must be Binomial(512, 3/512), whose
    zero probability (about 5 %) a Gaussian approximation gets badly wrong."""
    from math import comb
    n, p, draws = 512, 3 / 512, 20000
    random.seed(0)
    counts = np.bincount([ops._binomial(n, p) for _ in range(draws)], minlength=12)[:12] / draws
    exact = np.array([comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(12)])
    assert np.abs(counts - exact).max() < 0.015, (counts, exact)
    random.seed(5)
    a = [ops._binomial(n, p) for _ in range(10)]
    random.seed(5)
    assert [ops._binomial(n, p) for _ in range(10)] == a  # Python's random.seed alone reproduces the draws


def test_swap_mutation_keeps_every_width_and_changes_which_channels_uniformly():
    random.seed(1)
    layout = Layout(("a", "b"), (40, 24), ("u",))
    ranks = [np.linspace(0, 1, 40), np.linspace(0, 1, 24)]
    dropped = np.zeros(40)
    changed = 0
    for _ in range(300):
        ind = [1] * 20 + [0] * 20 + [1] * 12 + [0] * 12 + [1]
        before = list(ind)
        ops.mut_swap(ind, layout, ranks, indpb=0.2)
        assert sum(ind[:40]) == 20 and sum(ind[40:64]) == 12 and ind[64] == 1  # widths and connection unchanged
        changed += ind != before
        dropped[:20] += [b and not a for a, b in zip(ind[:20], before[:20])]
    assert changed > 250
    # sharpness 0: the least and the most important halves of the kept channels are dropped about equally often
    assert 0.7 < dropped[:10].sum() / dropped[10:20].sum() < 1.4


def test_width_mutation_moves_width_between_layers_at_the_budget(setup):
    """mut_width changes one group's width; the repair then brings the plan back under the budget, so
    width has moved from some layers to others."""
    model, x, space, ranks = setup
    budget = 0.5 * space.base_macs
    tb = register(base.Toolbox(), space, lambda ind: (0.0, 0.0), mutation="width", macs_budget=budget, seed=2)
    moved = 0
    for _ in range(40):
        ind = tb.individual()
        before = space.layout.kept_counts(ind).tolist()
        tb.mutate(ind)
        after = space.layout.kept_counts(ind).tolist()
        macs = space.cost_of(ind)[0]
        assert macs <= budget
        moved += any(a > b for a, b in zip(after, before)) and any(a < b for a, b in zip(after, before))
    assert moved >= 20


def test_guided_mutation_prefers_low_importance_off_and_high_importance_on():
    random.seed(0)
    layout = Layout(("g",), (40,), ())
    rank = np.linspace(0, 1, 40)
    offs, ons = np.zeros(40), np.zeros(40)
    for trial in range(400):
        ind = [1] * 40 if trial % 2 else [0] * 40  # all kept: switch-offs; all removed: switch-ons
        before = list(ind)
        ops.mut_guided(ind, layout, [rank], indpb=0.1)
        for k, (b, a) in enumerate(zip(before, ind)):
            offs[k] += b == 1 and a == 0
            ons[k] += b == 0 and a == 1
    low, high = slice(0, 20), slice(20, 40)
    assert offs[low].sum() > 3 * offs[high].sum()
    assert ons[high].sum() > 3 * ons[low].sum()


def test_repair_enforces_min_keep_round_to_and_budget(setup):
    model, x, space, ranks = setup
    rounded = PruningSpace.from_model(model, x, min_keep=2, round_to=4)
    random.seed(0)
    full_macs = rounded.base_macs
    for trial in range(30):
        ind = [int(random.random() < random.uniform(0, 1)) for _ in range(len(rounded))]
        budget = full_macs * random.uniform(0.2, 0.9)
        (fixed,) = ops.repair(list(ind), rounded, ranks, macs_budget=budget)
        counts = rounded.layout.kept_counts(fixed)
        for g, c in zip(rounded.groups, counts):
            assert c >= 2
            assert c % 4 == 0 or c == g.size
        macs, _ = rounded.cost_of(fixed)
        floor = rounded.cost_from_counts([4] * len(rounded.groups), rounded.layout.active_connections(fixed))[0]
        assert macs <= budget or macs == floor
        assert fixed[rounded.layout.n_neurons:] == ind[rounded.layout.n_neurons:]  # connections untouched


def test_repair_shrinks_by_dropping_the_least_important_kept_channels(setup):
    model, x, space, ranks = setup
    ind = space.layout.ones()
    (fixed,) = ops.repair(list(ind), space, ranks, macs_budget=space.base_macs * 0.4)
    for i, g in enumerate(space.groups):
        kept = np.flatnonzero(fixed[space.layout.group_slice(i)])
        dropped = np.setdiff1d(np.arange(g.size), kept)
        if len(dropped):
            assert ranks[i][kept].min() > ranks[i][dropped].max()


def test_importance_init_keeps_the_top_channels_at_a_spread_of_ratios(setup):
    model, x, space, ranks = setup
    _, ind_cls = creator_types()
    random.seed(0)
    pop = [ops.init_importance(ind_cls, space.layout, ranks, (0.2, 1.0), noise=0.0) for _ in range(30)]
    fractions = []
    for ind in pop:
        assert len(ind) == len(space)
        for i, g in enumerate(space.groups):
            kept = np.flatnonzero(ind[space.layout.group_slice(i)])
            assert ranks[i][kept].min() >= np.sort(ranks[i])[g.size - len(kept)]  # the top-|kept| by importance
        fractions.append(sum(ind[: space.layout.n_neurons]) / space.layout.n_neurons)
    assert max(fractions) - min(fractions) > 0.4


class _Ind(list):
    class fitness:  # noqa: N801 - stand-in with the attribute DEAP selection reads
        pass


def _ind(acc, macs):
    i = _Ind()
    i.fitness = type("F", (), {"values": (acc, macs)})()
    return i


def test_budget_selection_ranks_every_feasible_plan_above_every_infeasible_one():
    pop = [_ind(0.99, 200), _ind(0.5, 90), _ind(0.7, 100), _ind(0.95, 150), _ind(0.7, 80)]
    chosen = ops.sel_budget(pop, 4, budget=100)
    assert [i.fitness.values for i in chosen] == [(0.7, 80), (0.7, 100), (0.5, 90), (0.95, 150)]


@pytest.mark.parametrize("bad", [0, -5, float("nan")])
def test_a_bare_budget_that_no_plan_can_meet_is_refused_naming_it(bad):
    with pytest.raises(ConfigError, match=r"budget.*> 0"):
        ops.sel_budget([_ind(0.9, 10)], 1, budget=bad)


def test_topk_is_truncation_by_score_then_macs():
    pop = [_ind(0.5, 10), _ind(0.9, 30), _ind(0.9, 20), _ind(0.1, 1)]
    assert [i.fitness.values for i in ops.sel_topk(pop, 2)] == [(0.9, 20), (0.9, 30)]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", None, True])
def test_probabilities_are_checked(bad):
    with pytest.raises(ConfigError, match="p_c"):
        check_probability("p_c", bad)


def test_repair_with_fill_grows_small_plans_back_to_the_budget(setup):
    model, x, space, ranks = setup
    budget = 0.6 * space.base_macs
    ind = space.layout.ones()
    for i, g in enumerate(space.groups):  # start far below the budget: 3 channels per group
        sl = space.layout.group_slice(i)
        ind[sl] = [1, 1, 1] + [0] * (g.size - 3)
    before = list(ind)
    (grown,) = ops.repair(list(ind), space, ranks, macs_budget=budget, fill=0.98)
    macs = space.cost_of(grown)[0]
    assert 0.9 * budget <= macs <= budget
    assert all(b <= a for b, a in zip(before, grown))  # only switches channels on
    (untouched,) = ops.repair(list(ind), space, ranks, macs_budget=budget)
    assert untouched == before


def test_importance_init_spreads_layer_allocations_and_can_rank_globally(setup):
    model, x, space, ranks = setup
    _, ind_cls = creator_types()
    scores = [np.linspace(1, 2, g.size) * (10.0 if i == 0 else 1.0) for i, g in enumerate(space.groups)]
    random.seed(1)
    ratios = []
    for _ in range(40):
        ind = ops.init_importance(ind_cls, space.layout, ranks, (0.5, 0.5), noise=0.0, spread=0.4)
        counts = space.layout.kept_counts(ind)
        ratios.append([c / g.size for c, g in zip(counts, space.groups)])
    ratios = np.array(ratios)
    assert ratios.std(axis=1).mean() > 0.05  # groups get different widths within one individual
    random.seed(2)
    glob = ops.init_importance(ind_cls, space.layout, ranks, (0.5, 0.5), noise=0.0, scores=scores, p_global=1.0)
    counts = space.layout.kept_counts(glob)
    assert all(c >= 1 for c in counts)
    # per-group normalisation: the x10 scale of group 0 does not make it keep everything
    assert counts[0] < space.groups[0].size
    assert abs(sum(counts) / space.layout.n_neurons - 0.5) < 0.1


def test_init_cut_seeds_connection_cuts_at_its_rate(setup):
    model, x, space, ranks = setup
    assert space.units
    _, icls = creator_types()
    random.seed(0)
    none = [ops.init_importance(icls, space.layout, ranks) for _ in range(200)]
    half = [ops.init_importance(icls, space.layout, ranks, p_cut=0.5) for _ in range(200)]
    conn = space.layout.connection_slice
    assert all(all(ind[conn]) for ind in none)  # the default cuts nothing
    share = np.mean([1 - g for ind in half for g in ind[conn]])
    assert 0.4 < share < 0.6, share
    mixed = PruningSpace.from_model(ResidualNet().eval(), torch.randn(1, 3, 8, 8))
    kinds = [u.kind for u in mixed.units]
    assert "residual" in kinds and "sequential" in kinds, kinds
    tb = register(base.Toolbox(), mixed, lambda ind: (0.0, 0.0), objective="nsga2", init_cut=1.0, seed=0)
    for ind in tb.population(5):  # the toolbox seeds cuts in residual units only; plain conv runs start uncut
        assert [not g for g in ind[mixed.layout.connection_slice]] == [k == "residual" for k in kinds]
    with pytest.raises(ConfigError, match="init_cut must be a probability"):
        register(base.Toolbox(), space, lambda ind: (0.0, 0.0), objective="nsga2", init_cut=1.5)


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus an identity shortcut: a residual unit."""

    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


class ResidualNet(nn.Module):
    """A plain conv run (a sequential unit) followed by one identity-shortcut block (a residual unit)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(8)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))
