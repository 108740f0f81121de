"""The search driver: T rounds, each a GA over the current model, then physical pruning and fine-tuning.

Defaults are the paper's: population N=30, K=5 elites, p_c=0.6, p_mut=0.6, T=5 rounds. Round ``k`` of ``T`` aims
at ``target ** (k / T)`` of the original MACs (or params), so each round prunes further from the last and the final
model meets ``target``. Within a round (one DEAP generation per step):

    elites = select(population, K)
    offspring = mate pairs of elites, mutate each child with probability p_mut (both repaired into the budget)
    population = elites + offspring; evaluate the new ones (toolbox.map: SCOOP workers or serial)

The state is checkpointed after every generation, so a killed search resumes to the same result.
"""
from __future__ import annotations

import copy
import math
import random
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from deap import base, tools

from . import checkpoint as ckpt
from .errors import ConfigError
from .export import layer_widths, model_bytes
from .fitness import Evaluator, FitnessConfig, recalibrate_bn, reference_score
from .importance import KINDS as IMPORTANCE_KINDS
from .importance import channel_importance
from .latency import LatencyTable, LatencyWarning
from .runtime import check_runtime, kernel_step
from .runtime import measure as measure_latency
from .operators import check_probability, sel_budget
from .plan import PruningPlan
from .progress import bar, status
from .space import PruningSpace
from .surgery import apply_plan
from .toolbox import CROSSOVERS, MUTATIONS, creator_types, register


METHODS = ("ga", "random", "init")
TARGET_KINDS = ("macs", "params", "latency")


@dataclass
class SearchConfig:
    """The search's settings. ``method``: ``"ga"`` (the genetic algorithm), or one of two baselines given the GA's
    evaluation budget (:meth:`evaluations`) and ranked by the same fitness: ``"random"`` (random search: random
    plans, ``init="random"``, repaired into the budget) or ``"init"`` (the GA's own initial population alone, as
    many individuals as the GA evaluates)."""

    rounds: int = 5
    generations: int = 4
    population: int = 30
    elites: int = 5
    p_c: float = 0.6
    p_mut: float = 0.6
    target: float = 0.5  # a fraction of the original MACs/params, or with target_kind="latency" a budget in ms
    target_kind: str = "macs"  # "macs", "params" or "latency" (measured on ``runtime``; the cost is then in ms)
    objective: str = "budget"  # "budget", "nsga2" or "topk"
    crossover: str = "paper"
    mutation: str = "mixed"  # B1s (ResNet-18, 3 seeds): ahead of "guided" before fine-tuning, level after
    importance: str = "l1"
    init: str = "importance"
    connections: bool = True
    seed: int = 0
    method: str = "ga"  # "ga", or a baseline at the GA's evaluation budget: "random" or "init"
    runtime: str = "onnxruntime"  # latency target: the deployment runtime ("onnxruntime" or "torch")
    latency_batch: int = 1  # latency target: the batch the latency is measured (and reported) at
    threads: int = 1  # latency target: the runtime's intra-op threads
    snap: bool = True  # latency target: widths in multiples of the runtime's channel block (latency.kernel_step)
    init_cut: float | None = None  # share of residual units the GA's initial plans cut; None: 0.2 for latency

    def evaluations(self) -> int:
        """The fitness evaluations of one round of the GA at most (the initial population, then ``population -
        elites`` children per generation): the budget the ``random`` and ``init`` baselines get."""
        return self.population + self.generations * (self.population - self.elites)

    def check(self):
        """Raise :class:`ConfigError` (its ``setting`` names the field) for the first setting out of range."""
        for name in ("rounds", "generations"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"must be an int >= 1, got {v!r}", setting=name)
        if not isinstance(self.population, int) or isinstance(self.population, bool) or self.population < 2:
            raise ConfigError(f"must be an int >= 2, got {self.population!r}", setting="population")
        if not isinstance(self.elites, int) or isinstance(self.elites, bool) or \
                not 1 <= self.elites <= self.population:
            raise ConfigError(f"must be an int from 1 to the population size ({self.population}), got "
                              f"{self.elites!r}", setting="elites")
        check_probability("p_c", self.p_c)
        check_probability("p_mut", self.p_mut)
        if self.init_cut is not None:
            check_probability("init_cut", self.init_cut)
        if self.target_kind not in TARGET_KINDS:
            raise ConfigError(f"must be 'macs', 'params' or 'latency', got {self.target_kind!r}",
                              setting="target_kind")
        if self.target_kind == "latency":
            if isinstance(self.target, bool) or not isinstance(self.target, (int, float)) or \
                    not 0 < self.target < math.inf:
                raise ConfigError(f"must be a latency in ms > 0, got {self.target!r}", setting="target_latency_ms")
            check_runtime(self.runtime)  # known and installed (else names the extra)
            for name in ("latency_batch", "threads"):
                v = getattr(self, name)
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ConfigError(f"must be an int >= 1, got {v!r}", setting=name)
        elif isinstance(self.target, bool) or not isinstance(self.target, (int, float)) or \
                not 0 < self.target <= 1 or math.isnan(self.target):
            raise ConfigError(f"must be a fraction in (0, 1] of the original MACs/params, got {self.target!r}",
                              setting="target")
        if self.objective not in ("budget", "nsga2", "topk"):
            raise ConfigError(f"must be 'budget', 'nsga2' or 'topk', got {self.objective!r}", setting="objective")
        if self.crossover not in CROSSOVERS:
            raise ConfigError(f"must be one of {', '.join(CROSSOVERS)}, got {self.crossover!r}", setting="crossover")
        if self.mutation not in MUTATIONS:
            raise ConfigError(f"must be one of {', '.join(MUTATIONS)}, got {self.mutation!r}", setting="mutation")
        if self.init not in ("importance", "random"):
            raise ConfigError(f"must be 'importance' or 'random', got {self.init!r}", setting="init")
        if self.method not in METHODS:
            raise ConfigError(f"must be one of {', '.join(METHODS)}, got {self.method!r}", setting="method")
        if self.importance not in IMPORTANCE_KINDS or self.importance == "taylor":
            raise ConfigError(f"must be one of l1, l2, bn, random, got {self.importance!r}", setting="importance")


