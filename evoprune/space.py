"""PruningSpace: what in a model can be pruned, discovered with torch-pruning's DependencyGraph.

* **Channel groups.** Channels that must be removed together (a conv and its BN, the convs joined by a residual add,
  the producers feeding a concatenation...) form ONE group and get ONE gene per channel. Groups are named after their
  root module (the first member in ``model.named_modules()`` order) and listed in network order. The classifier's
  outputs (anything coupled to the model output) are never pruned.
* **Connection units.** Parts of the network whose removal leaves every shape valid: a residual block whose shortcut
  is the identity (its body is the connection), or a shape-preserving conv[-BN][-act] run inside an ``nn.Sequential``.
  Each unit gets one connection gene; 0 cuts the connection and bypasses the unit.

The space holds names, sizes, index maps and the analytic cost model, never a module or a graph, so it pickles
small and can be shipped to SCOOP workers.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from .cost import Call, CostModel, Param, call_attrs, counter_kind
from . import trace
from .errors import ConfigError, ModelError, PlanError, UntraceableWarning
from .genome import Layout
from .plan import PruningPlan

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Consumer:
    """A module that reads a group's channels on its input: root channel ``root_idxs[k]`` is its input index
    ``idxs[k]`` along ``dim``. Masking zeroes those inputs."""

    module: str
    dim: int
    width: int
    root_idxs: tuple[int, ...]
    idxs: tuple[int, ...]


@dataclass(frozen=True)
class Producer:
    """A module whose OUTPUT channels belong to a group (a conv, linear or norm): root channel ``root_idxs[k]`` is
    its output index ``idxs[k]``. Slicing keeps those outputs."""

    module: str
    root_idxs: tuple[int, ...]
    idxs: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Coupled channels that are kept or removed together; one gene per channel."""

    name: str
    size: int
    members: tuple[str, ...]  # modules whose OUTPUT channels belong to the group, in network order
    consumers: tuple[Consumer, ...]
    producers: tuple[Producer, ...] = ()  # the members' output index maps (one per out-channel dependency)


