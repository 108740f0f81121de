"""SearchConfig: the settings of a search (the paper's N, K, p_c, p_mut, T, the target and the operators), checked
before any work."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError, check_probability
from .importance import KINDS as IMPORTANCE_KINDS
from .lsq import CALIB_IMAGES
from .refit import METHODS as RECONSTRUCT_METHODS
from .runtime import check_runtime
from .toolbox import CROSSOVERS, MUTATIONS


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
    reconstruct: str = "lsq"  # each round's chosen model: "lsq" (least-squares refit), "bias" or "none" (B6)
    calib_images: int = CALIB_IMAGES  # unlabeled images (the first of recal_x) the reconstruction fits on

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
        if self.reconstruct not in RECONSTRUCT_METHODS:
            raise ConfigError(f"must be one of {', '.join(RECONSTRUCT_METHODS)}, got {self.reconstruct!r}",
                              setting="reconstruct")
        if not isinstance(self.calib_images, int) or isinstance(self.calib_images, bool) or self.calib_images < 1:
            raise ConfigError(f"must be an int >= 1, got {self.calib_images!r}", setting="calib_images")
        if self.importance not in IMPORTANCE_KINDS or self.importance == "taylor":
            raise ConfigError(f"must be one of l1, l2, bn, random, got {self.importance!r}", setting="importance")
