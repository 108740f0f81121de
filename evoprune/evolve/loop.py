"""The search: T rounds, each a GA over the current model, then physical pruning and fine-tuning, as steps a user
can recombine.

Defaults are the paper's: population N=30, K=5 elites, p_c=0.6, p_mut=0.6, T=5 rounds. Round ``k`` of ``T`` aims
at ``target ** (k / T)`` of the original MACs (or params, or the measured latency), so each round prunes further
from the last and the final model meets ``target``. :class:`Search` holds a run's context and exposes its steps:

* :meth:`Search.start_round`: the round's pruning space, channel importance, evaluator and toolbox, and its first
  population, evaluated (or the state a checkpoint left);
* one generation (:meth:`Search.generation`): ``select`` K elites, :func:`vary` them into N-K children (or
  ``offspring``), mutate duplicates again, screen them on a share of the images if asked, :meth:`Search.evaluate`
  the new ones (``toolbox.map``: SCOOP workers or serial), record the logbook row (with the population's
  diversity) and checkpoint;
* :meth:`Search.finish_round`: choose the plan (the best under the budget of a few re-scored on images the search
  never selected on), ``apply_plan``, reconstruct, fine-tune, measure and report.

:func:`search` is a short composition of these steps; the README shows the same loop written out. The state is
checkpointed after every generation, so a killed search resumes to the same result.
"""
from __future__ import annotations

import copy
import random
import statistics
import time
import warnings
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from deap import base, tools

from ..deploy.latency import LatencyTable, LatencyWarning
from ..deploy.runtime import kernel_step
from ..errors import ConfigError
from ..netinfo import layer_widths, output_classes
from ..progress import bar, status
from ..prune.lsq import calibration_subset
from ..prune.refit import reconstruct
from ..prune.surgery import apply_plan
from ..space.importance import channel_importance
from ..space.plan import PruningPlan
from ..space.pruning_space import PruningSpace
from . import checkpoint as ckpt
from .budget import TARGET_KINDS
from .config import METHODS, SearchConfig
from .fitness import Evaluator, FitnessConfig, recalibrate_bn, reference_score
from .population import distinct, diversity, fresh, vary
from .result import SearchResult, hypervolume
from .round import Round, curse_reference, final_choice, init_cut, model_row
from .toolbox import creator_types, register


