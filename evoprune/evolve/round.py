"""One round of a search: its state (:class:`Round`), the feasibility test and the first choice of its plan, and
the size row of a model."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn
from deap import base, tools

from ..deploy.latency import LatencyTable
from ..deploy.runtime import measure as measure_latency
from ..netinfo import model_bytes
from ..prune.bn import recalibrate_bn
from ..prune.slicing import slice_plan
from ..space.pruning_space import PruningSpace
from .budget import Budget
from .fitness import Evaluator


@dataclass
class Round:
    """The state of one round, shared by the steps: the model it prunes and its space, the budget, the
    evaluator, the toolbox, the population and its Pareto front, and every (score, cost) evaluated so far."""

    k: int
    model: nn.Module
    space: PruningSpace
    budget: Budget
    evaluator: Evaluator
    toolbox: base.Toolbox
    table: LatencyTable | None = None
    population: list = field(default_factory=list)
    front: tools.ParetoFront = field(default_factory=tools.ParetoFront)
    evaluated: list = field(default_factory=list)
    gen: int = 0  # the last generation evaluated
    last_gen: int = 0  # the generations this round runs (0 for the random and init baselines)
    t0: float = field(default_factory=time.perf_counter)
    screen: Callable | None = None  # the screening evaluator (screen < 1)
    screened: int = 0  # the children screened in the last generation

    def feasible(self, individual) -> bool:
        """Whether an evaluated individual fits the round's budget."""
        return self.budget.feasible(individual, self.space)


def model_row(model, example_inputs, config=None):
    """params, size and MACs of ``model``; with a latency target also its latency measured on the runtime at batch
    1 and at the latency batch."""
    import torch_pruning as tp
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    row = {"params": int(params), "size_mb": model_bytes(model) / 2**20, "macs": float(macs)}
    if config is not None and config.target_kind == "latency":
        kw = dict(runtime=config.runtime, threads=config.threads)
        row["latency_ms"] = measure_latency(model, example_inputs, batch=1, **kw).median_ms
        row["latency_batch"] = config.latency_batch
        row["latency_batch_ms"] = row["latency_ms"] if config.latency_batch == 1 else \
            measure_latency(model, example_inputs, batch=config.latency_batch, **kw).median_ms
    return row


def init_cut(config) -> float:
    """The share of residual units the initial plans cut: ``config.init_cut``, or by default 0.2 for a latency
    target (random search cuts as many; on ResNet-18 at batch 1 a block cut buys latency cheaply, B5) and 0
    otherwise."""
    if config.init_cut is not None:
        return config.init_cut
    return 0.2 if config.target_kind == "latency" else 0.0


def final_choice(rnd, pool_size: int, choose_x=None, choose_y=None):
    """(plan, its score on ``choose_x`` or None, the pool size): the best feasible plan by search score (lower cost on
    ties), or with ``choose_x`` the best on it of the ``pool_size`` best distinct feasible plans (ties: the better
    search score). Re-scoring on images the search never selected on undoes the winner's curse of a long search.
    With no feasible plan, the one least over the budget. ``rnd``: anything with a ``population``, a ``front``, a
    ``budget``, a ``space`` and an ``evaluator`` (a :class:`Round`)."""
    candidates = rnd.population + list(rnd.front)
    ok = {}
    for ind in sorted((i for i in candidates if rnd.budget.feasible(i, rnd.space)),
                      key=lambda i: (i.fitness.values[0], -i.fitness.values[1]), reverse=True):
        ok.setdefault(tuple(ind), ind)
    pool = list(ok.values())[:pool_size]
    if not pool:
        return max(candidates, key=lambda i: rnd.budget.rank(i, rnd.space)), None, 1
    if choose_x is None or len(pool) < 2:
        return pool[0], None, 1
    scores = [rnd.evaluator.rescore(ind, choose_x, choose_y) for ind in pool]
    i = max(range(len(pool)), key=lambda j: (scores[j], -j))
    return pool[i], scores[i], len(pool)


def curse_reference(rnd: Round, plan, fitness, report, recal_x, example_inputs) -> float | None:
    """The chosen plan's top-1 on the report split, recovered as the fitness recovers it (BN re-calibration): its
    search score minus this is the winner's curse. None without ``report``, with another metric than top-1, or with
    a fitness that refits or distils."""
    f = fitness
    if report is None or f.metric != "top1" or f.reconstruct != "none" or f.finetune_steps or f.cut_steps:
        return None
    net = slice_plan(rnd.model, plan, rnd.space, example_inputs=example_inputs).eval()
    if f.bn_recalibration and recal_x:
        recalibrate_bn(net, recal_x)
    return report(net)


__all__ = ["Round", "curse_reference", "final_choice", "init_cut", "model_row"]
