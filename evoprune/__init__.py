"""evoprune: evolve which neurons and connections of a trained network to keep, then remove the rest for real.

model -> :class:`PruningSpace` (what can be pruned) -> individuals (neuron + connection chromosomes) -> DEAP operators
-> :func:`register` (DEAP toolbox) -> :class:`Evaluator` (fitness) -> :func:`search` -> :func:`apply_plan` (torch-pruning surgery) -> :func:`export`.
:mod:`evoprune.latency` (on :mod:`evoprune.runtime`) measures and predicts latency on the deployment runtime, for
``target_kind="latency"``.
"""
from ._version import __version__
from .errors import (CheckpointError, ConfigError, DataError, EvoPruneError, ModelError, PlanError,
                     UntraceableWarning)
from .evolve import SearchConfig, SearchResult, search
from .export import export, model_card
from .fitness import Evaluator, FitnessConfig
from .genome import Layout
from .plan import PruningPlan
from .space import ChannelGroup, ConnectionUnit, PruningSpace
from .surgery import apply_plan, masked
from .toolbox import register

__all__ = [
    "__version__", "EvoPruneError", "PlanError", "ConfigError", "DataError", "ModelError", "CheckpointError",
    "UntraceableWarning",
    "PruningSpace", "ChannelGroup", "ConnectionUnit", "Layout", "PruningPlan", "apply_plan", "masked", "export",
    "model_card", "register", "search", "SearchConfig", "SearchResult", "Evaluator", "FitnessConfig",
]
