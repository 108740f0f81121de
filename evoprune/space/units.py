"""Connection units: the parts of a network whose removal leaves every shape valid, the connection chromosome's genes.

A residual block whose shortcut is the identity (its body is the connection), or a shape-preserving conv[-BN][-act]
run inside an ``nn.Sequential``. A cut unit becomes ``nn.Identity``: a block is a unit only if every call passes it
exactly one tensor and it returns one of the same shape, and only if its cut would not feed one tensor twice into a
concatenation (``cat([block(x), x])``). :func:`discover_units` finds them, from the channel groups of
:mod:`evoprune.space.discovery` and one recorded forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..netinfo import forward_hooks

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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



def discover_units(work, x, groups) -> list[ConnectionUnit]:
    """Residual blocks with an identity shortcut, and shape-preserving conv runs inside plain nn.Sequentials."""
    modules = dict(work.named_modules())
    member_of = {m: g.name for g in groups for m in g.members}
    consumer_of = {}
    for g in groups:
        for c in g.consumers:
            consumer_of.setdefault(c.module, g.name)
    units = []

    # residual units: out = f(x) + x (optionally followed by an activation), with input and output shapes equal.
    # A cut unit is replaced by nn.Identity, which takes one tensor and returns it: every call of the block must
    # take exactly one argument, a tensor, and return one tensor of its shape (a tree-aggregation block called as
    # block(x, shortcut), or with a list of children, is no unit; its channels may still be pruned).
    calls: dict = {}
    io: dict = {}  # module -> (grad_fn of its input, grad_fn of its output), first call

    def hook(module, args, kwargs, out):
        inp = args[0] if len(args) == 1 and not kwargs else None
        if isinstance(inp, torch.Tensor) and isinstance(out, torch.Tensor):
            io.setdefault(module, (inp.grad_fn, out.grad_fn))
        if module in blocks:
            calls.setdefault(module, []).append(
                isinstance(inp, torch.Tensor) and isinstance(out, torch.Tensor) and inp.shape == out.shape
                and inp.grad_fn is not None and _adds_identity(out.grad_fn, inp.grad_fn))

    blocks = {m for name, m in modules.items() if name and list(m.children()) and any(True for _ in m.parameters())
              and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))}
    with forward_hooks(work.modules(), hook, with_kwargs=True), torch.enable_grad():
        out = work(x)
    wnames = {m: n for n, m in modules.items()}
    for m in (m for m, ok in calls.items() if all(ok)):
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
    units = _drop_nested_duplicates(units)
    ends = {}  # unit -> (input grad_fn, output grad_fn) of the part a cut bypasses
    for u in units:
        first, last = modules[u.modules[0]], modules[u.modules[-1]]
        if first in io and last in io:
            ends[u.name] = (io[first][0], io[last][1])
    bad = _duplicating_cuts(out, ends) | {u.name for u in units if u.name not in ends}
    return [u for u in units if u.name not in bad]


def _duplicating_cuts(out, ends) -> set[str]:
    """The units whose cut would feed one tensor twice into a concatenation: a cut unit's output IS its input, so
    ``cat([block(x), x])`` (a DLA root joins a block and its input) becomes ``cat([x, x])``, which torch-pruning
    cannot map (one producer at two offsets): the pruned model would not run. Chains of cuts count too."""
    by_output: dict = {}
    for name, (fn_in, fn_out) in ends.items():
        if fn_in is not None and fn_out is not None:
            by_output.setdefault(fn_out, []).append((name, fn_in))
    bad, stack, seen = set(), [getattr(out, "grad_fn", None)], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        nexts = [n for n, _ in getattr(fn, "next_functions", ()) if n is not None]
        stack.extend(nexts)
        if fn.name() not in ("CatBackward0", "StackBackward0") or len(nexts) < 2:
            continue
        reach = []  # per input: {tensor it may become: the units to cut for it}
        for n in nexts:
            targets, frontier = {n: frozenset()}, [n]
            while frontier:
                f = frontier.pop()
                for name, fn_in in by_output.get(f, ()):
                    if fn_in not in targets:
                        targets[fn_in] = targets[f] | {name}
                        frontier.append(fn_in)
            reach.append(targets)
        for a in range(len(reach)):
            for b in range(a + 1, len(reach)):
                for f in reach[a].keys() & reach[b].keys():
                    bad |= reach[a][f] | reach[b][f]
    return bad


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
    except a sequential unit's own output group, whose consumers are then fed by the unit's input group. And a
    group whose first member (its root) the cut removes is then pruned through its first member left: that one's
    output channels must be the root's, one to one."""
    for g in groups:
        if all(unit.contains(m) for m in g.members):
            if g.name == dead_ok:
                continue
            if any(not unit.contains(c.module) for c in g.consumers):
                return False
        elif unit.contains(g.members[0]):
            heir = next(m for m in g.members if not unit.contains(m))
            maps = {(r, i) for p in g.producers if p.module == heir for r, i in zip(p.root_idxs, p.idxs)}
            if maps != {(r, r) for r in range(g.size)}:
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