@dataclass
class SearchResult:
    """One row per round in the columns of the paper's Tables 2 and 3, per-layer widths per round (Table 5),
    the chosen plans, every evaluated (score, MACs) point, the Pareto fronts and the DEAP logbook."""

    rows: list[dict]
    widths: list[dict[str, int]]  # index 0: the original model; index k: after round k
    plans: list[dict]
    evaluated: list[list[tuple[float, float]]]
    pareto: list[list[tuple[float, float]]]
    logbook: tools.Logbook
    model: nn.Module | None = None
    baseline: dict = field(default_factory=dict)
    cost: str = "macs"  # what the second objective (``evaluated``, ``pareto``) is: "macs", or "ms" (latency)

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "rows": self.rows, "widths": self.widths, "plans": self.plans,
                "pareto": self.pareto, "logbook": list(self.logbook), "cost": self.cost}

    def table(self) -> str:
        """Tables 2 and 3 of the paper for this run, as markdown."""
        b = self.baseline
        lat = "latency_ms" in b
        two = lat and b["latency_batch"] != 1
        head = "| round | params (M) | size (MB) | top-1 | reduction (%) | MMACs | time (s) |"
        if lat:
            head += " latency (ms, batch 1) |" + (f" latency (ms, batch {b['latency_batch']}) |" if two else "")
        lines = [head, "|---" * head.count(" | ") + "|---|"]

        def latency(r):
            return (f" {r['latency_ms']:.3f} |" + (f" {r['latency_batch_ms']:.3f} |" if two else "")) if lat else ""
        if b:
            lines.append(f"| 0 | {b['params'] / 1e6:.3f} | {b['size_mb']:.3f} | {_fmt(b.get('top1'))} | 0 | "
                         f"{b['macs'] / 1e6:.1f} | - |" + latency(b))
        for r in self.rows:
            lines.append(f"| {r['round']} | {r['params'] / 1e6:.3f} | {r['size_mb']:.3f} | {_fmt(r['top1'])} | "
                         f"{r['reduction_pct']:.1f} | {r['macs'] / 1e6:.1f} | {r['time_s']:.1f} |" + latency(r))
        return "\n".join(lines)

    def widths_table(self) -> str:
        """Table 5 of the paper: output channels of every conv/linear layer after each round."""
        layers = list(self.widths[0])
        head = "| layer | " + " | ".join(["r0"] + [f"r{k}" for k in range(1, len(self.widths))]) + " |"
        lines = [head, "|" + "---|" * (len(self.widths) + 1)]
        for name in layers:
            lines.append(f"| {name} | " + " | ".join(str(w.get(name, 0)) for w in self.widths) + " |")
        return "\n".join(lines)