@dataclass(frozen=True)
class ConnectionUnit:
    """A bypassable part of the network. ``kind`` is 'residual' (a block with an identity shortcut) or
    'sequential' (a shape-preserving conv run inside an nn.Sequential)."""

    name: str
    kind: str
    modules: tuple[str, ...]  # what is replaced by nn.Identity when the connection is cut
    in_group: str | None = None  # sequential units: the group feeding the unit (it feeds the consumers once cut)
    out_group: str | None = None  # sequential units: the group the unit produces (dead once cut)

    def contains(self, module_name: str) -> bool:
        return any(module_name == m or module_name.startswith(m + ".") for m in self.modules)


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
        self._unit_index = {u.name: i for i, u in enumerate(self.units)}

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
        names = {m: n for n, m in model.named_modules()}
        ignored_names = _ignored_names(model, ignored_layers, names)

        work = copy.deepcopy(model).eval()
        work_modules = dict(work.named_modules())
        reference = check_forward(work, example_inputs)
        try:  # ignored layers: get_all_groups only (else untraced); untraceable parts: see trace.py
            traced = trace.build(work, example_inputs)
        except Exception as exc:
            raise ModelError(f"torch-pruning cannot trace {type(model).__name__} on inputs of shape "
                             f"{tuple(example_inputs.shape)} ({type(exc).__name__}: {exc}). Try another input size, "
                             "or pass the offending layers in ignored_layers.") from None
        dg = traced.graph
        order = {n: i for i, n in enumerate(work_modules)}
        wnames = {m: n for n, m in work_modules.items()}
        output_producers = _output_producers(work, example_inputs)
        groups, roots, left_out = _discover_groups(traced, work, wnames, order, ignored_names, output_producers)
        if left_out:  # groups reaching ops torch-pruning cannot map: left out whole, never pruned
            message = trace.describe(type(model).__name__, *left_out)
            if not groups:
                raise ModelError(f"{message}. Nothing prunable remains for inputs of shape "
                                 f"{tuple(example_inputs.shape)}.")
            warnings.warn(f"{message}. The other {len(groups)} group(s) are pruned.", UntraceableWarning,
                          stacklevel=2)
        units = _discover_units(work, example_inputs, groups) if connections else []
        if not groups:
            raise ModelError(
                f"{type(model).__name__} has nothing prunable for inputs of shape {tuple(example_inputs.shape)}: "
                "no Conv/Linear output channels that are not coupled to the model output or ignored.")
        base_macs, base_params = tp.utils.count_ops_and_params(work, example_inputs)
        cost_model = _probe_cost(work, dg, [roots[g.name] for g in groups], example_inputs) if with_cost else None
        space = cls(groups, units, min_keep=min_keep, round_to=round_to, input_shape=tuple(example_inputs.shape),
                    model_name=type(model).__name__, base_macs=base_macs, base_params=base_params,
                    cost_model=cost_model)
        space._output_shape = tuple(reference.shape)
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

    @property
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

    # ------------------------------------------------------------------ genomes and plans
    def full_plan(self) -> PruningPlan:
        return PruningPlan({g.name: tuple(range(g.size)) for g in self.groups}, {u.name: True for u in self.units},
                           fingerprint=self.fingerprint)

    def check_genes(self, individual: Sequence[int]) -> None:
        """Raise :class:`PlanError` unless ``individual`` is a 0/1 sequence of this space's length."""
        try:
            n = len(individual)
        except TypeError:
            raise PlanError(f"an individual must be a sequence of 0/1 genes, got {type(individual).__name__}") \
                from None
        if n != len(self.layout):
            raise PlanError(f"individual has {n} genes, this space needs {len(self.layout)} "
                            f"({self.layout.n_neurons} neuron + {self.layout.n_connections} connection genes)")
        try:
            arr = np.asarray(individual)
            fine = arr.ndim == 1 and arr.dtype.kind in "biuf" and bool(np.isin(arr, (0, 1)).all())
        except Exception:  # ragged, nested or undecodable genes: find the culprit one by one
            fine = False
        if not fine:
            for i, v in enumerate(individual):
                if not isinstance(v, (bool, int, float, np.integer, np.floating, np.bool_)) or v not in (0, 1):
                    raise PlanError(f"gene {i} is {v!r}; genes must be 0 or 1")
    def decode(self, individual: Sequence[int]) -> PruningPlan:
        """The plan an individual encodes. Raises :class:`PlanError` for a malformed individual."""
        self.check_genes(individual)
        arr = np.asarray(individual, dtype=np.int8)
        groups = {}
        for i, g in enumerate(self.groups):
            kept = np.flatnonzero(arr[self.layout.group_slice(i)])
            if len(kept) < self.min_keep:
                raise PlanError(f"group {g.name!r} keeps {len(kept)} of {g.size} channels, below "
                                f"min_keep={self.min_keep}; repair the individual first")
            groups[g.name] = tuple(int(k) for k in kept)
        conns = {u.name: bool(arr[self.layout.n_neurons + j]) for j, u in enumerate(self.units)}
        return PruningPlan(groups, conns, fingerprint=self.fingerprint)

    def encode(self, plan: PruningPlan) -> list[int]:
        self.validate(plan)
        genes = self.layout.ones()
        for i, g in enumerate(self.groups):
            if g.name in plan.groups:
                sl = self.layout.group_slice(i)
                bits = [0] * g.size
                for k in plan.groups[g.name]:
                    bits[k] = 1
                genes[sl] = bits
        for j, u in enumerate(self.units):
            genes[self.layout.n_neurons + j] = int(plan.connections.get(u.name, True))
        return genes

    def validate(self, plan: PruningPlan) -> None:
        """Raise :class:`PlanError` naming the group and the problem, before torch-pruning ever sees the plan."""
        if not isinstance(plan, PruningPlan):
            raise PlanError(f"expected a PruningPlan, got {type(plan).__name__}")
        if plan.fingerprint is not None and plan.fingerprint != self.fingerprint:
            raise PlanError(f"plan was made for another pruning space (fingerprint {plan.fingerprint}, this space "
                            f"is {self.fingerprint}): rebuild the plan for this model and input shape")
        for name, idxs in plan.groups.items():
            g = self.group(name)
            bad = [i for i in idxs if not 0 <= i < g.size]
            if bad:
                raise PlanError(f"group {name!r}: index {bad[0]} is out of range [0, {g.size})")
            if len(set(idxs)) != len(idxs):
                dup = next(i for i in idxs if idxs.count(i) > 1)
                raise PlanError(f"group {name!r}: index {dup} is listed twice")
            if len(idxs) < self.min_keep:
                raise PlanError(f"group {name!r} keeps {len(idxs)} of {g.size} channels, below "
                                f"min_keep={self.min_keep}")
        for name in plan.connections:
            if name not in self._unit_index:
                cuttable = ", ".join(self._unit_index) or "none"
                raise PlanError(f"connection {name!r} is not a cuttable unit of this model; cuttable: {cuttable}")

    # ------------------------------------------------------------------ effective plan and cost
    def cut_units(self, plan: PruningPlan) -> tuple[ConnectionUnit, ...]:
        """The outermost units the plan cuts (a unit nested in a cut unit goes with it), in network order."""
        return _outermost([u for u in self.units if u.name in set(plan.cut)])

    def effective_kept(self, plan: PruningPlan) -> dict[str, tuple[int, ...]]:
        """Kept indices per group once cut sequential units hand their input channels on to their consumers."""
        kept = {g.name: tuple(plan.groups.get(g.name, range(g.size))) for g in self.groups}
        for u in self.cut_units(plan):  # network order, so chains of cuts resolve front to back
            if u.kind == "sequential":
                kept[u.out_group] = kept[u.in_group] if u.in_group is not None else \
                    tuple(range(self.group(u.out_group).size))
        return kept

    def alive(self, plan: PruningPlan):
        return self._alive(self.cut_units(plan))

    @staticmethod
    def _alive(cut):
        return lambda module: not any(u.contains(module) for u in cut)

    def cost(self, plan: PruningPlan, *, validate: bool = True) -> tuple[float, int]:
        """``(macs, params)`` of the model pruned by ``plan``, without running it. Equal to
        ``torch_pruning.utils.count_ops_and_params`` on ``apply_plan(model, plan, example_inputs)``."""
        if validate:
            self.validate(plan)
        counts = [len(plan.groups.get(g.name, range(g.size))) for g in self.groups]
        active = [plan.connections.get(u.name, True) for u in self.units]
        return self.cost_from_counts(counts, active)

    def cost_from_counts(self, counts: Sequence[int], active: Sequence[bool]) -> tuple[float, int]:
        """Cost from kept channel counts per group and active flags per unit: all the cost depends on."""
        removed, alive = self.removed_and_alive(counts, active)
        return self._cost.count(removed, alive)

    @property
    def cost_model(self) -> CostModel:
        """The analytic shape table (every counted call's input/output dims as a function of removed channels)."""
        self._need_cost()
        return self._cost

    def _need_cost(self) -> None:
        if self._cost is None:
            raise ModelError("this space was built with with_cost=False; rebuild it to compute costs")

    def removed_and_alive(self, counts: Sequence[int], active: Sequence[bool]):
        """``(removed channels per group, alive(module_name))`` for kept ``counts`` and active unit flags, after
        cut sequential units hand their input width on: what every shape of the pruned model depends on."""
        self._need_cost()
        counts = list(int(c) for c in counts)
        cut = _outermost([u for u, a in zip(self.units, active) if not a])
        for u in cut:
            if u.kind == "sequential":
                j = self._group_index[u.out_group]
                counts[j] = counts[self._group_index[u.in_group]] if u.in_group is not None else self.groups[j].size
        removed = np.array([g.size - c for g, c in zip(self.groups, counts)], dtype=np.int64)
        return removed, self._alive(cut)

    def cost_of(self, individual: Sequence[int]) -> tuple[float, int]:
        """Cost of an individual (only kept counts and cut units matter, so no plan is built)."""
        self.check_genes(individual)
        return self.cost_from_counts(self.layout.kept_counts(individual),
                                     self.layout.active_connections(individual))

    def widths(self, plan: PruningPlan) -> dict[str, int]:
        """Channels each group keeps (Table 5 of the paper), after connection cuts."""
        return {name: len(k) for name, k in self.effective_kept(plan).items()}


