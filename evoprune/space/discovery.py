"""Discovery: trace a model with torch-pruning's DependencyGraph and find what can be pruned in it.

* **Channel groups.** Channels that must be removed together (a conv and its BN, the convs joined by a residual add,
  the producers feeding a concatenation...) form ONE group. Groups are named after their root module (the first
  member in ``model.named_modules()`` order) and listed in network order. The classifier's outputs (anything coupled
  to the model output) are never pruned. Each group records, per producer and per consumer, which tensor index each
  of its channels is (:class:`Producer`, :class:`Consumer`): masking and slicing read those maps.
* **Connection units.** Parts of the network whose removal leaves every shape valid: a residual block whose shortcut
  is the identity (its body is the connection), or a shape-preserving conv[-BN][-act] run inside an ``nn.Sequential``.
  A cut unit becomes ``nn.Identity``: a block is a unit only if every call passes it exactly one tensor and it returns
  one of the same shape (a tree-aggregation block called as ``block(x, shortcut)`` is not), and only if its cut
  would not feed one tensor twice into a concatenation (``cat([block(x), x])``).
* **Root indices.** A group's genes are its first member's output channels. torch-pruning roots its groups where it
  happens to start, which may see each of them twice (a ghost module's ``cat([x, cheap(x)])``): such a group is
  re-rooted; one whose channels come back into it at another offset is left out, with the untraceable ones.

:func:`discover` returns them with the traced private copy of the model;
:class:`evoprune.space.pruning_space.PruningSpace` keeps only the names, sizes and index maps.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import ConfigError, ModelError, UntraceableWarning
from ..netinfo import check_forward, forward_hooks
from . import graph
from .units import ConnectionUnit, discover_units


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
    try:  # ignored layers: get_all_groups only (else untraced); untraceable parts: see graph.py
        traced = graph.build(work, example_inputs)
    except Exception as exc:
        raise ModelError(f"torch-pruning cannot trace {type(model).__name__} on inputs of shape "
                         f"{tuple(example_inputs.shape)} ({type(exc).__name__}: {exc}). Try another input size, "
                         "or pass the offending layers in ignored_layers.") from None
    order = {n: i for i, n in enumerate(work_modules)}
    wnames = {m: n for n, m in work_modules.items()}
    output_producers = _output_producers(work, example_inputs)
    groups, roots, left_out = _discover_groups(traced, work, wnames, order, ignored_names, output_producers)
    if left_out:  # groups reaching ops torch-pruning cannot map: left out whole, never pruned
        untraceable, layers, tangled = left_out
        parts = [graph.describe(type(model).__name__, untraceable, layers)] if layers else []
        if tangled:
            parts.append(f"torch-pruning cannot keep the channels of some groups of {type(model).__name__} apart "
                         "(a channel comes back into its own group at another offset, e.g. a ghost module's concat "
                         f"added to its own input); the output channels of the {len(tangled)} layer(s) coupled to "
                         f"them are left out of the pruning space and keep their width: {', '.join(tangled)}")
        message = "; ".join(parts)
        if not groups:
            raise ModelError(f"{message}. Nothing prunable remains for inputs of shape "
                             f"{tuple(example_inputs.shape)}.")
        warnings.warn(f"{message}. The other {len(groups)} group(s) are pruned.", UntraceableWarning, stacklevel=3)
    if not groups:
        raise ModelError(
            f"{type(model).__name__} has nothing prunable for inputs of shape {tuple(example_inputs.shape)}: "
            "no Conv/Linear output channels that are not coupled to the model output or ignored.")
    units = discover_units(work, example_inputs, groups) if connections else []
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


def _read_group(grp, dg, wnames, output_producers):
    """``(usable, members, consumers, producers)`` of one torch-pruning group, its index maps keyed by the
    group's root indices."""
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
    return usable, members, consumers, producers


def _tangled(root, size, producers, consumers) -> bool:
    """Whether a group's index maps are not keyed by ``root``'s own output channels one to one: a root index out of
    ``range(size)``, the root's map not the identity, or one channel of a member reached from two root indices
    (pruning one gene would then take another channel's genes with it)."""
    for maps in (producers, consumers):
        reached: dict = {}
        for m in maps:
            for r, i in zip(m.root_idxs, m.idxs):
                if not 0 <= r < size or reached.setdefault((m.module, i), r) != r:
                    return True
    root_map = {(r, i) for p in producers if p.module == root for r, i in zip(p.root_idxs, p.idxs)}
    return root_map != {(r, r) for r in range(size)}