def _fmt(x):
    return "-" if x is None else f"{x:.4f}"


def _model_row(model, example_inputs, config=None):
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


def search(model: nn.Module, example_inputs: torch.Tensor, score_x: torch.Tensor, score_y: torch.Tensor, *,
           recal_x=None, report: Callable[[nn.Module], float] | None = None,
           finetune: Callable[[nn.Module, int], nn.Module] | None = None,
           on_round: Callable[[int, nn.Module, dict, PruningPlan], None] | None = None,
           config: SearchConfig | None = None,
           fitness: FitnessConfig | None = None, space_kwargs: dict | None = None,
           checkpoint_dir: str | None = None, progress: bool = True, verbose: bool = True,
           latency_cache: str | None = None, **overrides) -> SearchResult:
    """Run the multi-round GA and return a :class:`SearchResult` (its ``model`` is the final pruned model).

    ``score_x``/``score_y``: the fitness subset (held out; never the images you report accuracy on).
    ``recal_x``: training batches for BN re-calibration. ``report(model) -> top-1``: the accuracy reported per round
    (on a separate split). ``finetune(model, round) -> model`` runs between rounds. Settings go in ``config`` or as
    keyword overrides (``rounds=``, ``generations=``, ``population=``, ``elites=``, ``p_c=``, ``p_mut=``,
    ``target=``, ``objective=``, ``seed=``...). ``on_round(round, model, row, plan)`` is called after each round
    (to export it, say). With ``checkpoint_dir`` the state is saved after every generation and
    an existing checkpoint there is resumed.

    ``target_kind="latency"``: ``target`` is a latency budget in ms on ``runtime`` at ``latency_batch`` with
    ``threads`` threads. Each round measures a :class:`evoprune.latency.LatencyTable` of its model (cached in
    ``latency_cache``, default ``~/.cache/evoprune``), the fitness cost is the predicted latency, the budget falls
    geometrically from the measured latency of the original model to ``target``, and each row reports the measured
    latency of the pruned model. A budget below the smallest legal plan's is refused before any search.
    """
    config = _replace(config or SearchConfig(), overrides)
    config.check()
    fitness = fitness or FitnessConfig()
    fitness.check()
    if not isinstance(model, nn.Module):
        raise ConfigError(f"search expects an nn.Module, got {type(model).__name__}")
    space_kwargs = dict(space_kwargs or {})
    space_kwargs.setdefault("connections", config.connections)
    timed = config.target_kind == "latency"
    if timed and config.snap:
        space_kwargs.setdefault("round_to", kernel_step())
    elif timed and not space_kwargs.get("round_to"):
        warnings.warn(f"snap=False: widths off multiples of {kernel_step()} channels run on slower kernel paths that "
                      "the latency table does not time, so it under-predicts such plans (B5: 2.7x slower on ResNet-18 "
                      "at 0.85x the MACs)", LatencyWarning, stacklevel=2)
    settings = {k: v for k, v in vars(config).items()}
    settings.update({f"fitness.{k}": v for k, v in vars(fitness).items() if k not in ("threads", "trace_dir")})

    original = model
    space0 = PruningSpace.from_model(original, example_inputs, **space_kwargs)
    table0 = _latency_table(original, space0, example_inputs, config, latency_cache) if timed else None
    if timed:
        table0.check_budget(config.target)
    baseline = _model_row(original, example_inputs, config)
    baseline["top1"] = report(original) if report else None
    state = ckpt.load(checkpoint_dir, fingerprint=space0.fingerprint, settings=settings) if checkpoint_dir else None
    creator_types()
    logbook = tools.Logbook()
    cost = "ms" if timed else "macs"
    logbook.header = ["round", "gen", "evals", "feasible", "best", "median"] + \
        (["best_ms", "min_ms", "best_mmacs"] if timed else ["best_mmacs", "min_mmacs"]) + ["hv"]
    result = SearchResult([], [layer_widths(original)], [], [], [], logbook, baseline=baseline, cost=cost)
    current = original
    start_round, resume_gen = 1, None
    if state is None:
        random.seed(config.seed)
        np.random.seed(config.seed % 2**32)
        torch.manual_seed(config.seed)
    else:
        result.rows, result.plans = state["rows"], state["plans"]
        result.widths, result.evaluated, result.pareto = state["widths"], state["evaluated"], state["pareto"]
        logbook.extend(state["logbook"])
        for plan in result.plans:  # rebuild the structure of the last finished round, then its weights
            replay = space0 if current is original else \
                PruningSpace.from_model(current, example_inputs, with_cost=False, **space_kwargs)
            current = apply_plan(current, PruningPlan.from_dict(plan), example_inputs, space=replay)
        if state["weights"] is not None:
            current.load_state_dict(state["weights"])
        start_round = len(result.plans) + 1
        resume_gen = state.get("generation")
        ckpt.set_rng_state(state["rng"])
        if verbose and start_round > config.rounds:
            status(f"evoprune: {checkpoint_dir} holds a finished search ({config.rounds} round(s)); nothing to redo")
        elif verbose:
            status(f"evoprune: resumed from {checkpoint_dir} at round {start_round}, generation "
                   f"{resume_gen + 1 if resume_gen is not None else 0}")

    if timed:  # the budget falls from the measured latency to the target in ms
        total = table0.base_ms
        target = config.target / total
    else:  # from the original MACs/params to the target fraction of them
        total, target = baseline[config.target_kind], config.target
    ref_score = reference_score(fitness.metric, _num_classes(original, example_inputs, score_y))
    for k in range(start_round, config.rounds + 1):
        t0 = time.perf_counter()
        budget = total * target ** (k / config.rounds)
        space = space0 if current is original else PruningSpace.from_model(current, example_inputs, **space_kwargs)
        table = None if not timed else table0 if current is original else \
            _latency_table(current, space, example_inputs, config, latency_cache)
        importance = channel_importance(current, space, example_inputs, config.importance, seed=config.seed + k)
        evaluator = Evaluator(current, space, score_x, score_y, recal_x, fitness, latency=table)
        macs_budget = budget if config.target_kind == "macs" else None
        params_budget = budget if config.target_kind == "params" else None
        latency_budget = budget if timed else None
        toolbox = register(base.Toolbox(), space, evaluator, p_c=config.p_c, p_mut=config.p_mut,
                           objective=config.objective, elites=config.elites, macs_budget=macs_budget,
                           params_budget=params_budget, importance=importance, crossover=config.crossover,
                           mutation=config.mutation, init="random" if config.method == "random" else config.init,
                           latency=table, latency_budget=latency_budget, init_cut=_init_cut(config))
        n_first = config.population if config.method == "ga" else config.evaluations()
        last_gen = config.generations if config.method == "ga" else 0
        feasible = _feasibility(space, macs_budget, params_budget, latency_budget)
        base_cost = table.base_ms if timed else space.base_macs
        cost_budget = latency_budget if timed else macs_budget
        front = tools.ParetoFront()
        if state is not None and resume_gen is not None and state.get("round") == k:
            pop = _restore_population(state["population"])
            front.update(_restore_population(state["front"]))
            result.evaluated[-1] = evaluated = [tuple(p) for p in result.evaluated[-1]]
            first_gen = resume_gen + 1
        else:
            pop = toolbox.population(n_first)
            evaluated = []
            result.evaluated.append(evaluated)
            n = _evaluate(toolbox, pop, evaluated, _label(k, config, 0) if progress else None)
            front.update(pop)
            _record(logbook, k, 0, n, pop, feasible, space, base_cost, cost, verbose, ref_score)
            first_gen = 1
            _save(checkpoint_dir, space0, settings, result, k, 0, pop, front, current, original)
        for gen in range(first_gen, last_gen + 1):
            elites = toolbox.select(pop, config.elites)
            pop = [toolbox.clone(e) for e in elites] + vary(toolbox, elites, config.population - len(elites))
            n = _evaluate(toolbox, pop, evaluated, _label(k, config, gen) if progress else None)
            front.update(pop)
            _record(logbook, k, gen, n, pop, feasible, space, base_cost, cost, verbose, ref_score)
            _save(checkpoint_dir, space0, settings, result, k, gen, pop, front, current, original)
        best = _choose(pop + list(front), feasible, config.objective, cost_budget)
        plan = space.decode(best)
        pruned = apply_plan(current, plan, example_inputs, space=space)
        if fitness.bn_recalibration and recal_x:
            recalibrate_bn(pruned, recal_x)
        search_score = best.fitness.values[0]
        top1_pruned = report(pruned) if report else None
        if finetune is not None:
            pruned = finetune(pruned, k)
        row = _model_row(pruned, example_inputs, config)
        row.update({
            "round": k, "budget": budget, "search_score": search_score, "top1_pruned": top1_pruned,
            "top1": report(pruned) if report else None,
            "reduction_pct": 100.0 * (1 - row["params"] / baseline["params"]),
            "macs_pct": 100.0 * row["macs"] / baseline["macs"], "time_s": time.perf_counter() - t0,
            "evaluations": sum(r.get("evals", 0) for r in logbook if r["round"] == k),
            "cut": list(plan.cut),
        })
        if timed:
            row["predicted_ms"] = table.predict(plan)
        result.rows.append(row)
        result.plans.append(plan.to_dict())
        result.widths.append(layer_widths(pruned))
        result.pareto.append(sorted((ind.fitness.values[0], ind.fitness.values[1]) for ind in front))
        evaluator.release()
        current = pruned
        if on_round is not None:
            on_round(k, pruned, row, plan)
        _save(checkpoint_dir, space0, settings, result, k + 1, None, None, None, current, original)
        if verbose:
            status(f"evoprune: round {k}: {row['params'] / 1e6:.3f} M params, {row['macs'] / 1e6:.1f} MMACs "
                   f"({row['macs_pct']:.1f} %), "
                   + (f"{row['latency_ms']:.3f} ms on {config.runtime} (budget {budget:.3f}), " if timed else "")
                   + f"search score {search_score:.4f}"
                   + (f", top-1 {row['top1']:.4f}" if row["top1"] is not None else ""))
    result.model = current
    return result