def _outermost(cut):
    """Cut units not nested inside another cut unit (a nested unit goes with its parent), in network order."""
    return tuple(u for u in cut if not any(o is not u and all(o.contains(m) for m in u.modules) for o in cut))


# ====================================================================== discovery helpers
def check_finite(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelError(f"{name} contains NaN or inf: the model cannot be scored or pruned meaningfully")


def check_forward(model: nn.Module, x: torch.Tensor, hint: str = "") -> torch.Tensor:
    """``model(x)`` without gradients, or a :class:`ModelError` that says the inputs do not fit (plus ``hint``)."""
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ModelError(f"{type(model).__name__} cannot run on inputs of shape {tuple(x.shape)}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{hint}") from None
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"{type(model).__name__} returns {type(out).__name__}; evoprune needs a model whose "
                         "forward returns one tensor (wrap it to select the logits)")
    return out


def _ignored_names(model, ignored_layers, names) -> list[str]:
    out = []
    for item in ignored_layers or ():
        if isinstance(item, type):
            raise ConfigError(f"ignored_layers takes module instances or qualified names, not types ({item.__name__}"
                              "): pass e.g. [m for m in model.modules() if isinstance(m, T)]")
        if isinstance(item, str):
            if item not in dict(model.named_modules()):
                raise ConfigError(f"ignored_layers: {item!r} is not a module of the model")
            out.append(item)
        elif isinstance(item, nn.Module) and item in names:
            out.append(names[item])
        else:
            raise ConfigError(f"ignored_layers: {item!r} is not a module of this model")
    return out


