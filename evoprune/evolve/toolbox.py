"""The DEAP face of evoprune: register chromosome types and operators on a ``deap.base.Toolbox``.

After ``register(toolbox, space, evaluate, macs_budget=...)`` the toolbox has ``individual``, ``population``,
``mate``, ``mutate``, ``select``, ``evaluate``, ``map``, ``repair`` and ``settle`` (and, with a budget,
``knapsack``: the individual of the knapsack allocation, :mod:`evoprune.evolve.knapsack`), so stock DEAP algorithms
(``algorithms.eaSimple``, ``eaMuPlusLambda``) or a loop of your own work unchanged. ``individual`` (hence
``population``) and ``mutate`` are decorated with :func:`evoprune.evolve.operators.repair`, so new individuals and
offspring always respect ``min_keep``, ``round_to`` and the budget. Each child is repaired once: ``mate`` marks its
children (attribute ``repair_pending``), a ``mutate`` that follows repairs them, and ``map`` (or a direct
``evaluate`` call) repairs the children still marked before they are scored. Register another map with
``register(..., map=...)``, not by replacing ``toolbox.map``, or crossed children may be scored unrepaired.

Creator types (made once, guarded, shared by every toolbox):

* ``creator.EvoPruneFitness``: ``base.Fitness`` with weights ``(1.0, -1.0)``, i.e. (score up, cost down); the cost
  is MACs, or the predicted latency in ms when the evaluator has a latency table.
* ``creator.EvoPruneIndividual``: a ``list`` of 0/1 genes with a ``fitness`` attribute.
"""
from __future__ import annotations

import functools
import random
from typing import Callable

import numpy as np
from deap import base, creator, tools

from . import knapsack
from . import operators as ops
from ..errors import ConfigError, check_probability
from ..space.importance import ranks as importance_ranks
from .engines import default_map
from ..space.pruning_space import PruningSpace

FITNESS = "EvoPruneFitness"
INDIVIDUAL = "EvoPruneIndividual"
OBJECTIVES = ("nsga2", "topk", "budget")
CROSSOVERS, MUTATIONS = ops.CROSSOVERS, ops.MUTATIONS  # the operators' names, declared beside them


def creator_types():
    """Create (once) and return the fitness and individual classes."""
    if not hasattr(creator, FITNESS):
        creator.create(FITNESS, base.Fitness, weights=(1.0, -1.0))
    if not hasattr(creator, INDIVIDUAL):
        creator.create(INDIVIDUAL, list, fitness=getattr(creator, FITNESS))
    return getattr(creator, FITNESS), getattr(creator, INDIVIDUAL)


PENDING = "repair_pending"  # the attribute ``mate`` sets on children whose repair is deferred


def _repairer(space, ranks, budgets, fill) -> Callable:
    """``fix(ind)``: repair ``ind`` in place (:func:`evoprune.evolve.operators.repair`) and clear its pending mark."""
    def fix(ind):
        ops.repair(ind, space, ranks, fill=fill, **budgets)
        if hasattr(ind, "__dict__"):
            vars(ind).pop(PENDING, None)
        return ind
    return fix


def _repaired(fix, *, single=False):
    """A DEAP decorator: repair every individual an operator returns (a tuple of them, or one with ``single``)."""
    def decorator(op):
        @functools.wraps(op)
        def wrapper(*args, **kwargs):
            out = op(*args, **kwargs)
            for ind in ((out,) if single else out):
                fix(ind)
            return out
        return wrapper
    return decorator


def _deferred(fix):
    """A DEAP decorator for ``mate``: mark the children for repair instead of repairing them, so that a child that
    is then mutated is repaired once, by the mutation; :func:`_pending_fixed` repairs the rest before they are
    scored. A container without attributes (a plain list) is repaired at once."""
    def decorator(op):
        @functools.wraps(op)
        def wrapper(*args, **kwargs):
            out = op(*args, **kwargs)
            for ind in out:
                if hasattr(ind, "__dict__"):
                    setattr(ind, PENDING, True)
                else:
                    fix(ind)
            return out
        return wrapper
    return decorator


def _pending_fixed(fix, individuals):
    """``individuals`` as a list, the ones marked by ``mate`` repaired first (in this process)."""
    individuals = list(individuals)
    for ind in individuals:
        if getattr(ind, PENDING, False):
            fix(ind)
    return individuals


def _repairing_map(mapper: Callable, fix) -> Callable:
    """``mapper`` (``map``, SCOOP's ``futures.map``...) that repairs pending children in this process before they
    are shipped to be scored, so the genes scored are the genes kept."""
    @functools.wraps(mapper)
    def repairing(fn, *iterables):
        return mapper(fn, *(_pending_fixed(fix, it) for it in iterables))
    return repairing


