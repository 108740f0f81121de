"""evoprune: evolve which neurons and connections of a trained network to keep, then remove the rest for real.

The sub-packages are the pipeline, in order, each importing only the ones before it:

* :mod:`evoprune.space`: model -> :class:`PruningSpace` (what can be pruned, what it costs) -> :class:`PruningPlan`
  and the chromosome :class:`Layout` (neuron + connection chromosomes);
* :mod:`evoprune.prune`: :func:`apply_plan` (torch-pruning surgery), :func:`slice_plan`, :func:`reconstruct` (the
  closed-form layer refit), :func:`recalibrate_bn`;
* :mod:`evoprune.deploy`: :func:`export`, the runtimes and the :class:`LatencyTable`;
* :mod:`evoprune.evolve`: the DEAP operators, :func:`register` (the DEAP toolbox), :class:`Evaluator` (fitness),
  :func:`search` (:class:`Search`'s steps) and the engines (:func:`make_map`);
* :mod:`evoprune.cli`: the ``evoprune`` command, on top of all of it.

Beside them: :mod:`evoprune.data` (image folders and tensors), :mod:`evoprune.models`, :mod:`evoprune.train`,
:mod:`evoprune.netinfo` (facts and checks of a model), :mod:`evoprune.storage` (atomic files),
:mod:`evoprune.progress` and :mod:`evoprune.errors`. This module is the small public face.
"""
from . import _moved
from ._version import __version__
from .deploy import LatencyTable, LatencyWarning, export, model_card
from .errors import (CheckpointError, ConfigError, DataError, EngineError, EvaluationError, EvoPruneError, ModelError,
                     PlanError, UntraceableWarning)
from .evolve import (Budget, Evaluator, FitnessConfig, Search, SearchConfig, SearchResult, make_map, opened, register,
                     search, vary)
from .prune import ReconstructionWarning, TeacherGrams, apply_plan, masked, recalibrate_bn, reconstruct, slice_plan
from .space import ChannelGroup, ConnectionUnit, Layout, PruningPlan, PruningSpace, channel_importance

_moved.install()

__all__ = [
    "__version__", "EvoPruneError", "PlanError", "ConfigError", "DataError", "ModelError", "CheckpointError",
    "UntraceableWarning", "EvaluationError", "EngineError", "LatencyWarning",
    "PruningSpace", "ChannelGroup", "ConnectionUnit", "Layout", "PruningPlan", "apply_plan", "slice_plan", "masked",
    "export", "model_card", "register", "Budget", "search", "Search", "vary", "SearchConfig", "SearchResult",
    "Evaluator", "FitnessConfig", "reconstruct", "TeacherGrams", "ReconstructionWarning",
    "LatencyTable", "channel_importance", "recalibrate_bn", "make_map", "opened",
]


def __getattr__(name):
    moved = _moved.stand_in(name)  # from evoprune import toolbox: the 0.1 layout, deprecated
    if moved is not None:
        return moved
    if name == "Round":  # one round's working state: internal to Search (evoprune.evolve.round), no longer public here
        import warnings
        warnings.warn("evoprune.Round is internal and leaves the public API; import it from evoprune.evolve.round",
                      DeprecationWarning, stacklevel=2)
        from .evolve.round import Round
        return Round
    raise AttributeError(f"module 'evoprune' has no attribute {name!r}")
