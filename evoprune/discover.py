"""Discovery: trace a model with torch-pruning's DependencyGraph and find what can be pruned in it.

* **Channel groups.** Channels that must be removed together (a conv and its BN, the convs joined by a residual add,
  the producers feeding a concatenation...) form ONE group. Groups are named after their root module (the first
  member in ``model.named_modules()`` order) and listed in network order. The classifier's outputs (anything coupled
  to the model output) are never pruned. Each group records, per producer and per consumer, which tensor index each
  of its channels is (:class:`Producer`, :class:`Consumer`): masking and slicing read those maps.
* **Connection units.** Parts of the network whose removal leaves every shape valid: a residual block whose shortcut
  is the identity (its body is the connection), or a shape-preserving conv[-BN][-act] run inside an ``nn.Sequential``.

:func:`discover` returns them with the traced private copy of the model; :class:`evoprune.space.PruningSpace` keeps
only the names, sizes and index maps.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch_pruning as tp

from . import trace
from .errors import ConfigError, ModelError, UntraceableWarning
from .models import check_forward
from .trace import forward_hooks

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


@dataclass
class Discovery:
    """What :func:`discover` found: groups and units in network order, the private traced copy of the model
    (``work``), its DependencyGraph and the root module of every group (what the cost probe prunes)."""

    groups: list[ChannelGroup]
    units: list[ConnectionUnit]
    work: nn.Module
    graph: object
    roots: dict[str, nn.Module]


def discover(model: nn.Module, example_inputs: torch.Tensor, *, ignored_layers: Iterable = None,
             connections: bool = True) -> Discovery:
    """Trace a private copy of ``model`` on ``example_inputs`` and find its channel groups and connection units.
    Groups that reach ops torch-pruning cannot map are left out whole, with an :class:`UntraceableWarning`; a
    :class:`ModelError` says why when nothing prunable remains."""
    names = {m: n for n, m in model.named_modules()}
    ignored_names = _ignored_names(model, ignored_layers, names)
    work = copy.deepcopy(model).eval()
    work_modules = dict(work.named_modules())
    check_forward(work, example_inputs)
    try:  # ignored layers: get_all_groups only (else untraced); untraceable parts: see trace.py
        traced = trace.build(work, example_inputs)
    except Exception as exc:
        raise ModelError(f"torch-pruning cannot trace {type(model).__name__} on inputs of shape "
                         f"{tuple(example_inputs.shape)} ({type(exc).__name__}: {exc}). Try another input size, "
                         "or pass the offending layers in ignored_layers.") from None
    order = {n: i for i, n in enumerate(work_modules)}
    wnames = {m: n for n, m in work_modules.items()}
    output_producers = _output_producers(work, example_inputs)
    groups, roots, left_out = _discover_groups(traced, work, wnames, order, ignored_names, output_producers)
    if left_out:  # groups reaching ops torch-pruning cannot map: left out whole, never pruned
        message = trace.describe(type(model).__name__, *left_out)
        if not groups:
            raise ModelError(f"{message}. Nothing prunable remains for inputs of shape "
                             f"{tuple(example_inputs.shape)}.")
        warnings.warn(f"{message}. The other {len(groups)} group(s) are pruned.", UntraceableWarning, stacklevel=3)
    if not groups:
        raise ModelError(
            f"{type(model).__name__} has nothing prunable for inputs of shape {tuple(example_inputs.shape)}: "
            "no Conv/Linear output channels that are not coupled to the model output or ignored.")
    units = _discover_units(work, example_inputs, groups) if connections else []
    return Discovery(groups, units, work, traced.graph, roots)


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

