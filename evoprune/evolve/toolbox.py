"""The DEAP face of evoprune: register chromosome types and operators on a ``deap.base.Toolbox``.

After ``register(toolbox, space, evaluate, budget=Budget("macs", 0.25 * space.base_macs))`` the toolbox has
``individual``, ``population``, ``mate``, ``mutate``, ``select``, ``evaluate``, ``map``, ``repair`` and ``settle``
(and, with a budget, ``knapsack``: the individual of the knapsack allocation, :mod:`evoprune.evolve.knapsack`), so
stock DEAP algorithms (``algorithms.eaSimple``, ``eaMuPlusLambda``) or a loop of your own work unchanged. Every
individual is repaired into ``min_keep``, ``round_to`` and the budget once before it is scored
(:mod:`evoprune.evolve.repair`: ``mate`` leaves its children pending and ``settle``, which ``map`` and ``evaluate``
call, repairs them). Register another map with ``register(..., map=...)``, not by replacing ``toolbox.map``, or
crossed children may be scored unrepaired.

``register`` does not seed anything: DEAP's operators, and evoprune's, draw from Python's ``random`` module (and
numpy's global generator); seed both in your program, as DEAP's examples do (``random.seed(0)``), or let
:func:`evoprune.search` do it from ``SearchConfig.seed``.

Creator types (made once, guarded, shared by every toolbox):

* ``creator.EvoPruneFitness``: ``base.Fitness`` with weights ``(1.0, -1.0)``, i.e. (score up, cost down); the cost
  is MACs, or the predicted latency in ms when the evaluator has a latency table.
* ``creator.EvoPruneIndividual``: a ``list`` of 0/1 genes with a ``fitness`` attribute.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from deap import base, creator, tools

from ..errors import ConfigError
from ..space.importance import ranks as importance_ranks
from ..space.pruning_space import PruningSpace
from ..validators import check_choice, check_int, check_probability
from . import knapsack
from . import operators as ops
from .budget import Budget
from .engines import default_map
from .operators import CROSSOVERS, INITS, MUTATIONS, OBJECTIVES
from .repair import PendingRepair

FITNESS = "EvoPruneFitness"
INDIVIDUAL = "EvoPruneIndividual"


def creator_types():
    """Create (once) and return the fitness and individual classes."""
    if not hasattr(creator, FITNESS):
        creator.create(FITNESS, base.Fitness, weights=(1.0, -1.0))
    if not hasattr(creator, INDIVIDUAL):
        creator.create(INDIVIDUAL, list, fitness=getattr(creator, FITNESS))
    return getattr(creator, FITNESS), getattr(creator, INDIVIDUAL)


def _plan_cost(space, budget, latency) -> Callable:
    """``cost(counts, active)``: the cost the budget is in (predicted ms with a latency table, params with a params
    budget, else MACs), for the level-switch mutation and the knapsack."""
    if latency is not None:
        return latency.predict_counts
    i = 1 if budget is not None and budget.kind == "params" else 0
    return lambda counts, active: space.cost_from_counts(counts, active)[i]


def _knapsack_individual(icls, space, ranks, scores, cost, budget, fix: PendingRepair):
    """The individual of the knapsack allocation (:func:`evoprune.evolve.knapsack.allocate`) of ``space`` under
    ``budget``: its widths, each group's most important channels, every unit active, repaired."""
    layout = space.layout
    active = np.ones(layout.n_connections, dtype=bool)

    def individual(counts):
        genes = []
        for i, want in enumerate(counts):
            genes.extend(ops._set_count([0] * layout.group_sizes[i], int(want), ranks[i]))
        return fix(icls(genes + [1] * layout.n_connections))

    def repaired(counts):
        return [int(c) for c in layout.kept_counts(individual(counts))]

    counts = knapsack.allocate(layout.group_sizes, scores, lambda cs: cost(cs, active), budget, repaired,
                               min_keep=space.min_keep, round_to=space.round_to)
    return individual(counts)


