"""SearchConfig: the settings of a search (the paper's N, K, p_c, p_mut, T, the target and the operators), checked
before any work."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..deploy.runtime import check_runtime
from ..errors import ConfigError
from ..prune.lsq import CALIB_IMAGES
from ..prune.refit import METHODS as RECONSTRUCT_METHODS
from ..space.importance import KINDS as IMPORTANCE_KINDS
from ..validators import check_bool, check_choice, check_fraction, check_int, check_probability
from .budget import Budget
from .operators import CROSSOVERS, INITS, MUTATIONS, OBJECTIVES

METHODS = ("ga", "random", "init", "knapsack")


@dataclass
class SearchConfig:
    """The search's settings. ``method``: ``"ga"`` (the genetic algorithm), one of two baselines given the GA's
    evaluation budget (:meth:`evaluations`) and ranked by the same fitness: ``"random"`` (random search: random
    plans, ``init="random"``, repaired into the budget) or ``"init"`` (the GA's own initial population alone, as
    many individuals as the GA evaluates), or ``"knapsack"`` (widths by dynamic programming over the cost table,
    values from channel importance: :mod:`evoprune.evolve.knapsack`; one evaluation).

    Each generation makes ``offspring`` children of the K elites (default ``population - elites``, the paper's),
    with duplicates of the population or of each other mutated again (``dedupe``). With ``screen`` < 1 the
    children are first scored on that share of the fitness images and re-calibration batches, and only the best
    ``survivors`` (default ``elites``) are scored on all of them and may become parents (staged selection, after
    EvoPress). At the end of a round the ``final_pool`` best distinct plans under the budget are re-scored on
    images the search never selected on (``choose_x``/``choose_y`` of :func:`evoprune.search`) and the best there
    is the round's plan."""

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
    mutation: str = "level"  # level-switch at equal cost; B7: +0.32 pp over "mixed" (the old default), CI incl. 0
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
    reconstruct: str = "lsq"  # each round's chosen model: "lsq" (least-squares refit), "bias" or "none" (B6)
    calib_images: int = CALIB_IMAGES  # unlabeled images (the first of recal_x) the reconstruction fits on
    offspring: int | None = None  # children per generation; None: population - elites
    screen: float = 1.0  # < 1: children scored first on this share of the fitness images (staged selection)
    survivors: int | None = None  # screen < 1: the children re-scored on every image; None: elites
    dedupe: bool = True  # duplicate children (of the population or each other) are mutated again
    final_pool: int = 5  # plans re-scored on choose_x at the end of a round (1, or no choose_x: the best score)

    def children(self) -> int:
        """The children made per generation."""
        return self.offspring if self.offspring is not None else self.population - self.elites

    def survivor_count(self) -> int:
        """The children scored on every fitness image per generation."""
        if self.screen >= 1:
            return self.children()
        return min(self.children(), self.survivors if self.survivors is not None else self.elites)

    def evaluations(self) -> int:
        """The fitness evaluations of one round of the GA at most, in full-subset units (the initial population,
        then per generation the children, a screened one counting ``screen``, and the survivors re-scored): the
        budget the ``random`` and ``init`` baselines get."""
        per_gen = self.children() if self.screen >= 1 else self.children() * self.screen + self.survivor_count()
        return self.population + math.ceil(self.generations * per_gen)

    def budget(self, base: float) -> Budget:
        """The final :class:`Budget` of this search for a model whose MACs, params or latency (ms) is ``base``."""
        return Budget.of_target(self.target_kind, self.target, base)

    def check(self):
        """Raise :class:`ConfigError` (its ``setting`` names the field) for the first setting out of range."""
        check_int("rounds", self.rounds)
        check_int("generations", self.generations)
        check_int("population", self.population, 2)
        check_int("elites", self.elites, 1, maximum=self.population,
                  what=f"from 1 to the population size ({self.population})")
        if self.offspring is None and self.elites == self.population:
            raise ConfigError(f"equals the population size ({self.population}), so no generation makes a child and "
                              "the search only scores its initial population; give fewer elites, or offspring "
                              "(--offspring) > 0", setting="elites")
        check_int("offspring", self.offspring, optional=True)
        check_int("survivors", self.survivors, optional=True)
        check_fraction("screen", self.screen)
        check_int("final_pool", self.final_pool)
        check_bool("dedupe", self.dedupe)
        check_probability("p_c", self.p_c)
        check_probability("p_mut", self.p_mut)
        if self.init_cut is not None:
            check_probability("init_cut", self.init_cut)
        check_int("latency_batch", self.latency_batch)  # checked with any target: a bad value is never unused
        check_int("threads", self.threads)
        Budget.check_target(self.target_kind, self.target)
        if self.target_kind == "latency":
            check_runtime(self.runtime)  # known and installed (else names the extra)
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("crossover", self.crossover, CROSSOVERS)
        check_choice("mutation", self.mutation, MUTATIONS)
        check_choice("init", self.init, INITS)
        check_choice("method", self.method, METHODS)
        check_choice("reconstruct", self.reconstruct, RECONSTRUCT_METHODS)
        check_int("calib_images", self.calib_images)
        if self.importance not in IMPORTANCE_KINDS or self.importance == "taylor":
            raise ConfigError(f"must be one of l1, l2, bn, random, got {self.importance!r}", setting="importance")
