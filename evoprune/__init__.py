"""evoprune: evolve which neurons and connections of a trained network to keep, then remove the rest for real.

model -> :class:`PruningSpace` (what can be pruned: :mod:`~evoprune.discover`, :mod:`~evoprune.cost`) -> individuals
(:mod:`~evoprune.genome`: neuron + connection chromosomes) -> DEAP operators (:mod:`~evoprune.operators`) ->
:func:`register` (the DEAP toolbox) -> :class:`Evaluator` (fitness) -> :func:`search` (:class:`Search`'s steps) ->
:func:`apply_plan` (torch-pruning surgery) -> :func:`reconstruct` (the closed-form layer refit) -> :func:`export`.
:mod:`evoprune.latency` (on :mod:`evoprune.runtime`) measures and predicts latency on the deployment runtime, for
``target_kind="latency"``.
"""
from ._version import __version__
from .bn import recalibrate_bn
from .engines import make_map, opened
from .errors import (CheckpointError, ConfigError, DataError, EngineError, EvaluationError, EvoPruneError, ModelError,
                     PlanError, UntraceableWarning)
from .evolve import Search, SearchConfig, SearchResult, search, vary
from .export import export, model_card
from .fitness import Evaluator, FitnessConfig
from .genome import Layout
from .plan import PruningPlan
from .grams import TeacherGrams
from .importance import channel_importance
from .latency import LatencyTable
from .refit import ReconstructionWarning, reconstruct
from .runtime import LatencyWarning
from .space import ChannelGroup, ConnectionUnit, PruningSpace
from .slicing import slice_plan
from .surgery import apply_plan, masked
from .toolbox import register

__all__ = [
    "__version__", "EvoPruneError", "PlanError", "ConfigError", "DataError", "ModelError", "CheckpointError",
    "UntraceableWarning", "EvaluationError", "EngineError", "LatencyWarning",
    "PruningSpace", "ChannelGroup", "ConnectionUnit", "Layout", "PruningPlan", "apply_plan", "slice_plan", "masked",
    "export", "model_card", "register", "search", "Search", "vary", "SearchConfig", "SearchResult",
    "Evaluator", "FitnessConfig", "reconstruct", "TeacherGrams", "ReconstructionWarning",
    "LatencyTable", "channel_importance", "recalibrate_bn", "make_map", "opened",
]


def __getattr__(name):
    if name == "Round":  # one round's working state: internal to Search (evoprune.round), no longer public here
        import warnings
        warnings.warn("evoprune.Round is internal and leaves the public API; import it from evoprune.round",
                      DeprecationWarning, stacklevel=2)
        from .round import Round
        return Round
    raise AttributeError(f"module 'evoprune' has no attribute {name!r}")