class Search:
    """A search's context: the model, the data, the settings, the logbook and the result so far (resumed from
    ``checkpoint_dir`` if one is there). Arguments as in :func:`search`. Drive it with :meth:`rounds`,
    :meth:`start_round`, :meth:`generation` (or :meth:`evaluate` on your own offspring) and :meth:`finish_round`."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, score_x: torch.Tensor,
                 score_y: torch.Tensor, *, recal_x=None, report: Callable[[nn.Module], float] | None = None,
                 finetune: Callable[[nn.Module, int], nn.Module] | None = None,
                 on_round: Callable[[int, nn.Module, dict, PruningPlan], None] | None = None,
                 config: SearchConfig | None = None, fitness: FitnessConfig | None = None,
                 space_kwargs: dict | None = None, checkpoint_dir: str | None = None, progress: bool = True,
                 verbose: bool = True, latency_cache: str | None = None, map: Callable | None = None,
                 choose_x: torch.Tensor | None = None, choose_y: torch.Tensor | None = None, **overrides):
        config = _replace(config or SearchConfig(), overrides)
        config.check()
        fitness = fitness or FitnessConfig()
        fitness.check()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"search expects an nn.Module, got {type(model).__name__}")
        self.config, self.fitness = config, fitness
        self.example_inputs, self.score_x, self.score_y, self.recal_x = example_inputs, score_x, score_y, recal_x
        self.choose_x, self.choose_y = choose_x, choose_y
        if choose_x is not None and (len(choose_x) == 0 or tuple(choose_x.shape[1:]) != tuple(score_x.shape[1:])
                                     or (choose_y is None and fitness.metric != "kl")
                                     or (choose_y is not None and len(choose_y) != len(choose_x))):
            raise ConfigError(f"choose_x must be non-empty images shaped like score_x with one label each in choose_y "
                              f"(labels may be None only with metric='kl'); got {tuple(choose_x.shape)} images and "
                              f"{None if choose_y is None else len(choose_y)} labels", setting="choose_x")
        self.report, self.finetune, self.on_round = report, finetune, on_round
        self.checkpoint_dir, self.progress, self.verbose = checkpoint_dir, progress, verbose
        self.latency_cache, self.map = latency_cache, map
        self.timed = config.target_kind == "latency"
        space_kwargs = dict(space_kwargs or {})
        space_kwargs.setdefault("connections", config.connections)
        if self.timed and config.snap:
            space_kwargs.setdefault("round_to", kernel_step())
        elif self.timed and not space_kwargs.get("round_to"):
            warnings.warn(f"snap=False: widths off multiples of {kernel_step()} channels run on slower kernel paths "
                          "that the latency table does not time, so it under-predicts such plans (B5: 2.7x slower "
                          "on ResNet-18 at 0.85x the MACs)", LatencyWarning, stacklevel=3)
        self.space_kwargs = space_kwargs
        if config.reconstruct != "none" and not recal_x:
            raise ConfigError(f"{config.reconstruct!r} needs calibration images: pass recal_x (a few training "
                              "batches), or reconstruct='none'", setting="reconstruct")
        self.calib_x = calibration_subset(recal_x, config.calib_images)
        self.settings = dict(vars(config))
        self.settings.update({f"fitness.{k}": v for k, v in vars(fitness).items() if k not in ("threads", "trace_dir")})

        self.original = self.current = model
        self.space0 = PruningSpace.from_model(model, example_inputs, **space_kwargs)
        self.table0 = self._latency_table(model, self.space0) if self.timed else None
        if self.timed:
            self.table0.check_budget(config.target)
        baseline = model_row(model, example_inputs, config)
        baseline["top1"] = report(model) if report else None
        creator_types()
        self.logbook = tools.Logbook()
        self.logbook.header = ["round", "gen", "evals", "screened", "feasible", "best", "median"] + \
            (["best_ms", "min_ms", "best_mmacs"] if self.timed else ["best_mmacs", "min_mmacs"]) + \
            ["hv", "hamming", "distinct"]
        self.result = SearchResult([], [layer_widths(model)], [], [], [], self.logbook, baseline=baseline,
                                   cost="ms" if self.timed else "macs")
        # the budget falls from the original model's MACs, params or measured latency to the target
        base = self.table0.base_ms if self.timed else baseline[config.target_kind]
        self.budgets = config.budget(base).schedule(base, config.rounds)
        self.ref_score = reference_score(fitness.metric, output_classes(model, example_inputs, score_y))
        self.state = ckpt.load(checkpoint_dir, fingerprint=self.space0.fingerprint, settings=self.settings) \
            if checkpoint_dir else None
        self.start = 1
        if self.state is None:
            random.seed(config.seed)
            np.random.seed(config.seed % 2**32)
            torch.manual_seed(config.seed)
        else:
            self._resume()

    # ------------------------------------------------------------------------------------------ the steps
    def rounds(self) -> range:
        """The rounds still to run (all of them, or those after a resumed checkpoint's)."""
        return range(self.start, self.config.rounds + 1)

    def start_round(self, k: int) -> Round:
        """Round ``k``: its space, importance, evaluator and toolbox, and its first population, evaluated and
        recorded (or, resuming mid-round, the population and front the checkpoint holds)."""
        config, current = self.config, self.current
        budget = self.budgets[k - 1]
        space = self.space0 if current is self.original else \
            PruningSpace.from_model(current, self.example_inputs, **self.space_kwargs)
        table = None if not self.timed else self.table0 if current is self.original else \
            self._latency_table(current, space)
        importance = channel_importance(current, space, self.example_inputs, config.importance, seed=config.seed + k)
        evaluator = Evaluator(current, space, self.score_x, self.score_y, self.recal_x, self.fitness, latency=table)
        toolbox = register(base.Toolbox(), space, evaluator, p_c=config.p_c, p_mut=config.p_mut,
                           objective=config.objective, elites=config.elites, importance=importance,
                           crossover=config.crossover, mutation=config.mutation,
                           init="random" if config.method == "random" else config.init, latency=table,
                           init_cut=init_cut(config), map=self.map, budget=budget)
        rnd = Round(k, current, space, budget, evaluator, toolbox, table,
                    last_gen=config.generations if config.method == "ga" else 0)
        rnd.screen = evaluator.screening(config.screen) if config.screen < 1 else None
        state = self.state
        if state is not None and state.get("generation") is not None and state.get("round") == k:
            individual_cls = creator_types()[1]
            rnd.population = ckpt.restore_population(state["population"], individual_cls)
            rnd.front.update(ckpt.restore_population(state["front"], individual_cls))
            self.result.evaluated[-1] = rnd.evaluated = [tuple(p) for p in self.result.evaluated[-1]]
            rnd.gen = state["generation"]
            return rnd
        self.result.evaluated.append(rnd.evaluated)
        if config.method == "knapsack":
            rnd.population = [toolbox.knapsack()]
        else:
            rnd.population = toolbox.population(config.population if config.method == "ga" else
                                                config.evaluations())
        try:
            self.evaluate(rnd, rnd.population, gen=0)
        except BaseException:
            evaluator.release()
            raise
        return rnd

    def generation(self, rnd: Round) -> None:
        """One generation: K elites, their children (:func:`vary`; duplicates mutated again with ``dedupe``;
        screened on a share of the images with ``screen`` < 1, the best ``survivors`` kept), evaluated and
        recorded."""
        c = self.config
        elites = rnd.toolbox.select(rnd.population, c.elites)
        children = vary(rnd.toolbox, elites, c.children())
        if c.dedupe:
            fresh(rnd.toolbox, children, rnd.population)
        rnd.screened = 0
        if rnd.screen is not None:
            children = self._screen(rnd, children)
        rnd.population = [rnd.toolbox.clone(e) for e in elites] + children
        self.evaluate(rnd, rnd.population, gen=rnd.gen + 1)

    def _screen(self, rnd: Round, children: list) -> list:
        """The first stage of a staged generation: score ``children`` on the screening share of the images, keep
        the best ``survivors`` (by ``select``) with their fitness cleared, for :meth:`evaluate` to score in full."""
        todo = rnd.toolbox.settle(children)
        unique = distinct(todo)
        scores = dict(zip(unique, rnd.toolbox.map(rnd.screen, list(unique.values()))))
        for ind in todo:
            ind.fitness.values = scores[tuple(ind)]
        rnd.screened = len(unique)
        kept = [rnd.toolbox.clone(ind) for ind in rnd.toolbox.select(todo, self.config.survivor_count())]
        for ind in kept:
            del ind.fitness.values
        return kept

    def evaluate(self, rnd: Round, population: list, gen: int) -> int:
        """Score the individuals of ``population`` without a fitness (each distinct genome once, through
        ``toolbox.map``), update the front, record logbook row ``gen`` and checkpoint. Returns the calls made."""
        label = f"round {rnd.k}/{self.config.rounds} gen {gen}/{self.config.generations}" if self.progress else None
        todo = rnd.toolbox.settle([ind for ind in population if not ind.fitness.valid])
        unique = distinct(todo)
        scores = rnd.toolbox.map(rnd.toolbox.evaluate, list(unique.values()))
        with bar(scores, total=len(unique), desc=label, unit="plan", enabled=label is not None) as scores:
            results = dict(zip(unique, scores))
        for ind in todo:
            ind.fitness.values = results[tuple(ind)]
        rnd.evaluated.extend(results.values())
        rnd.population, rnd.gen = population, gen
        rnd.front.update(population)
        self._record(rnd, len(unique))
        ckpt.save_search(self.checkpoint_dir, self.space0, self.settings, self.result, rnd.k, gen, population,
                         rnd.front, self.current, self.original)
        return len(unique)

    def finish_round(self, rnd: Round) -> nn.Module:
        """Choose the best plan under the budget, prune physically, re-calibrate BN, fine-tune, measure, report
        and checkpoint; the pruned model is the next round's. Returns it."""
        config, fitness = self.config, self.fitness
        search_s = time.perf_counter() - rnd.t0
        best, choice_score, pool = final_choice(rnd, config.final_pool, self.choose_x, self.choose_y)
        plan = rnd.space.decode(best)
        report_score = curse_reference(rnd, plan, fitness, self.report, self.recal_x, self.example_inputs)
        pruned = apply_plan(rnd.model, plan, self.example_inputs, space=rnd.space)
        t_refit = 0.0
        if config.reconstruct != "none":  # structural distillation from the round's unpruned model (B6)
            t0 = time.perf_counter()
            pruned = reconstruct(rnd.model, pruned, plan, rnd.space, self.calib_x, config.reconstruct,
                                 seed=config.seed, inplace=True)
            t_refit = time.perf_counter() - t0
        recal_after = bool(fitness.bn_recalibration and self.recal_x)
        if recal_after and config.reconstruct == "lsq":
            # the refit targets the unpruned model's BN statistics, which fit at 25 % of the MACs; at 10 % a BN
            # re-calibration after it pays (B6): keep it where it scores higher on the fitness subset
            alt = recalibrate_bn(copy.deepcopy(pruned), self.recal_x)
            recal_after = rnd.evaluator.score_model(alt) > rnd.evaluator.score_model(pruned)
            pruned = alt if recal_after else pruned
        elif recal_after:
            recalibrate_bn(pruned, self.recal_x)
        top1_pruned = self.report(pruned) if self.report else None
        if self.finetune is not None:
            pruned = self.finetune(pruned, rnd.k)
        base = self.result.baseline
        row = model_row(pruned, self.example_inputs, config)
        row.update({
            "round": rnd.k, "budget": rnd.budget.limit, "budget_kind": rnd.budget.kind,
            "search_score": best.fitness.values[0],
            "top1_pruned": top1_pruned, "top1": self.report(pruned) if self.report else None,
            "reduction_pct": 100.0 * (1 - row["params"] / base["params"]),
            "macs_pct": 100.0 * row["macs"] / base["macs"], "time_s": time.perf_counter() - rnd.t0,
            "search_s": search_s,
            "evaluations": sum(r.get("evals", 0) for r in self.logbook if r["round"] == rnd.k),
            "cut": list(plan.cut), "reconstruct": config.reconstruct, "reconstruct_s": t_refit,
            "bn_recalibrated": recal_after, "choice_score": choice_score, "choice_pool": pool,
            "report_score": report_score,
            "curse_pp": None if report_score is None else 100.0 * (best.fitness.values[0] - report_score),
        })
        if self.timed:
            row["predicted_ms"] = rnd.table.predict(plan)
        self.result.rows.append(row)
        self.result.plans.append(plan.to_dict())
        self.result.widths.append(layer_widths(pruned))
        self.result.pareto.append(sorted((ind.fitness.values[0], ind.fitness.values[1]) for ind in rnd.front))
        rnd.evaluator.release()
        self.current = self.result.model = pruned
        if self.on_round is not None:
            self.on_round(rnd.k, pruned, row, plan)
        ckpt.save_search(self.checkpoint_dir, self.space0, self.settings, self.result, rnd.k + 1, None, None, None,
                         self.current, self.original)
        if self.verbose:
            status(f"evoprune: round {rnd.k}: {row['params'] / 1e6:.3f} M params, {row['macs'] / 1e6:.1f} MMACs "
                   f"({row['macs_pct']:.1f} %), "
                   + (f"{row['latency_ms']:.3f} ms on {config.runtime} (budget {rnd.budget.limit:.3f}), "
                      if self.timed else "")
                   + f"search score {row['search_score']:.4f}"
                   + (f", top-1 {row['top1']:.4f}" if row["top1"] is not None else ""))
        return pruned

    # ------------------------------------------------------------------------------------------ internals
    def _resume(self):
        state, result = self.state, self.result
        result.rows, result.plans = state["rows"], state["plans"]
        result.widths, result.evaluated, result.pareto = state["widths"], state["evaluated"], state["pareto"]
        self.logbook.extend(state["logbook"])
        current = self.original
        for plan in result.plans:  # rebuild the structure of the last finished round, then its weights
            replay = self.space0 if current is self.original else \
                PruningSpace.from_model(current, self.example_inputs, with_cost=False, **self.space_kwargs)
            current = apply_plan(current, PruningPlan.from_dict(plan), self.example_inputs, space=replay)
        if state["weights"] is not None:
            current.load_state_dict(state["weights"])
        self.current = result.model = current
        self.start = len(result.plans) + 1
        ckpt.set_rng_state(state["rng"])
        gen = state.get("generation")
        if self.verbose and self.start > self.config.rounds:
            status(f"evoprune: {self.checkpoint_dir} holds a finished search ({self.config.rounds} round(s)); "
                   "nothing to redo")
        elif self.verbose:
            status(f"evoprune: resumed from {self.checkpoint_dir} at round {self.start}, generation "
                   f"{gen + 1 if gen is not None else 0}")

    def _latency_table(self, model, space) -> LatencyTable:
        c = self.config
        return LatencyTable.measure(model, space, self.example_inputs, runtime=c.runtime, batch=c.latency_batch,
                                    threads=c.threads, cache_dir=self.latency_cache)

    def _record(self, rnd: Round, n: int) -> None:
        pop, timed = rnd.population, self.timed
        scores = [ind.fitness.values[0] for ind in pop]
        ok = [ind for ind in pop if rnd.feasible(ind)]
        best = max(ok or pop, key=lambda ind: (ind.fitness.values[0], -ind.fitness.values[1]))
        unit, scale = ("ms", 1.0) if timed else ("mmacs", 1e6)
        costs = {f"best_{unit}": round(best.fitness.values[1] / scale, 4),
                 f"min_{unit}": round(min(ind.fitness.values[1] for ind in pop) / scale, 4)}
        if timed:  # MACs stay on record beside the latency
            costs["best_mmacs"] = round(rnd.space.cost_of(best)[0] / 1e6, 4)
        base_cost = rnd.table.base_ms if timed else rnd.space.base_macs
        self.logbook.record(round=rnd.k, gen=rnd.gen, evals=n, screened=getattr(rnd, "screened", 0), feasible=len(ok),
                            best=round(best.fitness.values[0], 6), median=round(statistics.median(scores), 6),
                            **costs, hv=round(hypervolume(pop, base_cost, self.ref_score), 6),
                            **diversity(pop, rnd.space.layout))
        if self.verbose:
            status(self.logbook.stream)


def search(model: nn.Module, example_inputs: torch.Tensor, score_x: torch.Tensor, score_y: torch.Tensor,
           **kwargs) -> SearchResult:
    """Run the multi-round GA and return a :class:`SearchResult` (its ``model`` is the final pruned model).

    ``score_x``/``score_y``: the fitness subset (held out; never the images you report accuracy on; with
    ``fitness=FitnessConfig(metric="kl")`` the labels may be None). ``choose_x``/``choose_y``: more held-out images
    (say the rest of the split ``score_x`` came from) on which the ``final_pool`` best plans of each round are
    re-scored to choose its plan; without them the best fitness score wins.
    ``recal_x``: training batches for BN re-calibration. ``report(model) -> top-1``: the accuracy reported per round
    (on a separate split). ``finetune(model, round) -> model`` runs between rounds. Settings go in ``config`` or as
    keyword overrides (``rounds=``, ``generations=``, ``population=``, ``elites=``, ``p_c=``, ``p_mut=``,
    ``target=``, ``objective=``, ``seed=``...). ``on_round(round, model, row, plan)`` is called after each round
    (to export it, say). With ``checkpoint_dir`` the state is saved after every generation and
    an existing checkpoint there is resumed. ``map``: the DEAP-style map that runs fitness calls (default: SCOOP's
    under ``python -m scoop``, else the builtin).

    ``target_kind="latency"``: ``target`` is a latency budget in ms on ``runtime`` at ``latency_batch`` with
    ``threads`` threads. Each round measures a :class:`evoprune.deploy.latency.LatencyTable` of its model (cached in
    ``latency_cache``, default ``~/.cache/evoprune``), the fitness cost is the predicted latency, the budget falls
    geometrically from the measured latency of the original model to ``target``, and each row reports the measured
    latency of the pruned model. A budget below the smallest legal plan's is refused before any search.

    The body is the loop below; write your own from the same steps (see :class:`Search`)::

        run = Search(model, example_inputs, score_x, score_y, **kwargs)
        for k in run.rounds():
            rnd = run.start_round(k)
            while rnd.gen < rnd.last_gen:
                run.generation(rnd)
            run.finish_round(rnd)      # also releases the round's evaluator
        return run.result
    """
    run = Search(model, example_inputs, score_x, score_y, **kwargs)
    for k in run.rounds():
        rnd = run.start_round(k)
        try:
            while rnd.gen < rnd.last_gen:
                run.generation(rnd)
            run.finish_round(rnd)
        finally:  # a failed round frees its fitness state too (engines ship every published one)
            rnd.evaluator.release()
    run.result.model = run.current
    return run.result


def _replace(cfg, overrides):
    unknown = [k for k in overrides if not hasattr(cfg, k)]
    if unknown:
        raise ConfigError(f"unknown search setting(s): {', '.join(unknown)}")
    new = copy.copy(cfg)
    for k, v in overrides.items():
        setattr(new, k, v)
    return new


__all__ = ["Search", "Round", "search", "vary", "hypervolume", "SearchConfig", "SearchResult", "METHODS",
           "TARGET_KINDS"]
