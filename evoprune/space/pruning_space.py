"""PruningSpace: what in one model can be pruned, for one input shape, and what a plan of it costs.

The space is built once per model (:meth:`PruningSpace.from_model`): :mod:`evoprune.space.discovery` traces the model
and finds its channel groups and connection units, :func:`evoprune.space.cost.probe` measures the analytic cost model.
The space then answers, without running a model: which genes an individual has (:mod:`evoprune.space.genome` encodes and
decodes them), whether a plan is valid (:func:`evoprune.space.plan.validate`), which units a plan cuts and which
channels survive them, and the MACs/params of any plan or individual.

It holds names, sizes, index maps and the cost tables, never a module or a graph, so it pickles small and can be
shipped to SCOOP workers.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import ConfigError, ModelError, PlanError
from ..netinfo import check_finite
from . import genome
from .cost import CostModel, probe
from .discovery import ChannelGroup, ConnectionUnit, Consumer, Producer, discover
from .genome import Layout
from .plan import PruningPlan, validate


@dataclass(frozen=True, eq=False)
class ResolvedPlan:
    """A plan of one space, resolved once (:meth:`PruningSpace.resolve`): ``units``, the outermost connection units
    it cuts, in network order; ``kept``, the channels each group keeps once cut sequential units hand their input
    channels on; :meth:`alive`, whether a module is still in the network."""

    plan: PruningPlan
    space: "PruningSpace"
    units: tuple[ConnectionUnit, ...]
    kept: dict[str, tuple[int, ...]]

    def alive(self, module: str) -> bool:
        return not any(u.contains(module) for u in self.units)

    @property
    def widths(self) -> dict[str, int]:
        return {name: len(k) for name, k in self.kept.items()}

    @property
    def cut_modules(self) -> tuple[str, ...]:
        """The modules the cut units replace by ``nn.Identity``, in network order."""
        return tuple(name for u in self.units for name in u.modules)


class PruningSpace:
    """What can be pruned in one model, for one input shape. Build it with :meth:`from_model`."""

    def __init__(self, groups, units, *, min_keep, round_to, input_shape, model_name, base_macs, base_params,
                 cost_model: CostModel | None):
        self.groups: tuple[ChannelGroup, ...] = tuple(groups)
        self.units: tuple[ConnectionUnit, ...] = tuple(units)
        self.min_keep = int(min_keep)
        self.round_to = round_to
        self.input_shape = tuple(input_shape)
        self.model_name = model_name
        self.base_macs = base_macs
        self.base_params = base_params
        self._cost = cost_model
        self.layout = Layout(tuple(g.name for g in self.groups), tuple(g.size for g in self.groups),
                             tuple(u.name for u in self.units))
        self._group_index = {g.name: i for i, g in enumerate(self.groups)}
        # nested[j, i]: unit i contains unit j (a unit nested in a cut unit goes with it)
        self._nested = np.array([[i != j and all(o.contains(m) for m in u.modules) for i, o in enumerate(self.units)]
                                 for j, u in enumerate(self.units)], bool).reshape(len(self.units), len(self.units))
        self._handover = [(j, self._group_index[u.out_group],
                           None if u.in_group is None else self._group_index[u.in_group])
                          for j, u in enumerate(self.units) if u.kind == "sequential"]
        self._sizes = np.array([g.size for g in self.groups], dtype=np.int64)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, example_inputs: torch.Tensor, *, ignored_layers: Iterable = None,
                   round_to: int | None = None, min_keep: int = 1, connections: bool = True,
                   with_cost: bool = True) -> "PruningSpace":
        """Discover the channel groups and connection units of ``model`` for inputs like ``example_inputs``.

        ``ignored_layers`` takes module instances of ``model`` or their qualified names (not types): their output
        channels are never pruned. ``round_to`` makes the repair operator keep multiples of it. ``min_keep`` is the
        fewest channels any group may keep. ``with_cost=False`` skips the cost probe (a space for validation only).
        """
        if not isinstance(model, nn.Module):
            raise ModelError(f"from_model expects an nn.Module, got {type(model).__name__}")
        if not isinstance(example_inputs, torch.Tensor):
            raise ModelError("example_inputs must be a tensor batch, e.g. torch.randn(1, 3, 32, 32)")
        if not isinstance(min_keep, int) or min_keep < 1:
            raise ConfigError(f"min_keep must be an int >= 1, got {min_keep!r}")
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise ConfigError(f"round_to must be None or an int >= 1, got {round_to!r}")
        check_finite(model)
        found = discover(model, example_inputs, ignored_layers=ignored_layers, connections=connections)
        base_macs, base_params = tp.utils.count_ops_and_params(found.work, example_inputs)
        cost_model = probe(found.work, found.graph, [found.roots[g.name] for g in found.groups], example_inputs,
                           found.units) if with_cost else None
        space = cls(found.groups, found.units, min_keep=min_keep, round_to=round_to,
                    input_shape=tuple(example_inputs.shape), model_name=type(model).__name__, base_macs=base_macs,
                    base_params=base_params, cost_model=cost_model)
        if cost_model is not None:  # the probe is exact by construction; check the unpruned point anyway
            macs, params = space.cost(space.full_plan())
            if (macs, params) != (base_macs, base_params):
                raise ModelError(f"analytic cost {macs, params} disagrees with torch-pruning's "
                                 f"{base_macs, base_params}; please report this model")
        return space

    # ------------------------------------------------------------------ basic facts
    def __repr__(self):
        return (f"PruningSpace({self.model_name}, {len(self.groups)} groups / {self.layout.n_neurons} channel genes, "
                f"{len(self.units)} connection units, MACs {self.base_macs:,.0f}, params {self.base_params:,})")

    def group(self, name: str) -> ChannelGroup:
        try:
            return self.groups[self._group_index[name]]
        except KeyError:
            raise PlanError(f"unknown group {name!r}; groups are: {', '.join(self._group_index)}") from None

    @functools.cached_property
    def fingerprint(self) -> str:
        """A hash of the space's structure: a checkpoint or plan made for another model/space is detected."""
        desc = {
            "model": self.model_name, "input": list(self.input_shape), "min_keep": self.min_keep,
            "groups": [[g.name, g.size] for g in self.groups], "units": [u.name for u in self.units],
            "macs": float(self.base_macs), "params": int(self.base_params),
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.layout)

    # ------------------------------------------------------------------ genomes and plans (see genome.py, plan.py)
    def full_plan(self) -> PruningPlan:
        return PruningPlan({g.name: tuple(range(g.size)) for g in self.groups}, {u.name: True for u in self.units},
                           fingerprint=self.fingerprint)

    def check_genes(self, individual: Sequence[int]) -> None:
        """Raise :class:`PlanError` unless ``individual`` is a 0/1 sequence of this space's length."""
        genome.check_genes(self, individual)

    def decode(self, individual: Sequence[int]) -> PruningPlan:
        """The plan an individual encodes. Raises :class:`PlanError` for a malformed individual."""
        return genome.decode(self, individual)

    def encode(self, plan: PruningPlan) -> list[int]:
        """The individual of a valid plan."""
        return genome.encode(self, plan)

    def validate(self, plan: PruningPlan) -> None:
        """Raise :class:`PlanError` naming the group and the problem, before torch-pruning ever sees the plan."""
        validate(self, plan.plan if isinstance(plan, ResolvedPlan) else plan)

    # ------------------------------------------------------------------ effective plan
    def resolve(self, plan: "PruningPlan | ResolvedPlan") -> "ResolvedPlan":
        """The plan as this space resolves it, worked out once: the units it cuts, the channels each group keeps
        once cut sequential units hand their input channels on, and which modules stay in the network. The
        surgery, the slicing, the masking and the refit take the result in place of the plan, so that a plan on the
        fitness path is resolved once. (Not validated: :meth:`validate` first.)"""
        if isinstance(plan, ResolvedPlan):
            return plan if plan.space is self else self.resolve(plan.plan)
        cut = set(plan.cut)
        flags = np.array([u.name in cut for u in self.units], bool)
        units = tuple(u for u, o in zip(self.units, self._outermost(flags)) if o)
        kept = {g.name: tuple(plan.groups.get(g.name, range(g.size))) for g in self.groups}
        for u in units:  # network order, so chains of cuts resolve front to back
            if u.kind == "sequential":
                kept[u.out_group] = kept[u.in_group] if u.in_group is not None else \
                    tuple(range(self.group(u.out_group).size))
        return ResolvedPlan(plan, self, units, kept)

    def _outermost(self, cut: np.ndarray) -> np.ndarray:
        """Of the units flagged in ``cut``, those not nested inside another cut unit."""
        if not cut.any():
            return cut
        return cut & ~self._nested[:, cut].any(axis=1)

    def cut_units(self, plan) -> tuple[ConnectionUnit, ...]:
        """The outermost units the plan cuts (a unit nested in a cut unit goes with it), in network order."""
        return self.resolve(plan).units

    def effective_kept(self, plan) -> dict[str, tuple[int, ...]]:
        """Kept indices per group once cut sequential units hand their input channels on to their consumers."""
        return self.resolve(plan).kept

    def alive(self, plan):
        """``alive(module_name)``: whether a module is still in the network once the plan's cut units are bypassed."""
        return self.resolve(plan).alive

    def widths(self, plan) -> dict[str, int]:
        """Channels each group keeps (Table 5 of the paper), after connection cuts."""
        return self.resolve(plan).widths

    # ------------------------------------------------------------------ cost
    @property
    def cost_model(self) -> CostModel:
        """The analytic shape table (every counted call's input/output dims as a function of removed channels)."""
        if self._cost is None:
            raise ModelError("this space was built with with_cost=False; rebuild it to compute costs")
        return self._cost

    def cost(self, plan, *, validate: bool = True) -> tuple[float, int]:
        """``(macs, params)`` of the model pruned by ``plan`` (or one :meth:`resolve` returned), without running it.
        Equal to ``torch_pruning.utils.count_ops_and_params`` on ``apply_plan(model, plan, example_inputs)``."""
        plan = plan.plan if isinstance(plan, ResolvedPlan) else plan
        if validate:
            self.validate(plan)
        counts = [len(plan.groups.get(g.name, range(g.size))) for g in self.groups]
        active = [plan.connections.get(u.name, True) for u in self.units]
        return self.cost_from_counts(counts, active)

    def cost_from_counts(self, counts: Sequence[int], active: Sequence[bool]) -> tuple[float, int]:
        """Cost from kept channel counts per group and active flags per unit: all the cost depends on."""
        removed, cut = self.removed_and_cut(counts, active)
        return self.cost_model.count(removed, cut)

    def removed_and_cut(self, counts: Sequence[int], active: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
        """``(removed channels per group, cut flags per unit)`` for kept ``counts`` and ``active`` unit flags, after
        cut sequential units hand their input width on: what every shape of the pruned model depends on (see
        :meth:`evoprune.space.cost.CostModel.count` and :meth:`~evoprune.space.cost.CostModel.alive_calls`)."""
        self.cost_model  # raises for a space built with with_cost=False
        counts = np.array(counts, dtype=np.int64)
        cut = ~np.asarray(active, dtype=bool).reshape(len(self.units))
        if self._handover and cut.any():
            outer = self._outermost(cut)
            for j, out_group, in_group in self._handover:  # network order: chains of cuts resolve front to back
                if outer[j]:
                    counts[out_group] = counts[in_group] if in_group is not None else self._sizes[out_group]
        return self._sizes - counts, cut

    def cost_of(self, individual: Sequence[int]) -> tuple[float, int]:
        """Cost of an individual (only kept counts and cut units matter, so no plan is built)."""
        genes = genome.check_genes(self, individual)
        return self.cost_from_counts(self.layout.kept_counts(genes), self.layout.active_connections(genes))


__all__ = ["PruningSpace", "ResolvedPlan", "ChannelGroup", "ConnectionUnit", "Consumer", "Producer"]