class _RepairingEvaluate:
    """``evaluate`` that first repairs a child crossed but not yet repaired (a direct call on it). It pickles as
    ``evaluate`` alone: what ``map`` ships to worker processes was repaired before it left. (Slots: DEAP copies a
    registered function's ``__dict__`` onto its partial, which would ship ``fix`` too.)"""

    __slots__ = ("evaluate", "fix")

    def __init__(self, evaluate: Callable, fix):
        self.evaluate, self.fix = evaluate, fix

    def __call__(self, ind, *args, **kwargs):
        if self.fix is not None and getattr(ind, PENDING, False):
            self.fix(ind)
        return self.evaluate(ind, *args, **kwargs)

    def __reduce__(self):
        return _RepairingEvaluate, (self.evaluate, None)


def _plan_cost(space, params_budget, latency) -> Callable:
    """``cost(counts, active)``: the cost the budget is in (predicted ms with a latency table, params with a params
    budget, else MACs), for the level-switch mutation."""
    if latency is not None:
        return latency.predict_counts
    i = 1 if params_budget is not None else 0
    return lambda counts, active: space.cost_from_counts(counts, active)[i]


def _knapsack_individual(icls, space, ranks, scores, cost, budget, fix):
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
             p_mut: float = 0.6, objective: str = "budget", elites: int = 5, macs_budget: float | None = None,
             params_budget: float | None = None, importance: dict | None = None, crossover: str = "paper",
             mutation: str = "level", indpb: float | None = None, conn_indpb: float | None = None,
             init: str = "importance", keep_range=(0.2, 1.0), init_spread: float = 0.3, init_global: float = 0.25,
             init_cut: float = 0.0,
             fill: float | None = 0.98, latency=None, latency_budget: float | None = None,
             seed: int | None = None, map: Callable | None = None) -> base.Toolbox:
    """Register evoprune's chromosome types and operators on ``toolbox`` and return it.

    ``objective``: ``"budget"`` (the default, as in :func:`evoprune.search`: maximise the score subject to
    ``macs_budget`` or ``params_budget``, which it needs; infeasible plans rank below every feasible one and the repair
    step shrinks individuals into the budget), ``"nsga2"`` (Pareto over score and MACs, ``tools.selNSGA2``; a budget is
    optional) or ``"topk"`` (truncation, the paper's K elites). ``p_c`` sets the crossover cut point of the paper's
    operator; ``p_mut`` is the per-individual mutation probability, exposed as ``toolbox.p_mut`` for your loop (pass it
    as ``mutpb`` to stock DEAP algorithms). ``importance``: ``{group: scores}`` from
    :func:`evoprune.space.importance.channel_importance`; without it the guided operators fall back to random ranks.
    ``init="importance"`` seeds individuals from importance at a spread of keep ratios, with per-group widths jittered
    by ``init_spread`` (log-normal) and a share ``init_global`` ranked across groups (torch-pruning's global
    allocation), so that the first generation already holds different layer-width allocations; each of its residual
    units is cut with probability ``init_cut`` (default 0; ``evoprune.search`` uses 0.2 for latency targets, where depth
    cuts often buy the most). Sequential units (plain conv runs) start uncut: such a cut collapses accuracy until the
    network is fine-tuned, so seeding them wastes evaluations; mutation still cuts them. ``mutation``: ``"level"`` (the
    default: level-switch, :func:`evoprune.evolve.operators.mut_level`: width moves between two groups at equal cost,
    then about ``indpb`` of every group's kept channels trade places with removed ones and each connection gene flips
    with probability ``conn_indpb``), ``"mixed"`` (one group's width moves, then the same trade; the repair rebalances
    the budget), ``"guided"`` (importance-biased flips), ``"swap"``, ``"width"`` or ``"bitflip"`` (the paper's,
    ``tools.mutFlipBit``). ``fill``: in budget mode, offspring under ``fill`` of the budget grow back towards it (None
    turns it off), so the search compares plan shapes at nearly equal MACs. ``latency``: a
    :class:`evoprune.deploy.latency.LatencyTable` of ``space``; with it the repair also keeps plans under
    ``latency_budget`` (ms), and ``evaluate`` should return (score, predicted ms), as ``Evaluator(..., latency=table)``
    does, so that ``select`` (budget or NSGA-II) works on the latency. ``seed`` seeds Python's ``random`` (DEAP's source
    of randomness) and numpy. ``map``: the DEAP-style ``map(fn, iterable)`` that runs fitness calls (default: SCOOP's
    under ``python -m scoop``, else the builtin).
    """
    p_c = check_probability("p_c", p_c)
    p_mut = check_probability("p_mut", p_mut)
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if crossover not in CROSSOVERS:
        raise ConfigError(f"must be one of {', '.join(CROSSOVERS)}, got {crossover!r}", setting="crossover")
    if mutation not in MUTATIONS:
        raise ConfigError(f"must be one of {', '.join(MUTATIONS)}, got {mutation!r}", setting="mutation")
    if init not in ("importance", "random"):
        raise ConfigError(f"init must be 'importance' or 'random', got {init!r}")
    if not isinstance(elites, int) or elites < 1:
        raise ConfigError(f"elites must be a positive int, got {elites!r}")
    _, individual_cls = creator_types()
    layout = space.layout
    if importance is None:
        rng = np.random.default_rng(0 if seed is None else seed)
        importance = {g.name: rng.random(g.size) for g in space.groups}
    missing = [g.name for g in space.groups if g.name not in importance]
    if missing:
        raise ConfigError(f"importance has no scores for group(s) {', '.join(missing)}")
    if latency_budget is not None and latency is None:
        raise ConfigError("latency_budget needs latency=LatencyTable.measure(model, space, example_inputs)")
    if latency is not None:
        latency.check_space(space)
    if objective == "budget" and macs_budget is None and params_budget is None and latency_budget is None:
        raise ConfigError("objective='budget' (the default) needs macs_budget, params_budget or latency_budget, e.g. "
                          "macs_budget=0.25 * space.base_macs; or pass objective='nsga2' for a Pareto front")
    rank_map = importance_ranks(importance)
    ranks = [rank_map[g.name] for g in space.groups]
    indpb = indpb if indpb is not None else min(0.5, 2.0 / max(1, layout.n_neurons) * len(space.groups))
    conn_indpb = conn_indpb if conn_indpb is not None else (1.0 / layout.n_connections if layout.n_connections else 0)
    check_probability("indpb", indpb)
    check_probability("conn_indpb", conn_indpb)
    check_probability("init_cut", init_cut)
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed % 2**32)

    if init == "importance":
        toolbox.register("individual", ops.init_importance, individual_cls, layout, ranks, keep_range,
                         spread=init_spread, scores=[np.asarray(importance[g.name]) for g in space.groups],
                         p_global=init_global,
                         p_cut=[init_cut if u.kind == "residual" else 0.0 for u in space.units])
    else:
        toolbox.register("individual", ops.init_random, individual_cls, layout, keep_range)
    fill = fill if objective == "budget" else None
    budgets = dict(macs_budget=macs_budget, params_budget=params_budget, latency=latency,
                   latency_budget=latency_budget)
    fix = _repairer(space, ranks, budgets, fill)
    toolbox.decorate("individual", _repaired(fix, single=True))
    toolbox.register("population", tools.initRepeat, list, toolbox.individual)
    if crossover == "paper":
        toolbox.register("mate", ops.cx_paper, layout=layout, p_c=p_c)
    else:
        toolbox.register("mate", ops.cx_group_uniform, layout=layout)
    if mutation == "level":
        toolbox.register("mutate", ops.mut_level, layout=layout, ranks=ranks,
                         cost=_plan_cost(space, params_budget, latency), min_keep=space.min_keep,
                         round_to=space.round_to, conn_indpb=conn_indpb, swap_indpb=indpb)
    elif mutation == "guided":
        toolbox.register("mutate", ops.mut_guided, layout=layout, ranks=ranks, indpb=indpb, conn_indpb=conn_indpb)
    elif mutation == "bitflip":
        toolbox.register("mutate", tools.mutFlipBit, indpb=indpb)
    elif mutation == "swap":
        toolbox.register("mutate", ops.mut_swap, layout=layout, ranks=ranks, indpb=indpb)
    elif mutation == "width":
        toolbox.register("mutate", ops.mut_width, layout=layout, ranks=ranks)
    else:
        toolbox.register("mutate", ops.mut_mixed, layout=layout, ranks=ranks, indpb=indpb, conn_indpb=conn_indpb)
    toolbox.decorate("mate", _deferred(fix))
    toolbox.decorate("mutate", _repaired(fix))
    limit = next((b for b in (latency_budget, macs_budget, params_budget) if b is not None), None)
    if limit is not None:
        toolbox.register("knapsack", _knapsack_individual, individual_cls, space, ranks,
                         [np.asarray(importance[g.name]) for g in space.groups],
                         _plan_cost(space, params_budget, latency), limit, fix)
    toolbox.register("settle", _pending_fixed, fix)  # repair the children mate left pending; returns the list
    toolbox.register("repair", ops.repair, space=space, ranks=ranks, fill=fill, **budgets)
    if objective == "nsga2":
        toolbox.register("select", ops.sel_nsga2)
    elif objective == "topk":
        toolbox.register("select", ops.sel_topk)
    else:
        budget = next((b for b in (latency_budget, macs_budget) if b is not None), float("inf"))
        toolbox.register("select", ops.sel_budget, budget=budget)
    toolbox.register("evaluate", _RepairingEvaluate(evaluate, fix))
    toolbox.register("map", _repairing_map(map or default_map(), fix))
    toolbox.p_c, toolbox.p_mut, toolbox.elites, toolbox.space = p_c, p_mut, elites, space
    return toolbox
