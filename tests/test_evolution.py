"""Evolution that keeps moving: level-switch mutation at equal cost, duplicate rejection, diversity in the logbook,
staged (screened) generations, the final choice on held-out images, the winner's curse, a label-free KL fitness and
the knapsack allocator."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from deap import base

from evoprune import ConfigError, PruningSpace, search
from evoprune.evolve import knapsack
from evoprune.evolve import operators as ops
from evoprune.data import normalize
from evoprune.evolve.fitness import Evaluator, FitnessConfig
from evoprune.evolve.population import diversity, fresh
from evoprune.evolve.toolbox import register
from evoprune.train import evaluate

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def trained(trained_tiny):
    model, data = trained_tiny(2000, 1000, data_seed=0, epochs=4)
    search_set, report_set = data.val.stratified_split(0.5, seed=0)
    score_set, choose_set = search_set.stratified_split(250, seed=0)
    recal = [normalize(data.train.images[i:i + 64]) for i in range(0, 512, 64)]
    return (model, normalize(score_set.images), score_set.labels, normalize(choose_set.images), choose_set.labels,
            recal, report_set)


def _macs_toolbox(space, frac=0.3, **kw):
    return register(base.Toolbox(), space, lambda ind: (0.0, 0.0), macs_budget=frac * space.base_macs, seed=0, **kw)


# ------------------------------------------------------------------------------------------------ operators
@pytest.mark.slow
def test_level_switch_moves_width_between_two_groups_without_raising_the_cost(trained):
    model, x = trained[0], trained[1]
    space = PruningSpace.from_model(model, x[:1])
    tb = _macs_toolbox(space, 0.4)
    layout = space.layout
    ranks = [np.linspace(0, 1, g.size) for g in space.groups]

    def cost(counts, active):
        return space.cost_from_counts(counts, active)[0]
    random.seed(1)
    moved = 0
    for parent in tb.population(20):
        child = tb.clone(parent)
        ops.mut_level(child, layout, ranks, cost, min_keep=space.min_keep)
        before, after = layout.kept_counts(parent), layout.kept_counts(child)
        assert space.cost_of(child)[0] <= space.cost_of(parent)[0] + 1e-6
        changed = np.flatnonzero(before != after)
        moved += len(changed) > 0
        assert len(changed) <= 8  # at most 4 moves, two groups each
        if len(changed):
            assert (after < before).any()  # a level was given up somewhere
    assert moved >= 15  # almost every child differs from its parent


def test_level_switch_is_the_default_mutation_and_keeps_children_in_the_budget(trained):
    model, x = trained[0], trained[1]
    space = PruningSpace.from_model(model, x[:1])
    tb = _macs_toolbox(space, 0.3)
    random.seed(0)
    pop = tb.population(10)
    for ind in pop:
        (child,) = tb.mutate(tb.clone(ind))
        assert space.cost_of(child)[0] <= 0.3 * space.base_macs
    assert tb.mutate.func.__name__ == "mut_level"  # the default (wrapped by the repair)


def test_paper_operators_stay_selectable():
    from evoprune import SearchConfig
    cfg = SearchConfig(crossover="paper", mutation="bitflip", population=30, elites=5, p_c=0.6, p_mut=0.6)
    cfg.check()
    assert cfg.evaluations() == 30 + 4 * 25


# ------------------------------------------------------------------------------------------------ population health
def test_diversity_of_identical_and_complementary_genomes():
    from evoprune.space.genome import Layout
    layout = Layout(("a", "b"), (3, 2), ("u",))
    same = [[1, 0, 1, 1, 0, 1]] * 4
    assert diversity(same, layout) == {"hamming": 0.0, "distinct": 1}
    opposite = [[1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]
    d = diversity(opposite, layout)
    assert d["hamming"] == pytest.approx(1.0) and d["distinct"] == 2
    # same widths, other channels: Hamming sees them apart, the width vector does not
    d = diversity([[1, 0, 0, 1, 0, 1], [0, 0, 1, 0, 1, 1]], layout)
    assert d["distinct"] == 1 and d["hamming"] > 0


def test_fresh_mutates_children_that_copy_the_population(trained):
    model, x = trained[0], trained[1]
    space = PruningSpace.from_model(model, x[:1])
    tb = _macs_toolbox(space, 0.5)
    random.seed(3)
    parents = tb.population(3)
    copies = [tb.clone(p) for p in parents] + [tb.clone(parents[0])]
    for c in copies:
        del c.fitness.values
    fresh(tb, copies, parents)
    genomes = [tuple(c) for c in copies]
    assert len(set(genomes)) == len(genomes)
    assert not set(genomes) & {tuple(p) for p in parents}


@pytest.mark.slow
def test_logbook_records_diversity_and_duplicate_rejection_keeps_it_up(trained):
    model, x, y, _, _, recal, _ = trained
    kw = dict(recal_x=recal, rounds=1, generations=4, population=8, elites=2, target=0.3, seed=0, verbose=False,
              progress=False, reconstruct="none")
    rows = search(model, x[:1], x, y, **kw).logbook
    assert all({"hamming", "distinct", "screened"} <= set(r) for r in rows)
    assert all(r["distinct"] >= 2 for r in rows), [r["distinct"] for r in rows]
    assert all(0 < r["hamming"] < 1 for r in rows)


# ------------------------------------------------------------------------------------------------ fitness
def test_kl_fitness_needs_no_labels_and_scores_the_unpruned_plan_zero(trained):
    model, x, y, _, _, recal, _ = trained
    space = PruningSpace.from_model(model, x[:1])
    ev = Evaluator(model, space, x, None, config=FitnessConfig(metric="kl", bn_recalibration=False))
    full, _ = ev(space.layout.ones())
    assert full == pytest.approx(0.0, abs=1e-6)
    tb = _macs_toolbox(space, 0.2)
    random.seed(0)
    scores = [ev(ind)[0] for ind in tb.population(4)]
    assert all(s < -1e-4 for s in scores)
    with pytest.raises(ConfigError, match="metric='kl'") as err:
        Evaluator(model, space, x, None, config=FitnessConfig(bn_recalibration=False))
    assert err.value.setting == "metric"


@pytest.mark.slow
def test_kl_ranks_plans_like_top1_on_labelled_data(trained):
    """A label-free fitness is useful when it orders plans as the accuracy does."""
    model, x, y, _, _, recal, _ = trained
    space = PruningSpace.from_model(model, x[:1])
    tb = _macs_toolbox(space, 0.25, init="random")
    random.seed(5)
    pop = tb.population(12)
    top1 = Evaluator(model, space, x, y, recal)
    kl = Evaluator(model, space, x, None, recal, config=FitnessConfig(metric="kl"))
    a, b = np.array([top1(i)[0] for i in pop]), np.array([kl(i)[0] for i in pop])
    rho = np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]  # Spearman's rank correlation
    assert rho > 0.5, (a, b)


def test_screening_scores_on_the_first_share_of_images_and_batches(trained):
    model, x, y, _, _, recal, _ = trained
    space = PruningSpace.from_model(model, x[:1])
    tb = _macs_toolbox(space, 0.3)
    random.seed(2)
    ind = tb.population(1)[0]
    full = Evaluator(model, space, x, y, recal)
    half = full.screening(0.5)
    direct = Evaluator(model, space, x[:len(x) // 2], y[:len(x) // 2], recal[:len(recal) // 2])
    assert half(ind) == pytest.approx(direct(ind))
    assert full(ind) == pytest.approx(Evaluator(model, space, x, y, recal)(ind))  # the full score is cached apart
    with pytest.raises(ConfigError) as err:
        full.screening(0)
    assert err.value.setting == "screen"


# ------------------------------------------------------------------------------------------------ search
@pytest.mark.slow
def test_staged_generation_scores_only_the_survivors_in_full(trained):
    model, x, y, _, _, recal, _ = trained
    result = search(model, x[:1], x, y, recal_x=recal, rounds=1, generations=2, population=8, elites=2,
                    offspring=12, screen=0.5, survivors=3, target=0.3, seed=0, verbose=False, progress=False,
                    reconstruct="none")
    gens = [r for r in result.logbook if r["gen"] > 0]
    assert all(r["screened"] >= 8 for r in gens)  # most of the 12 children were screened
    assert all(r["evals"] <= 3 for r in gens)  # only the survivors were scored in full
    assert result.rows[0]["macs"] <= 0.3 * result.baseline["macs"] * 1.0001


@pytest.mark.slow
def test_final_choice_on_held_out_images_and_the_winners_curse(trained):
    model, x, y, cx, cy, recal, report_set = trained
    kw = dict(recal_x=recal, rounds=1, generations=2, population=8, elites=2, target=0.3, seed=0, verbose=False,
              progress=False, reconstruct="none", report=lambda m: evaluate(m, report_set, progress=False))
    chosen = search(model, x[:1], x, y, choose_x=cx, choose_y=cy, **kw).rows[0]
    assert chosen["choice_pool"] > 1 and 0 <= chosen["choice_score"] <= 1
    assert chosen["curse_pp"] == pytest.approx(100 * (chosen["search_score"] - chosen["report_score"]))
    # the choice images the same as the fitness images: the best search score wins, as without them
    same = search(model, x[:1], x, y, choose_x=x, choose_y=y, **kw).rows[0]
    plain = search(model, x[:1], x, y, **kw).rows[0]
    assert plain["choice_score"] is None and plain["choice_pool"] == 1
    assert same["search_score"] == plain["search_score"] == same["choice_score"]
    with pytest.raises(ConfigError) as err:
        search(model, x[:1], x, y, choose_x=cx, choose_y=None, **kw)
    assert err.value.setting == "choose_x"


def test_knapsack_method_spends_one_evaluation_and_meets_the_budget(trained):
    model, x, y, _, _, recal, _ = trained
    result = search(model, x[:1], x, y, recal_x=recal, rounds=1, method="knapsack", target=0.3, seed=0,
                    verbose=False, progress=False, reconstruct="none")
    row = result.rows[0]
    assert row["evaluations"] == 1 and row["cut"] == []
    assert 0.25 * result.baseline["macs"] <= row["macs"] <= 0.3 * result.baseline["macs"] * 1.0001


# ------------------------------------------------------------------------------------------------ knapsack
def test_knapsack_dp_finds_the_exhaustive_optimum():
    rng = np.random.default_rng(0)
    for trial in range(20):
        groups = rng.integers(2, 4)
        values = [np.sort(rng.random(rng.integers(2, 5))) * 10 for _ in range(groups)]
        costs = [np.sort(rng.random(len(v))) * 5 for v in values]
        cap = float(rng.uniform(2, 10))
        choice = knapsack.solve(values, costs, cap, bins=4000)
        got = sum(v[j] for v, j in zip(values, choice))
        best = max((sum(v[j] for v, j in zip(values, js)) for js in itertools.product(*[range(len(v)) for v in values])
                    if sum(c[j] for c, j in zip(costs, js)) <= cap), default=None)
        if best is None:  # nothing fits: the cheapest choice of every group
            assert choice == [int(np.argmin(c)) for c in costs]
            continue
        assert sum(c[j] for c, j in zip(costs, choice)) <= cap + 1e-9
        assert got == pytest.approx(best, rel=0.02), trial


def test_knapsack_allocation_beats_uniform_value_within_the_budget(trained):
    model, x = trained[0], trained[1]
    space = PruningSpace.from_model(model, x[:1])
    rng = np.random.default_rng(0)
    importance = {g.name: rng.gamma(2.0, size=g.size) for g in space.groups}
    tb = register(base.Toolbox(), space, lambda ind: (0.0, 0.0), macs_budget=0.3 * space.base_macs,
                  importance=importance, seed=0)
    ind = tb.knapsack()
    assert space.cost_of(ind)[0] <= 0.3 * space.base_macs
    counts = space.layout.kept_counts(ind)
    assert all(c >= np.ceil(knapsack.MIN_RATIO * g.size) for c, g in zip(counts, space.groups))
    # each group keeps its most important channels
    for i, g in enumerate(space.groups):
        kept = np.asarray(ind[space.layout.group_slice(i)], dtype=bool)
        if 0 < kept.sum() < g.size:
            assert importance[g.name][kept].min() >= importance[g.name][~kept].max()
    # and the value is at least the uniform allocation's at the same budget
    uniform = tb.clone(ind)
    uniform[:] = space.layout.ones()
    tb.repair(uniform)

    def value(genes):
        return sum(float(knapsack.width_values(importance[g.name], [c])[0])
                   for g, c in zip(space.groups, space.layout.kept_counts(genes)))
    assert value(ind) >= value(uniform) - 1e-9


def test_new_settings_are_checked_with_their_names():
    from evoprune import SearchConfig
    for kw, name in (({"offspring": 0}, "offspring"), ({"screen": 1.5}, "screen"), ({"survivors": -1}, "survivors"),
                     ({"final_pool": 0}, "final_pool"), ({"dedupe": "yes"}, "dedupe"), ({"method": "dp"}, "method")):
        with pytest.raises(ConfigError) as err:
            SearchConfig(**kw).check()
        assert err.value.setting == name
    cfg = SearchConfig(offspring=50, screen=0.25, survivors=10)
    assert cfg.evaluations() == 30 + 4 * (50 * 0.25 + 10)