def _is_grouped_conv(m) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not (m.groups == m.out_channels)


def _output_producers(model, x) -> set[str]:
    """Names of the parametric modules whose output channels ARE the model output (the classifier)."""
    producers = {}
    names = {m: n for n, m in model.named_modules()}
    parametric = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                  nn.PReLU, nn.Embedding)

    def hook(module, args, out):
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            producers[out.grad_fn] = names[module]

    with forward_hooks((m for m in model.modules() if isinstance(m, parametric)), hook), torch.enable_grad():
        out = model(x)
    found, stack, seen = set(), [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in producers:
            found.add(producers[fn])
            continue
        stack.extend(n for n, _ in getattr(fn, "next_functions", ()) if n is not None)
    return found


def _discover_groups(traced, work, wnames, order, ignored_names, output_producers):
    """The usable groups in network order, their root modules, and ``(untraceable ops, layers)`` left out because
    their group reaches an op torch-pruning cannot map (None when there are none)."""
    dg = traced.graph
    groups, roots, hit, left_out = [], {}, {}, []
    ignored = [dict(work.named_modules())[n] for n in ignored_names]
    for grp in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
        usable, members, consumers, producers = True, [], [], []
        for item in grp:
            dep, idxs = item.dep, item.idxs
            target = dep.target
            mod = target.module
            if target.type == tp.ops.OPTYPE.OUTPUT or (
                    dg.is_out_channel_pruning_fn(dep.handler) and wnames.get(mod) in output_producers):
                usable = False  # coupled to the model output (the classifier)
            if not isinstance(mod, nn.Module) or mod not in wnames:
                continue
            if _is_grouped_conv(mod) or isinstance(mod, (nn.GroupNorm, nn.LayerNorm)):
                usable = False  # torch-pruning cannot remove arbitrary channels of these exactly
            name = wnames[mod]
            if dg.is_out_channel_pruning_fn(dep.handler):
                members.append(name)
                producers.append(Producer(name, tuple(int(i) for i in item.root_idxs), tuple(int(i) for i in idxs)))
            if dg.is_in_channel_pruning_fn(dep.handler) and isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
                dim = 1 if isinstance(mod, nn.modules.conv._ConvNd) else -1
                width = mod.in_channels if dim == 1 else mod.in_features
                consumers.append(Consumer(name, dim, width, tuple(int(i) for i in item.root_idxs),
                                          tuple(int(i) for i in idxs)))
        members = sorted(set(members), key=order.get)
        if not usable or not members:
            continue
        root = members[0]
        size = dg.get_out_channels(dict(work.named_modules())[root])
        if size is None or size < 2:
            continue
        touched = traced.touches(grp)
        if touched:
            hit.update((id(u.node), u) for u in touched)
            left_out.extend(m for m in members if isinstance(work.get_submodule(m), (nn.modules.conv._ConvNd,
                                                                                      nn.Linear)))
            continue
        groups.append(ChannelGroup(root, int(size), tuple(members), tuple(consumers), tuple(producers)))
        roots[root] = dict(work.named_modules())[root]
    groups.sort(key=lambda g: order[g.name])
    return groups, roots, (list(hit.values()), sorted(set(left_out), key=order.get)) if left_out else None


def _discover_units(work, x, groups) -> list[ConnectionUnit]:
    """Residual blocks with an identity shortcut, and shape-preserving conv runs inside plain nn.Sequentials."""
    modules = dict(work.named_modules())
    member_of = {m: g.name for g in groups for m in g.members}
    consumer_of = {}
    for g in groups:
        for c in g.consumers:
            consumer_of.setdefault(c.module, g.name)
    units = []

    # residual units: out = f(x) + x (optionally followed by an activation), with input and output shapes equal
    found = []

    def hook(module, args, out):
        inp = args[0] if args else None
        if isinstance(inp, torch.Tensor) and isinstance(out, torch.Tensor) and inp.shape == out.shape \
                and inp.grad_fn is not None and _adds_identity(out.grad_fn, inp.grad_fn):
            found.append(module)

    blocks = [m for name, m in modules.items() if name and list(m.children()) and any(True for _ in m.parameters())
              and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))]
    with forward_hooks(blocks, hook), torch.enable_grad():
        work(x)
    wnames = {m: n for n, m in modules.items()}
    for m in found:
        name = wnames[m]
        unit = ConnectionUnit(name, "residual", (name,))
        if _cut_is_clean(unit, groups):
            units.append(unit)

    # sequential units: [conv (groups=1, C->C, same spatial)] [norm] [activation] inside a plain nn.Sequential
    shapes = _io_shapes(work, x)
    for sname, seq in modules.items():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        keys = list(seq._modules)
        i = 0
        while i < len(keys):
            conv = seq._modules[keys[i]]
            if isinstance(conv, nn.Conv2d) and conv.groups == 1 and conv.in_channels == conv.out_channels:
                run = [keys[i]]
                j = i + 1
                if j < len(keys) and isinstance(seq._modules[keys[j]], _NORMS):
                    run.append(keys[j])
                    j += 1
                if j < len(keys) and isinstance(seq._modules[keys[j]], _ACTIVATIONS):
                    run.append(keys[j])
                    j += 1
                full = [f"{sname}.{k}" if sname else k for k in run]
                first, last = modules[full[0]], modules[full[-1]]
                if first in shapes and last in shapes and shapes[first][0] == shapes[last][1]:
                    out_group = member_of.get(full[0])
                    if out_group is not None and _seq_cut_is_clean(full, out_group, groups, modules):
                        unit = ConnectionUnit(full[0], "sequential", tuple(full), consumer_of.get(full[0]), out_group)
                        if _cut_is_clean(unit, groups, dead_ok=out_group):
                            units.append(unit)
                i = j
            else:
                i += 1
    order = {n: k for k, n in enumerate(modules)}
    units.sort(key=lambda u: order[u.modules[0]])
    return _drop_nested_duplicates(units)


