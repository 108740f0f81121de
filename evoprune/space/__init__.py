"""The space: what in a trained model can be pruned, and what a choice of it costs.

The first step of the pipeline, and the floor every later one stands on. torch-pruning's DependencyGraph is built
here (:mod:`.graph`, which also finds where torch-pruning would mis-map channels, :mod:`.mismaps`), read into
channel groups and connection units (:mod:`.discovery`, :mod:`.units`), and wrapped as a :class:`PruningSpace`
(:mod:`.pruning_space`) with analytic costs (:mod:`.cost`), channel importance (:mod:`.importance`), the plan a
choice becomes (:mod:`.plan`) and the chromosome layout of an individual (:mod:`.genome`). Named ``space`` after the
object the rest of evoprune works on: everything downstream takes a space and a plan of it. Nothing here changes a
model.
"""
from .cost import CostModel
from .discovery import ChannelGroup, ConnectionUnit, Discovery, discover
from .genome import Layout, decode, encode
from .graph import Traced, Untraceable
from .importance import channel_importance
from .plan import PruningPlan, validate
from .pruning_space import PruningSpace

__all__ = ["PruningSpace", "ChannelGroup", "ConnectionUnit", "Discovery", "discover", "CostModel", "Layout",
           "decode", "encode", "PruningPlan", "validate", "channel_importance", "Traced", "Untraceable"]