def vary(toolbox: base.Toolbox, parents: list, n: int) -> list:
    """``n`` children: clones of two random parents, crossed with ``toolbox.mate``; each child is then mutated
    with probability ``toolbox.p_mut`` (the paper's per-individual mutation rate). Fitnesses are invalidated."""
    children = []
    while len(children) < n:
        a, b = (toolbox.clone(x) for x in (random.sample(parents, 2) if len(parents) > 1 else parents * 2))
        a, b = toolbox.mate(a, b)
        for child in (a, b):
            if random.random() < toolbox.p_mut:
                toolbox.mutate(child)
            del child.fitness.values
        children.extend((a, b))
    return children[:n]


def _replace(cfg, overrides):
    unknown = [k for k in overrides if not hasattr(cfg, k)]
    if unknown:
        raise ConfigError(f"unknown search setting(s): {', '.join(unknown)}")
    new = copy.copy(cfg)
    for k, v in overrides.items():
        setattr(new, k, v)
    return new


def _feasibility(space, macs_budget, params_budget, latency_budget=None):
    def feasible(ind):
        if latency_budget is not None:
            return ind.fitness.values[1] <= latency_budget
        if macs_budget is not None:
            return ind.fitness.values[1] <= macs_budget
        return space.cost_of(ind)[1] <= params_budget
    return feasible