def _drop_nested_duplicates(units):
    seen, out = set(), []
    for u in units:
        if u.name not in seen:
            seen.add(u.name)
            out.append(u)
    return out


def _adds_identity(grad_fn, input_fn, depth: int = 3) -> bool:
    """Whether ``grad_fn`` is (an elementwise op of) an add one of whose operands is the unit's input itself."""
    fn = grad_fn
    for _ in range(depth):
        if fn is None:
            return False
        if "Add" in fn.name():
            return any(nxt is input_fn for nxt, _ in fn.next_functions)
        nexts = [n for n, _ in fn.next_functions if n is not None]
        if len(nexts) != 1:
            return False
        fn = nexts[0]
    return False


def _seq_cut_is_clean(run, out_group, groups, modules) -> bool:
    """Once a conv run is bypassed, its output group must vanish whole, and the consumers it fed must be plain
    (groups=1) convs or linears, which the input group can absorb."""
    g = next(g for g in groups if g.name == out_group)
    inside = lambda name: any(name == r or name.startswith(r + ".") for r in run)  # noqa: E731
    if not all(inside(m) for m in g.members):
        return False
    for c in g.consumers:
        mod = modules[c.module]
        if not inside(c.module) and isinstance(mod, nn.modules.conv._ConvNd) and mod.groups != 1:
            return False
    return True