def _independent(dg, grp, root, size, producers, consumers, wnames) -> bool:
    """Whether removing one root channel removes exactly what the group's maps say it does. Where channels pass a
    concat or a split they may come back into their own group at another offset (a ghost module's
    ``cat([x, cheap(x)])`` added to a residual stream): torch-pruning then prunes root channels 0 and 4 together
    when asked for 0, and keeps only one root index per channel in the group it reports, so the maps alone cannot
    tell. Single-channel groups can: those of the first and the last root channel."""
    kinds = (tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT)
    if not any(item.dep.target.type in kinds or item.dep.source.type in kinds for item in grp):
        return True
    want: dict = {}
    for kind, maps in (("out", producers), ("in", consumers)):
        for m in maps:
            for r, i in zip(m.root_idxs, m.idxs):
                want.setdefault(r, set()).add((kind, m.module, i))
    pruner = dg.get_pruner_of_module(root)
    for r in (0, size - 1):
        got = set()
        for item in dg.get_pruning_group(root, pruner.prune_out_channels, [r]):
            mod, handler = item.dep.target.module, item.dep.handler
            if not isinstance(mod, nn.Module) or mod not in wnames:
                continue
            if dg.is_out_channel_pruning_fn(handler):
                got.update(("out", wnames[mod], int(i)) for i in item.idxs)
            if dg.is_in_channel_pruning_fn(handler) and isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
                got.update(("in", wnames[mod], int(i)) for i in item.idxs)
        if got != want.get(r, set()):
            return False
    return True


def _discover_groups(traced, work, wnames, order, ignored_names, output_producers):
    """The usable groups in network order, their root modules, and ``(untraceable ops, layers, tangled layers)``
    left out because their group reaches an op torch-pruning cannot map, or maps their channels onto the root's
    several times (None when there are none)."""
    dg = traced.graph
    modules = dict(work.named_modules())
    groups, roots, hit, left_out, tangled = [], {}, {}, [], []
    ignored = [modules[n] for n in ignored_names]
    convs_linears = (nn.modules.conv._ConvNd, nn.Linear)
    for grp in dg.get_all_groups(ignored_layers=ignored, root_module_types=convs_linears):
        usable, members, consumers, producers = _read_group(grp, dg, wnames, output_producers)
        members = sorted(set(members), key=order.get)
        if not usable or not members:
            continue
        root = members[0]
        size = dg.get_out_channels(modules[root])
        if size is None or size < 2:
            continue
        touched = traced.touches(grp)
        if touched:
            hit.update((id(u.node), u) for u in touched)
            left_out.extend(m for m in members if isinstance(modules[m], convs_linears))
            continue
        if _tangled(root, size, producers, consumers):
            # torch-pruning roots a group at the first layer it traces (from the output), whose channels may be
            # several of the group's own (a ghost module's depthwise conv after its concat of x and cheap(x)):
            # re-root it at the group's first member, whose output channels name its genes
            pruner = dg.get_pruner_of_module(modules[root])
            grp = dg.get_pruning_group(modules[root], pruner.prune_out_channels, list(range(size)))
            usable, again, consumers, producers = _read_group(grp, dg, wnames, output_producers)
            if not usable or sorted(set(again), key=order.get) != members or traced.touches(grp) or \
                    _tangled(root, size, producers, consumers):
                tangled.extend(m for m in members if isinstance(modules[m], convs_linears))
                continue
        if not _independent(dg, grp, modules[root], size, producers, consumers, wnames):
            tangled.extend(m for m in members if isinstance(modules[m], convs_linears))
            continue
        groups.append(ChannelGroup(root, int(size), tuple(members), tuple(consumers), tuple(producers)))
        roots[root] = modules[root]
    groups.sort(key=lambda g: order[g.name])
    if not (left_out or tangled):
        return groups, roots, None
    return groups, roots, (list(hit.values()), sorted(set(left_out), key=order.get),
                           sorted(set(tangled), key=order.get))