def _init_cut(config) -> float:
    """The share of residual units the initial plans cut: ``config.init_cut``, or by default 0.2 for a latency
    target (random search cuts as many; on ResNet-18 at batch 1 a block cut buys latency cheaply, B5) and 0
    otherwise."""
    if config.init_cut is not None:
        return config.init_cut
    return 0.2 if config.target_kind == "latency" else 0.0


def _latency_table(model, space, example_inputs, config, cache_dir) -> LatencyTable:
    return LatencyTable.measure(model, space, example_inputs, runtime=config.runtime, batch=config.latency_batch,
                                threads=config.threads, cache_dir=cache_dir)


def _evaluate(toolbox, population, evaluated, label: str | None = None) -> int:
    """Evaluate the individuals without a fitness; each distinct genome once per call. With ``label``, a progress
    bar (on a terminal) advances with every fitness result."""
    todo = [ind for ind in population if not ind.fitness.valid]
    unique = {}
    for ind in todo:
        unique.setdefault(tuple(ind), ind)
    scores = toolbox.map(toolbox.evaluate, list(unique.values()))
    with bar(scores, total=len(unique), desc=label, unit="plan", enabled=label is not None) as scores:
        results = dict(zip(unique, scores))
    for ind in todo:
        ind.fitness.values = results[tuple(ind)]
    evaluated.extend(results.values())
    return len(unique)


