"""The prune job's settings (:class:`JobOptions`) and their command-line flags, declared once.

Every search/job flag of ``evoprune prune`` and the examples is derived from a :class:`Flag`: the flag's name, help,
choices, metavar and whether it is a negated ``--no-x`` switch. :class:`JobOptions`' own fields carry theirs as field
metadata (``field(metadata=flag(...))``); the fields it inherits from :class:`~evoprune.evolve.config.SearchConfig` get
theirs from :data:`SEARCH_FLAGS`, keyed by field name. Defaults and types come from the fields. Both the parser's
arguments (:func:`add_search_arguments`) and the setting -> flag names in error messages (:data:`FLAGS`) are built from
these declarations, so they cannot drift apart. Fields without a flag are API-only (:data:`API_ONLY`).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

from ..data import parse_normalization
from ..deploy.runtime import RUNTIMES
from ..errors import ConfigError
from ..evolve.config import METHODS, RECONSTRUCT_METHODS, SearchConfig
from ..evolve.engines import EXECUTORS, check_executor
from ..evolve.operators import CROSSOVERS, MUTATIONS
from ..validators import check_choice, check_device, check_int, check_positive, is_int, is_number

_FIELD_DEFAULT: Any = object()  # a Flag's default: the field's own


@dataclass(frozen=True)
class Flag:
    """How one setting is spelled on the command line.

    ``name`` is the flag (``--p-c``); ``negated`` marks a switch that turns a boolean setting off (``--no-kd`` sets
    ``kd=False``). ``type`` and ``default`` come from the setting's field unless given (the latency target is no
    field, so it gives both). The help shows the default after ``help`` when there is one (or where ``help`` says
    ``%(default)s``).
    """

    name: str
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    negated: bool = False
    type: Callable | None = None
    default: Any = _FIELD_DEFAULT

    @property
    def dest(self) -> str:
        """The argparse attribute the flag sets (``--p-c`` -> ``p_c``, ``--no-kd`` -> ``no_kd``)."""
        return self.name.lstrip("-").replace("-", "_")

    def add_to(self, group, default) -> None:
        """Add this flag to an argparse parser or group, with ``default`` (the setting's)."""
        if self.negated:
            group.add_argument(self.name, action="store_true", help=self.help)
            return
        if isinstance(default, bool):
            raise TypeError(f"{self.name}: a boolean setting's flag is a negated switch (--no-x)")
        kind = self.type or (type(default) if isinstance(default, (int, float)) else None)
        shown = "" if default is None or "%(default)" in self.help else " (default: %(default)s)"
        group.add_argument(self.name, type=kind, default=default, choices=self.choices, metavar=self.metavar,
                           help=self.help + shown)

    def value(self, args: argparse.Namespace):
        """The setting's value from parsed ``args`` (a negated switch given means False)."""
        given = getattr(args, self.dest)
        return not given if self.negated else given


def flag(name: str, help: str, **kwargs) -> dict:
    """The field metadata that gives a :class:`JobOptions` field its flag:
    ``field(default=..., metadata=flag(...))``."""
    return {"flag": Flag(name, help, **kwargs)}


DEFAULT_TARGET = 0.5  # --target-macs when no target flag is given
#: The target flags: only one may be given; each sets ``target`` with its ``target_kind``.
TARGET_FLAGS = {"target": "macs", "target_params": "params", "target_latency_ms": "latency"}

#: The flags of the :class:`~evoprune.evolve.config.SearchConfig` fields (declared here: config.py is the library's and
#: knows no command line), in the order ``--help`` lists them. ``target_latency_ms`` is no field: a latency target
#: is ``target`` with ``target_kind="latency"`` (:func:`options_from_args`), and SearchConfig's check names a bad
#: one so.
SEARCH_FLAGS: dict[str, Flag] = {
    "rounds": Flag("--rounds", "GA rounds T"),
    "population": Flag("--population", "population N"),
    "elites": Flag("--elites", "selected genomes K"),
    "p_c": Flag("--p-c", "crossover cut point p_c"),
    "p_mut": Flag("--p-mut", "mutation probability"),
    "generations": Flag("--generations", "generations per round"),
    "target": Flag("--target-macs", "final MACs as a fraction of the original, reached geometrically over the "
                                    f"rounds (default: {DEFAULT_TARGET}, when no other target is given)",
                   type=float, default=None, metavar="FRACTION"),
    "target_params": Flag("--target-params", "aim at this fraction of the original parameters instead of "
                                             "--target-macs (reached geometrically over the rounds)",
                          metavar="FRACTION", type=float, default=None),
    "target_latency_ms": Flag("--target-latency-ms", "aim at this latency in ms on --runtime instead of "
                                                     "--target-macs (measured per round with a latency table; "
                                                     "reached geometrically over the rounds)",
                              metavar="MS", type=float, default=None),
    "runtime": Flag("--runtime", "deployment runtime the latency is measured on (default: %(default)s; onnxruntime "
                                 "needs pip install 'evoprune[onnx]')", choices=RUNTIMES),
    "latency_batch": Flag("--latency-batch", "batch size the latency is measured at", metavar="N"),
    "threads": Flag("--threads", "the runtime's intra-op threads for latency", metavar="N"),
    "snap": Flag("--no-snap", "with --target-latency-ms: allow any width, not only multiples of the CPU's channel "
                              "block", negated=True),
    "objective": Flag("--objective", "selection: budget (best score under the MACs or latency budget), nsga2 or "
                                     "topk", choices=("budget", "nsga2", "topk")),
    "crossover": Flag("--crossover", "paper (one-point at the p_c cut) or uniform (whole groups swap)",
                      choices=CROSSOVERS),
    "mutation": Flag("--mutation", "level (level-switch: width moves between two layers at equal cost, plus a "
                                   "channel swap and unit toggles), mixed (one layer's width moves + swap), guided "
                                   "(importance-biased flips), bitflip (the paper's), swap (which channels, at "
                                   "constant widths) or width (layer widths move)", choices=MUTATIONS),
    "offspring": Flag("--offspring", "children per generation (default: --population minus --elites, the "
                                     "paper's)", metavar="N", type=int, default=None),
    "screen": Flag("--screen", "score children first on this share of the fitness images and re-calibration "
                               "batches, and only the best --survivors on all of them (staged selection; 1 turns it "
                               "off)", metavar="SHARE"),
    "survivors": Flag("--survivors", "with --screen < 1: children per generation scored on every fitness image "
                                     "(default: --elites)", metavar="N", type=int, default=None),
    "dedupe": Flag("--no-dedupe", "keep duplicate children (by default a copy of a plan already in the "
                                  "population is mutated again)", negated=True),
    "final_pool": Flag("--final-pool", "best plans re-scored on the rest of the search half of val (images the "
                                       "fitness never saw) to choose each round's plan; 1 takes the best fitness "
                                       "score", metavar="N"),
    "method": Flag("--method", "ga (the genetic algorithm), a baseline at the GA's evaluation budget (population "
                               "+ generations x (population - elites) plans per round, ranked by the same fitness): "
                               "random (random search) or init (the GA's initial population alone), or knapsack "
                               "(layer widths by dynamic programming over the cost table, values from channel "
                               "importance; one evaluation)", choices=METHODS),
    "connections": Flag("--no-connections", "neuron chromosome only (no connection genes)", negated=True),
    "reconstruct": Flag("--reconstruct", "recovery of each round's chosen model before fine-tuning, on "
                                         "--calib-images unlabeled training images: lsq (least-squares refit of "
                                         "every changed layer to the unpruned model's outputs), bias (bias "
                                         "compensation, then BN re-calibration) or none (BN re-calibration only)",
                        choices=RECONSTRUCT_METHODS),
    "calib_images": Flag("--calib-images", "unlabeled training images the reconstruction fits on (the first of the "
                                           "--recal-batches batches)", metavar="N"),
    "seed": Flag("--seed", "random seed"),
}

#: Fields no flag sets: settings of the Python API only (``target_kind`` follows from which target flag is given).
API_ONLY = frozenset({"target_kind", "importance", "init", "init_cut", "finetune_lr", "batch_size"})

#: Flags of ``evoprune prune`` (and the examples) that say where the model and data come from: no JobOptions field,
#: but settings all the same (a run's ``source`` in job.json records them; errors name them).
SOURCE_FLAGS = {"data": "--data", "arch": "--arch", "weights": "--weights", "model": "--model",
                "baseline_epochs": "--baseline-epochs", "input_shape": "--input-shape"}


@dataclass
class JobOptions(SearchConfig):
    """The search settings (:class:`~evoprune.evolve.config.SearchConfig`: rounds, generations, population, elites, p_c,
    p_mut, target, objective, connections, seed...) plus what the job does around the search."""

    finetune_epochs: float = field(default=1.0, metadata=flag(
        "--finetune-epochs", "fine-tuning epochs after each round, fractions allowed"))
    finetune_lr: float = 0.01
    kd: bool = field(default=True, metadata=flag(
        "--no-kd", "fine-tune without distillation from the unpruned teacher", negated=True))
    score_samples: int = field(default=1000, metadata=flag(
        "--score-samples", "images in the fitness subset (from the search half of val; the rest of that half "
                           "chooses each round's plan, see --final-pool)"))
    metric: str = field(default="top1", metadata=flag(
        "--metric", "fitness: top1, loss (cross-entropy) or kl (KL divergence to the unpruned model's outputs: no "
                    "labels used)", choices=("top1", "loss", "kl")))
    recal_batches: int = field(default=20, metadata=flag(
        "--recal-batches", "training batches for BN re-calibration before scoring; 0 turns it off"))
    batch_size: int = 64
    fitness_reconstruct: str = field(default="none", metadata=flag(
        "--fitness-reconstruct", "score every candidate plan after a cheap least-squares refit from the unpruned "
                                 "model's inputs (lsq; about 1 s more per plan on ResNet-18) or as it is (none)",
        choices=("none", "lsq")))
    device: str = field(default="cpu", metadata=flag("--device", "cpu or cuda"))
    normalize: str = field(default="data", metadata=flag(
        "--normalize", "input normalisation: data (the data's mean/std: CIFAR-10's, which the shipped models expect), "
                       "train (computed from the training images), or MEAN/STD per channel, e.g. "
                       "0.5,0.5,0.5/0.25,0.25,0.25", metavar="{data,train,MEAN/STD}"))
    executor: str | None = field(default=None, metadata=flag(
        "--executor", "where fitness calls run: serial, scoop (the default under python -m scoop), processes (a "
                      "process pool on this machine) or dask (a local cluster, or --scheduler's); default: scoop "
                      "under python -m scoop, else serial", choices=EXECUTORS))
    scheduler: str | None = field(default=None, metadata=flag(
        "--scheduler", "with --executor dask: the address of a running Dask scheduler (e.g. tcp://10.0.0.5:8786, as "
                       "dask-jobqueue prints it); default: a local cluster", metavar="ADDRESS"))
    workers: int | None = field(default=None, metadata=flag(
        "--workers", "worker processes of --executor processes or of a local dask cluster (default: the CPUs)",
        metavar="N", type=int))
    resume: bool = field(default=True, metadata=flag(
        "--no-resume", "start over: delete the checkpoint in --out instead of resuming it (a resumed run must use "
                       "the same settings; --device may change)", negated=True))

    def check(self):
        """Raise :class:`ConfigError` (its ``setting`` names the field; :data:`FLAGS` has its flag) for the first
        setting out of range."""
        if not is_int(self.score_samples) or self.score_samples < 10:
            raise ConfigError(f"must be an int >= 10, got {self.score_samples!r}", setting="score_samples")
        if self.metric not in ("top1", "loss", "kl"):
            raise ConfigError(f"must be top1, loss or kl, got {self.metric!r}", setting="metric")
        if not is_int(self.recal_batches) or self.recal_batches < 0:
            raise ConfigError(f"must be an int >= 0 (0 turns re-calibration off), got {self.recal_batches!r}",
                              setting="recal_batches")
        if self.recal_batches == 0 and self.reconstruct != "none":
            raise ConfigError(f"{self.reconstruct} needs calibration images from the training batches, but "
                              "--recal-batches is 0; give --recal-batches > 0, or --reconstruct none",
                              setting="reconstruct")
        if self.recal_batches == 0 and self.fitness_reconstruct != "none":
            raise ConfigError("needs calibration images from the training batches, but --recal-batches is 0",
                              setting="fitness_reconstruct")
        check_choice("fitness_reconstruct", self.fitness_reconstruct, ("none", "lsq"))
        if not is_number(self.finetune_epochs) or not self.finetune_epochs >= 0 or \
                math.isinf(self.finetune_epochs):
            raise ConfigError(f"must be a number >= 0 (0 turns fine-tuning off), got {self.finetune_epochs!r}",
                              setting="finetune_epochs")
        check_positive("finetune_lr", self.finetune_lr)
        check_int("batch_size", self.batch_size)
        check_device(self.device)
        parse_normalization(self.normalize)
        check_executor(self.executor, self.scheduler, self.workers)
        super().check()

    def search_config(self) -> SearchConfig:
        return SearchConfig(**{f.name: getattr(self, f.name) for f in fields(SearchConfig)})


def job_flags() -> dict[str, tuple[Flag, Any]]:
    """Every search/job flag as ``setting -> (flag, default)``, in ``--help`` order: :data:`SEARCH_FLAGS`, then the
    flags of :class:`JobOptions`' own fields."""
    defaults = {f.name: f.default for f in fields(JobOptions) if f.default is not MISSING}
    out = {name: (spec, defaults.get(name) if spec.default is _FIELD_DEFAULT else spec.default)
           for name, spec in SEARCH_FLAGS.items()}
    for f in fields(JobOptions):
        if "flag" in f.metadata:
            out[f.name] = (f.metadata["flag"], f.default)
    return out


#: The command-line flag of each setting (JobOptions fields, the latency target and the command line's model/data
#: sources). Settings without a flag (:data:`API_ONLY`: target_kind, finetune_lr, batch_size...) keep their Python
#: names in messages.
FLAGS: dict[str, str] = {**{name: spec.name for name, (spec, _) in job_flags().items()}, **SOURCE_FLAGS}
#: Boolean settings whose flag turns them off (``--no-kd`` sets ``kd=False``).
NEGATED = frozenset(name for name, (spec, _) in job_flags().items() if spec.negated)


def setting_flag(setting: str | None) -> str | None:
    """The command-line flag of a library setting (``p_c`` -> ``--p-c``, ``target`` -> ``--target-macs``,
    ``connections`` -> ``--no-connections``), or None for a setting no flag sets."""
    return FLAGS.get(setting) if setting else None


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The GA and job flags shared by the examples and ``evoprune prune``: ``--out`` and one flag per setting of
    :func:`job_flags`."""
    g = parser.add_argument_group("search (paper defaults: N=30, K=5, p_c=0.6, p_mut=0.6, T=5)")
    g.add_argument("--out", default="runs/evoprune", help="output directory (default: %(default)s)")
    for spec, default in job_flags().values():
        spec.add_to(g, default)


def options_from_args(args: argparse.Namespace) -> JobOptions:
    """The checked :class:`JobOptions` of parsed flags (:func:`add_search_arguments`); :class:`ConfigError` naming
    the setting otherwise. One target flag sets ``target`` and ``target_kind`` (:data:`TARGET_FLAGS`:
    ``--target-macs`` "macs", ``--target-params`` "params", ``--target-latency-ms`` "latency"; none given:
    ``--target-macs`` 0.5); two given are refused, naming them."""
    flags = job_flags()
    values = {name: spec.value(args) for name, (spec, _) in flags.items() if name not in TARGET_FLAGS}
    given = {name: SEARCH_FLAGS[name].value(args) for name in TARGET_FLAGS}
    given = {name: v for name, v in given.items() if v is not None}
    if len(given) > 1:
        names = [SEARCH_FLAGS[n].name for n in given]
        raise ConfigError(f"{' and '.join(names)} are both given, but a run has one target; give only one of "
                          f"{', '.join(SEARCH_FLAGS[n].name for n in TARGET_FLAGS)}")
    name, target = next(iter(given.items()), ("target", DEFAULT_TARGET))
    values.update(target=target, target_kind=TARGET_FLAGS[name])
    opts = JobOptions(**values)
    opts.check()
    return opts