def register(toolbox: base.Toolbox, space: PruningSpace, evaluate: Callable, *, p_c: float = 0.6,
             p_mut: float = 0.6, objective: str = "budget", elites: int = 5, budget: Budget | None = None,
             macs_budget: float | None = None, params_budget: float | None = None,
             latency_budget: float | None = None, latency=None, importance: dict | None = None,
             crossover: str = "paper", mutation: str = "level", indpb: float | None = None,
             conn_indpb: float | None = None, init: str = "importance", keep_range=(0.2, 1.0),
             init_spread: float = 0.3, init_global: float = 0.25, init_cut: float = 0.0, fill: float | None = 0.98,
             seed: int | None = None, map: Callable | None = None) -> base.Toolbox:
    """Register evoprune's chromosome types and operators on ``toolbox`` and return it.

    ``budget``: a :class:`~evoprune.evolve.budget.Budget` (or the same as ``macs_budget=``, ``params_budget=`` or
    ``latency_budget=``, in MACs, params or ms). ``objective``: ``"budget"`` (the default, as in
    :func:`evoprune.search`: maximise the score subject to the budget, which it needs; infeasible plans rank below
    every feasible one and the repair shrinks individuals into the budget), ``"nsga2"`` (Pareto over score and cost,
    ``tools.selNSGA2``; a budget is optional) or ``"topk"`` (truncation, the paper's K elites). ``p_c`` sets the
    crossover cut point of the paper's operator; ``p_mut`` is the per-individual mutation probability, exposed as
    ``toolbox.p_mut`` for your loop (pass it as ``mutpb`` to stock DEAP algorithms). ``latency``: a
    :class:`evoprune.deploy.latency.LatencyTable` of ``space``, which a latency budget needs; ``evaluate`` should
    then return (score, predicted ms), as ``Evaluator(..., latency=table)`` does.

    ``importance``: ``{group: scores}`` from :func:`evoprune.space.importance.channel_importance` (without it the
    guided operators fall back to random ranks, drawn from ``seed``). ``init="importance"`` seeds individuals from
    importance at a spread of keep ratios in ``keep_range``, with per-group widths jittered by ``init_spread``
    (log-normal) and a share ``init_global`` ranked across groups (torch-pruning's global allocation); each residual
    unit is cut with probability ``init_cut`` (sequential units start uncut: such a cut collapses accuracy until the
    network is fine-tuned; mutation still cuts them). ``init="random"``: uniform keep ratios.

    ``mutation``: ``"level"`` (the default, :func:`~evoprune.evolve.operators.mut_level`: width moves between two
    groups at equal cost, then about ``indpb`` of every group's kept channels trade places with removed ones and
    each connection gene flips with probability ``conn_indpb``), ``"mixed"``, ``"guided"`` (importance-biased
    flips), ``"swap"``, ``"width"`` or ``"bitflip"`` (the paper's, ``tools.mutFlipBit``). ``fill``: in budget mode,
    offspring under ``fill`` of the budget grow back towards it (None turns it off), so that plans compete on their
    shape at nearly equal cost. ``map``: the DEAP-style ``map(fn, iterable)`` that runs fitness calls (default:
    SCOOP's under ``python -m scoop``, else the builtin).
    """
    p_c, p_mut = check_probability("p_c", p_c), check_probability("p_mut", p_mut)
    budget = _check(space, objective, elites, budget, macs_budget, params_budget, latency_budget, latency,
                    importance, crossover, mutation, init)
    layout = space.layout
    if importance is None:
        rng = np.random.default_rng(0 if seed is None else seed)
        importance = {g.name: rng.random(g.size) for g in space.groups}
    scores = [np.asarray(importance[g.name]) for g in space.groups]
    rank_map = importance_ranks(importance)
    ranks = [rank_map[g.name] for g in space.groups]
    indpb = indpb if indpb is not None else min(0.5, 2.0 / max(1, layout.n_neurons) * len(space.groups))
    conn_indpb = conn_indpb if conn_indpb is not None else (1.0 / layout.n_connections if layout.n_connections else 0)
    for name, value in (("indpb", indpb), ("conn_indpb", conn_indpb), ("init_cut", init_cut)):
        check_probability(name, value)
    # the repair keeps every budget given by keyword (a DEAP user may give two); selection ranks by ``budget``
    limits = {**(budget.keywords() if budget else {}),
              **{k: v for k, v in (("macs_budget", macs_budget), ("params_budget", params_budget),
                                   ("latency_budget", latency_budget)) if v is not None}}
    fill = fill if objective == "budget" else None
    repair = PendingRepair(lambda ind: ops.repair(ind, space, ranks, fill=fill, latency=latency, **limits))
    cost = _plan_cost(space, budget, latency)
    _, individual_cls = creator_types()

    if init == "importance":
        toolbox.register("individual", ops.init_importance, individual_cls, layout, ranks, keep_range,
                         spread=init_spread, scores=scores, p_global=init_global,
                         p_cut=[init_cut if u.kind == "residual" else 0.0 for u in space.units])
    else:
        toolbox.register("individual", ops.init_random, individual_cls, layout, keep_range)
    toolbox.decorate("individual", repair.now(single=True))
    toolbox.register("population", tools.initRepeat, list, toolbox.individual)
    if crossover == "paper":
        toolbox.register("mate", ops.cx_paper, layout=layout, p_c=p_c)
    else:
        toolbox.register("mate", ops.cx_group_uniform, layout=layout)
    toolbox.decorate("mate", repair.later())
    op, keywords = _mutation(mutation, space, ranks, cost, indpb, conn_indpb)
    toolbox.register("mutate", op, **keywords)
    toolbox.decorate("mutate", repair.now())
    if budget is not None:
        toolbox.register("knapsack", _knapsack_individual, individual_cls, space, ranks, scores, cost,
                         budget.limit, repair)
    toolbox.register("settle", repair.settle)  # the one step of the pending repair (see evoprune.evolve.repair)
    toolbox.register("repair", ops.repair, space=space, ranks=ranks, fill=fill, latency=latency, **limits)
    if objective == "nsga2":
        toolbox.register("select", ops.sel_nsga2)
    elif objective == "topk":
        toolbox.register("select", ops.sel_topk)
    else:
        toolbox.register("select", ops.sel_budget, budget=budget, space=space)
    toolbox.register("evaluate", repair.evaluating(evaluate))
    toolbox.register("map", repair.mapping(map or default_map()))
    toolbox.p_c, toolbox.p_mut, toolbox.elites, toolbox.space = p_c, p_mut, elites, space
    return toolbox