def _label(k, config, gen):
    return f"round {k}/{config.rounds} gen {gen}/{config.generations}"


def _num_classes(model, example_inputs, score_y) -> int:
    """Classes of the task: the model's output width (labels as a fallback)."""
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example_inputs)
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return int(out.shape[1])
    return int(torch.as_tensor(score_y).max()) + 1


def _record(logbook, k, gen, n, pop, feasible, space, base_cost, cost, verbose, ref_score=0.0):
    scores = [ind.fitness.values[0] for ind in pop]
    ok = [ind for ind in pop if feasible(ind)]
    best = max(ok or pop, key=lambda ind: (ind.fitness.values[0], -ind.fitness.values[1]))
    unit, scale = ("ms", 1.0) if cost == "ms" else ("mmacs", 1e6)
    costs = {f"best_{unit}": round(best.fitness.values[1] / scale, 4),
             f"min_{unit}": round(min(ind.fitness.values[1] for ind in pop) / scale, 4)}
    if cost == "ms":  # MACs stay on record beside the latency
        costs["best_mmacs"] = round(space.cost_of(best)[0] / 1e6, 4)
    logbook.record(round=k, gen=gen, evals=n, feasible=len(ok), best=round(best.fitness.values[0], 6),
                   median=round(statistics.median(scores), 6), **costs,
                   hv=round(hypervolume(pop, base_cost, ref_score), 6))
    if verbose:
        status(logbook.stream)


def hypervolume(population, base_macs, ref_score: float = 0.0) -> float:
    """Hypervolume of (score up, cost fraction down) against the reference point (``ref_score``, cost fraction 1);
    ``base_macs`` is the unpruned model's cost (MACs, or ms for a latency objective).

    ``ref_score`` is :func:`evoprune.fitness.reference_score`: top-1 0, or minus the chance-level loss
    ``-ln(classes)`` under ``metric="loss"`` (scores there are minus a loss, so a reference of 0 would leave every
    point outside). Points no better than the reference, or not cheaper than the base model, add nothing."""
    import moocore
    pts = np.array([(-ind.fitness.values[0], ind.fitness.values[1] / base_macs) for ind in population
                    if ind.fitness.values[0] > ref_score and ind.fitness.values[1] < base_macs])
    return float(moocore.hypervolume(pts, ref=[-ref_score, 1.0])) if len(pts) else 0.0


def _choose(candidates, feasible, objective, cost_budget):
    """The best plan under the target: the highest score among feasible plans (lower cost on ties)."""
    ok = [ind for ind in candidates if feasible(ind)]
    if ok:
        return max(ok, key=lambda ind: (ind.fitness.values[0], -ind.fitness.values[1]))
    return sel_budget(candidates, 1, cost_budget if cost_budget is not None else float("inf"))[0]


def _restore_population(saved):
    _, individual_cls = creator_types()
    pop = []
    for genes, values in saved:
        ind = individual_cls(int(g) for g in genes)
        ind.fitness.values = tuple(values)
        pop.append(ind)
    return pop


def _pack(individuals):
    if individuals is None:
        return None
    return [(torch.tensor(list(ind), dtype=torch.uint8), list(ind.fitness.values)) for ind in individuals]


def _save(directory, space0, settings, result, k, gen, pop, front, current, original):
    if not directory:
        return
    ckpt.save(directory, {
        "fingerprint": space0.fingerprint, "settings": settings, "round": k, "generation": gen,
        "population": _pack(pop), "front": _pack(front),
        "rows": result.rows, "plans": result.plans, "widths": result.widths, "evaluated": result.evaluated,
        "pareto": result.pareto, "logbook": list(result.logbook),
        "weights": None if current is original else current.state_dict(),
        "rng": ckpt.rng_state(),
    })