def _cut_is_clean(unit, groups, dead_ok=None) -> bool:
    """A unit may be cut only if no group whose producers all sit inside it still feeds something outside it,
    except a sequential unit's own output group, whose consumers are then fed by the unit's input group."""
    for g in groups:
        if all(unit.contains(m) for m in g.members):
            if g.name == dead_ok:
                continue
            if any(not unit.contains(c.module) for c in g.consumers):
                return False
    return True


def _io_shapes(model, x):
    shapes = {}

    def hook(module, args, out):
        if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            shapes.setdefault(module, (tuple(args[0].shape), tuple(out.shape)))

    with forward_hooks(model.modules(), hook), torch.no_grad():
        model(x)
    return shapes


@contextlib.contextmanager
def forward_hooks(modules, hook):
    """Register ``hook`` as a forward hook on every module for the duration of the block."""
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ====================================================================== cost probe
def _record(model, x):
    """Every parameter shape and every op-counter call (module, kind, input shape, output shape)."""
    calls = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, args, out):
        kind = counter_kind(module)
        inp = args[0] if args else None
        if isinstance(out, (tuple, list)):
            out = out[0]
        calls.append((names[module], kind, tuple(inp.shape) if isinstance(inp, torch.Tensor) else (),
                      tuple(out.shape) if isinstance(out, torch.Tensor) else (), module))

    with forward_hooks((m for m in model.modules() if counter_kind(m) is not None), hook), torch.no_grad():
        model(x)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return calls, params


def _flatten_shapes(calls, params):
    dims = []
    for _, _, ins, outs, _ in calls:
        dims.extend(ins)
        dims.extend(outs)
    for _, shape in params:
        dims.extend(shape)
    return np.array(dims, dtype=np.int64)


def _probe_cost(work, dg, roots, x) -> CostModel:
    """Remove one channel of each group in turn on ``work`` (a private copy) and read off the shape changes."""
    calls, params = _record(work, x)
    base = _flatten_shapes(calls, params)
    flops_by_module = tp.utils.count_ops_and_params(work, x, layer_wise=True)[2]
    names = {m: n for n, m in work.named_modules()}
    flops = {names[m]: v for m, v in flops_by_module.items() if m in names}
    coeff = np.zeros((len(base), len(roots)), dtype=np.int64)
    prev = base
    for j, root in enumerate(roots):
        pruner = dg.get_pruner_of_module(root)
        group = dg.get_pruning_group(root, pruner.prune_out_channels, [0])
        group.prune()
        now_calls, now_params = _record(work, x)
        now = _flatten_shapes(now_calls, now_params)
        if len(now) != len(prev):
            raise ModelError(f"pruning group {names[root]!r} changed the model's call structure; cannot cost it")
        coeff[:, j] = prev - now
        prev = now
    k = 0
    call_objs = []
    for name, kind, ins, outs, module in calls:
        in_rows = list(range(k, k + len(ins)))
        k += len(ins)
        out_rows = list(range(k, k + len(outs)))
        k += len(outs)
        n_calls = sum(1 for c in calls if c[0] == name)
        call_objs.append(Call(name, kind, in_rows, out_rows, call_attrs(module, kind),
                              int(flops.get(name) or 0) // max(n_calls, 1)))
    param_objs = []
    for name, shape in params:
        param_objs.append(Param(name, list(range(k, k + len(shape)))))
        k += len(shape)
    try:
        return CostModel(base, coeff, call_objs, param_objs, batch=int(x.shape[0]))
    except ValueError as exc:
        raise ModelError(str(exc)) from None


__all__ = ["PruningSpace", "ChannelGroup", "ConnectionUnit", "Consumer", "check_finite", "check_forward"]