def _check(space, objective, elites, budget, macs_budget, params_budget, latency_budget, latency, importance,
           crossover, mutation, init) -> Budget | None:
    """register's arguments, checked before anything is registered; returns the budget selection ranks by."""
    check_choice("objective", objective, OBJECTIVES)
    check_choice("crossover", crossover, CROSSOVERS)
    check_choice("mutation", mutation, MUTATIONS)
    check_choice("init", init, INITS)
    check_int("elites", elites)
    if budget is not None and not isinstance(budget, Budget):
        raise ConfigError(f"must be a Budget, e.g. Budget('macs', 0.25 * space.base_macs), got {budget!r}",
                          setting="budget")
    budget = budget or Budget.from_keywords(macs_budget, params_budget, latency_budget)
    if importance is not None:
        missing = [g.name for g in space.groups if g.name not in importance]
        if missing:
            raise ConfigError(f"importance has no scores for group(s) {', '.join(missing)}")
    if (latency_budget is not None or (budget is not None and budget.kind == "latency")) and latency is None:
        raise ConfigError("latency_budget needs latency=LatencyTable.measure(model, space, example_inputs)")
    if latency is not None:
        latency.check_space(space)
    if objective == "budget" and budget is None:
        raise ConfigError("objective='budget' (the default) needs a budget, e.g. "
                          "budget=Budget('macs', 0.25 * space.base_macs) (or macs_budget=, params_budget=, "
                          "latency_budget=); or pass objective='nsga2' for a Pareto front")
    return budget


def _mutation(name, space, ranks, cost, indpb, conn_indpb) -> tuple[Callable, dict]:
    """``(operator, its keywords)`` of ``mutation=name``, for ``toolbox.register("mutate", op, **keywords)``."""
    layout = space.layout
    if name == "bitflip":
        return tools.mutFlipBit, dict(indpb=indpb)
    keywords = {"level": dict(cost=cost, min_keep=space.min_keep, round_to=space.round_to, conn_indpb=conn_indpb,
                              swap_indpb=indpb),
                "guided": dict(indpb=indpb, conn_indpb=conn_indpb), "swap": dict(indpb=indpb), "width": {},
                "mixed": dict(indpb=indpb, conn_indpb=conn_indpb)}[name]
    return getattr(ops, f"mut_{name}"), dict(layout=layout, ranks=ranks, **keywords)
