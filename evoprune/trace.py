"""Build torch-pruning's DependencyGraph for a model it can only partly map, and say which parts it cannot.

torch-pruning traces a model through autograd and carries channel indices across reshapes, splits and concats with
index mappings inferred from the graph. Where that inference is wrong, it either raises (ShuffleNetV2's
``channel_shuffle``, view to 5-D / transpose / view back, divides by zero) and the whole build fails, or it is wrong
without a word (the other shuffles of the same model pass channels straight through; ``chunk`` gets offsets for the
wrong sizes), and pruning a group through it corrupts the model silently. :func:`build` wraps the build so that

* a failure in the index mapping of one node is caught and recorded instead of aborting the build (a patch of
  torch-pruning's per-node updaters, for the duration of the build only);
* every reshape, split, concat and slice node is checked against what it really does to the channel axis, from the
  shapes recorded during torch-pruning's own forward pass: its mappings must send each channel where the op sends
  it. A reshape that only merges or splits the leading axes of a channels-last tensor (what ``nn.Linear`` does to
  an (N, H, W, C) input: (N, H, W, C) -> (N*H*W, C)) keeps every channel where it is, and passes; a slice that
  drops channels (``out[:, :k]``) cannot follow pruning (its bounds are fixed), and does not;
* the nodes that failed or are wrong come back as :class:`Untraceable` and are made inert, so that the graph stays
  usable (``get_pruning_group`` re-runs the index mapping every time, which would raise again).

A group that reaches an untraceable node (:meth:`Traced.touches`) must be left alone, whole. Unbinds and expands are
not checked (no CNN family here uses them on channels); a failure in their mapping is still caught.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import threading
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.overrides import TorchFunctionMode
from torch_pruning import _helpers
from torch_pruning.dependency import index_mapping as _index_mapping

_OPTYPE = tp.ops.OPTYPE
# the per-node updaters that torch-pruning's update_index_mapping dispatches to (module globals, looked up per call)
_UPDATERS = tuple(n for n in ("update_concat_index_mapping", "update_split_index_mapping",
                              "update_reshape_index_mapping", "update_unbind_index_mapping",
                              "update_expand_index_mapping", "update_slice_index_mapping")
                  if hasattr(_index_mapping, n))
_FLATTEN = getattr(_index_mapping, "_FlattenIndexMapping", None)  # None: trust only reshapes we can check
_LOCK = threading.Lock()  # the patch is process-wide while it lasts: one build at a time
_H = _helpers._HybridIndex  # torch-pruning's (index, root index) pair, what index mappings take and return


@dataclass(frozen=True)
class Untraceable:
    """A node of the graph whose channel mapping torch-pruning cannot be trusted with."""

    node: object  # the torch-pruning Node
    op: str  # its autograd op, e.g. 'ViewBackward0'
    where: str  # qualified name of the module whose forward ran it ('' for the model's own forward)
    reason: str


@dataclass
class Traced:
    graph: tp.DependencyGraph
    untraceable: tuple[Untraceable, ...]

    def touches(self, group) -> list[Untraceable]:
        """The untraceable nodes a torch-pruning group reaches (none: the group is mapped faithfully)."""
        bad = {id(u.node): u for u in self.untraceable}
        hit = {}
        for item in group:
            for node in (item.dep.source, item.dep.target):
                if id(node) in bad:
                    hit[id(node)] = bad[id(node)]
        return list(hit.values())


def build(model: nn.Module, example_inputs: torch.Tensor) -> Traced:
    """``tp.DependencyGraph().build_dependency(model, example_inputs)`` that survives untraceable parts.

    Raises whatever torch-pruning raises outside the index mapping (tracing itself, shape inference)."""
    failed: dict = {}  # node -> error, filled by the patched updaters
    bad: dict = {}  # node -> reason
    axes: dict = {}  # node -> the axis of its output's channels (see _channel_axis)
    with _LOCK, torch.enable_grad(), _recording(model) as ops, _tolerant_index_mapping(failed):
        dg = tp.DependencyGraph().build_dependency(model, example_inputs, verbose=False)
        # Making a node inert changes what its neighbours infer, and get_pruning_group re-runs the whole mapping:
        # re-run and re-check until nothing new turns up, so that the graph handed out is settled.
        for _ in range(len(dg.module2node) + 1):
            new = {}
            for node in dg.module2node.values():
                if node not in bad:
                    reason = _problem(node, ops, failed)
                    if reason:
                        new[node] = reason
                for src, reason in _misread_inputs(node, ops, axes):
                    if src not in bad:
                        new.setdefault(src, reason)
            if not new:
                break
            bad.update(new)
            for node in new:
                if isinstance(node.module, _TP_OPS):  # a module of the model keeps its type (and its pruner)
                    _make_inert(node)
            _index_mapping.update_index_mapping(dg)
    found = [Untraceable(node, _op_name(node), ops.get(node.grad_fn, (None, None, ""))[2], reason)
             for node, reason in bad.items()]
    order = {name: i for i, name in enumerate(dict(model.named_modules()))}
    return Traced(dg, tuple(sorted(found, key=lambda u: order.get(u.where, -1))))


def describe(model_name: str, untraceable: Iterable[Untraceable], layers: Iterable[str]) -> str:
    """One sentence naming the untraceable ops (by the module that runs them) and the layers left out."""
    untraceable, layers = list(untraceable), list(layers)
    ops = sorted({u.op for u in untraceable})
    where = list(dict.fromkeys(u.where or f"{model_name}.forward" for u in untraceable))
    return (f"torch-pruning cannot map channels through {len(untraceable)} op(s) ({', '.join(ops)}) in "
            f"{', '.join(where)} of {model_name} (e.g. a channel shuffle, or a reshape/split that moves channels); "
            f"the output channels of the {len(layers)} layer(s) coupled to them are left out of the pruning space "
            f"and keep their width: {', '.join(layers)}")


# ====================================================================== the build
def _op_name(node) -> str:
    fn = node.grad_fn
    return fn.name() if hasattr(fn, "name") else type(node.module).__name__


def _make_inert(node) -> None:
    """Take a node out of torch-pruning's index-mapping dispatch (which switches on ``node.type``; its pruner is
    looked up from its module and does not change) and clear the mappings on its edges, which may raise when
    called (a split with too few offsets does). Every group that crosses one of these edges reaches the node and
    is left out, so what they map no longer matters; neighbours re-install their own on the next mapping run."""
    node.type = _OPTYPE.ELEMENTWISE
    for dep in _edges(node):
        dep.index_mapping = [None] * len(dep.index_mapping)


@contextlib.contextmanager
def _tolerant_index_mapping(failed: dict):
    """Patch torch-pruning's per-node index-mapping updaters so that one that raises is recorded in ``failed``
    (node -> error) instead of aborting the build. Why a patch: build_dependency runs update_index_mapping as its
    last step, over all nodes in one loop, and one ZeroDivisionError (ShuffleNetV2) ends the build with nothing to
    show; there is no hook to skip a node. Only for the duration of the build, under _LOCK; restored on exit."""
    saved = {name: getattr(_index_mapping, name) for name in _UPDATERS}

    def tolerant(fn):
        def update(graph, node):
            try:
                return fn(graph, node)
            except Exception as exc:  # any failure: the node is untraceable, the build goes on
                failed.setdefault(node, f"{type(exc).__name__}: {exc}")
        return update

    try:
        for name, fn in saved.items():
            setattr(_index_mapping, name, tolerant(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(_index_mapping, name, fn)


_LINEAR = torch.nn.functional.linear
_VIEWS = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")


class _OpShapes(TorchFunctionMode):
    """For every op whose result autograd tracks: its grad_fn -> (input shapes, output shapes, running module).

    ``F.linear`` on an input of more than two dims flattens it inside the call (one aten view, (N, H, W, C) ->
    (N*H*W, C), that no torch function runs): that view is recorded too, from its saved input size, so that the
    reshape check sees it."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack
        self.ops = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = _tensors(out)
        fn = outs[0].grad_fn if outs else None
        if fn is not None and fn not in self.ops:
            where = self.stack[-1] if self.stack else ""
            self.ops[fn] = ([tuple(t.shape) for t in _tensors(args)], [tuple(t.shape) for t in outs], where)
            if func is _LINEAR and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 2:
                self._linear_views(fn, args[0], outs[0], where)
        return out

    def _linear_views(self, fn, x, y, where, depth: int = 4) -> None:
        """Record the views inside ``F.linear(x) -> y``: the flattening of x, and (when the bias is added after
        the matmul: a non-contiguous x) the unflattening of the matmul's output, marked ``("linear-out", C)``."""
        shape, out = tuple(x.shape), tuple(y.shape)
        flat, inner = (math.prod(shape[:-1]), shape[-1]), (math.prod(out[:-1]), out[-1])
        frontier, seen = [fn], set()
        for _ in range(depth):
            nxt = []
            for f in frontier:
                for g, _ in getattr(f, "next_functions", ()):
                    if g is None or g is x.grad_fn or g in seen:
                        continue
                    seen.add(g)
                    saved = tuple(getattr(g, "_saved_self_sym_sizes", ())) if g.name() in _VIEWS else None
                    if saved == shape:
                        self.ops.setdefault(g, ([shape], [flat], where))
                        continue
                    if saved == inner and g is not fn:
                        self.ops.setdefault(g, ([inner], [out], where, ("linear-out", shape[-1])))
                    nxt.append(g)
            frontier = nxt


def _tensors(x) -> list:
    """The tensors in x, one level of tuples/lists deep, in order (torch.cat takes a list, chunk returns a tuple)."""
    out = []
    for item in x if isinstance(x, (tuple, list)) else [x]:
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, (tuple, list)):
            out.extend(t for t in item if isinstance(t, torch.Tensor))
    return out


@contextlib.contextmanager
def _recording(model: nn.Module):
    """Record the shapes of every op run inside the block, and the module whose forward ran it."""
    stack: list[str] = []

    def enter(module, args, _names={m: n for n, m in model.named_modules()}):
        stack.append(_names[module])

    def leave(module, args, out):  # returns None: a forward hook's return value would replace the output
        stack.pop()

    modules = list(model.modules())
    handles = [m.register_forward_pre_hook(enter) for m in modules] + [m.register_forward_hook(leave)
                                                                        for m in modules]
    mode = _OpShapes(stack)
    try:
        with mode:
            yield mode.ops
    finally:
        for h in handles:
            h.remove()


# ====================================================================== is a node mapped faithfully?
def _problem(node, ops, failed) -> str | None:
    """None if torch-pruning maps this node's channels as the op moves them, else why not."""
    if node in failed:
        return f"torch-pruning's index mapping failed here ({failed[node]})"
    check = {_OPTYPE.RESHAPE: _reshape_problem, _OPTYPE.SPLIT: _split_problem, _OPTYPE.CONCAT: _concat_problem,
             _OPTYPE.SLICE: _slice_problem}
    if node.type not in check:
        return None
    recorded = ops.get(node.grad_fn)
    if recorded is None or not recorded[0] or not recorded[1]:
        return "its shapes were not recorded"
    if any(len(s) < 2 for s in recorded[0] + recorded[1]):
        return "it works on tensors without a channel axis"
    try:
        if node.type in (_OPTYPE.RESHAPE, _OPTYPE.SLICE):
            return check[node.type](node, recorded[0], recorded[1], ops)
        return check[node.type](node, recorded[0], recorded[1])
    except Exception as exc:  # a mapping that raises when called (e.g. too few split offsets)
        return f"its index mapping raises {type(exc).__name__}: {exc}"


def _misread_inputs(node, ops, memo) -> list:
    """``[(input node, reason)]``: the inputs of a conv or norm (which reads its channels on axis 1; a plain
    LayerNorm on the last) whose channels are known to lie on another axis. An nn.Linear applied to an NCHW
    tensor mixes its last axis, not its channels: the features torch-pruning couples to the next conv's input
    channels are not the ones the conv reads. The input is what cannot be mapped; the module's own outputs can."""
    mod = node.module
    if isinstance(mod, _AXIS1):
        want = lambda nd: 1  # noqa: E731
    elif type(mod) is nn.LayerNorm and len(mod.normalized_shape) == 1:
        want = lambda nd: nd - 1  # noqa: E731
    else:
        return []
    out = []
    for src in node.inputs:
        found = _channel_axis(src, ops, memo)
        if found is not None and found[0] != want(found[1]):
            out.append((src, f"it feeds {type(mod).__name__} channels on axis {found[0]} of a {found[1]}-D tensor, "
                             f"where it reads them on axis {want(found[1])}"))
    return out


def _edges(node):
    """Every dependency from or to ``node``."""
    deps = list(node.dependencies)
    for n in node.inputs + node.outputs:
        deps.extend(d for d in n.dependencies if d.target is node)
    return deps


def _maps(src, dst, slot, n, f, edges=()) -> bool:
    """Whether every dependency src -> dst sends index i (of n) to the indices ``f(i)`` with its index mapping
    ``slot``. torch-pruning's mappings are affine pieces (stride, offset, range filter), so indices at both ends
    and around each of ``edges`` show a wrong stride or offset: probing all of them costs too much for a
    classifier's 25,088 flattened features, and apply_plan rebuilds the graph for every plan it prunes."""
    idx = sorted({i for e in (0, n, *edges) for i in (e - 2, e - 1, e, e + 1) if 0 <= i < n})
    probe = [_H(i, i) for i in idx]
    expected = {_H(k, i) for i in idx for k in f(i)}
    for d in src.dependencies:
        if d.target is dst:
            mapping = d.index_mapping[slot]
            if set(probe if mapping is None else mapping(probe)) != expected:
                return False
    return True


def _same(i):
    return [i]


def _identity_maps(node, c) -> bool:
    """Whether torch-pruning maps all c channels straight through ``node``, both ways, on every edge."""
    return all(_maps(src, node, 0, c, _same) and _maps(node, src, 0, c, _same) for src in node.inputs) and \
        all(_maps(node, dst, 0, c, _same) and _maps(dst, node, 0, c, _same) for dst in node.outputs)


def _reshape_problem(node, ins, outs, ops=None) -> str | None:
    inp, out = ins[0], outs[0]
    recorded = ops.get(node.grad_fn) if ops is not None else None
    if recorded is not None and len(recorded) > 3 and recorded[3][0] == "linear-out":
        # inside F.linear, after the matmul that torch-pruning passes the Linear's INPUT channels through (as if
        # elementwise): what it maps here are those C channels, checked where F.linear flattens its input
        if _identity_maps(node, recorded[3][1]):
            return None
        return "torch-pruning maps the channels of an nn.Linear through its own matmul"
    axis = _input_axis(node, ops) if ops is not None else None
    if axis is not None and axis[0] == axis[1] - 1 == len(inp) - 1 > 1:  # channels last (and not (N, C))
        if inp[-1] == out[-1] and math.prod(inp[:-1]) == math.prod(out[:-1]):
            # only the leading axes are merged or split: the last one stays, and so do its channels
            if _identity_maps(node, inp[-1]):
                return None
            return f"it keeps the channels-last channels ({inp} -> {out}) but torch-pruning maps them as if it did not"
        return f"it reshapes {inp} to {out} with the channels on the last axis, which moves them"
    if axis is not None and axis[0] != 1:
        return f"it reshapes {inp} to {out} with the channels on axis {axis[0]}, which torch-pruning cannot map"
    if inp[0] != out[0]:
        return f"it reshapes {inp} to {out} across the batch axis"
    if inp[:2] == out[:2]:  # the channel axis is untouched: channel c stays channel c, nothing may be mapped
        if _FLATTEN is not None and all(getattr(m, "_stride", None) == 1 for d in _edges(node)
                                        for m in d.index_mapping if isinstance(m, _FLATTEN)):
            return None
        return f"it keeps the channels ({inp} -> {out}) but torch-pruning maps them as if it did not"
    c, s = inp[1], math.prod(inp[2:])
    if len(out) == 2 and out[1] == c * s:  # NCHW flatten: channel i becomes features [i * s, (i + 1) * s)
        if all(_maps(src, node, 0, c, lambda i: range(i * s, (i + 1) * s)) and
               _maps(node, src, 0, c * s, lambda k: [k // s], (s, c * s - s)) for src in node.inputs) and \
                all(_maps(node, dst, 0, c * s, _same) and _maps(dst, node, 0, c * s, _same) for dst in node.outputs):
            return None
        return f"torch-pruning maps the flatten {inp} -> {out} with the wrong stride"
    return f"it moves channels ({inp} -> {out}), which torch-pruning cannot map"


# channel axis of a node's output, found by walking the graph back to a module that fixes it
_AXIS1 = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
          nn.GroupNorm)
_TP_OPS = tuple(getattr(tp.ops, n) for n in ("_ElementWiseOp", "_ConcatOp", "_SplitOp", "_ReshapeOp", "_SliceOp",
                                              "_UnbindOp", "_ExpandOp") if hasattr(tp.ops, n))
_BROADCASTING = ("AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0")


def _input_axis(node, ops):
    """``(axis, ndim)`` of the channels reaching ``node``, if every input tells the same; None if unknown."""
    memo: dict = {}
    axes = {_channel_axis(src, ops, memo) for src in node.inputs}
    return axes.pop() if len(axes) == 1 else None


def _channel_axis(node, ops, memo, depth: int = 0):
    """``(axis, ndim)`` of the channels in ``node``'s output tensor, or None where it cannot be told. Modules fix it
    (convs and batch norms: 1; ``nn.Linear`` and a plain ``nn.LayerNorm`` over one axis: the last); permutes and
    transposes move it; elementwise ops keep it (broadcasting prepends axes), reductions drop the axes before it;
    a reshape that keeps a channels-last axis keeps it."""
    if node in memo:
        return memo[node]
    memo[node] = None  # cycles and deep graphs: unknown
    recorded = ops.get(node.grad_fn)
    if recorded is None or not recorded[1] or depth > 64:
        return None
    nd = len(recorded[1][0])
    mod, fn = node.module, node.grad_fn
    name = fn.name() if hasattr(fn, "name") else ""
    found = None
    if not isinstance(mod, _TP_OPS):  # a module of the model (or an unwrapped parameter)
        if isinstance(mod, _AXIS1):
            found = (1, nd)
        elif type(mod) is nn.Linear or (type(mod) is nn.LayerNorm and len(mod.normalized_shape) == 1):
            found = (nd - 1, nd)
    else:
        axes = {a for a in (_channel_axis(src, ops, memo, depth + 1) for src in node.inputs) if a is not None}
        if len(axes) == 1:
            (axis, ind), = axes
            if name == "PermuteBackward0":
                dims = [d % nd for d in fn._saved_dims]
                found = (dims.index(axis), nd) if ind == nd else None
            elif name == "TransposeBackward0":
                d0, d1 = fn._saved_dim0 % nd, fn._saved_dim1 % nd
                found = ({d0: d1, d1: d0}.get(axis, axis), nd) if ind == nd else None
            elif name in _VIEWS:
                inp, out = recorded[0][0], recorded[1][0]
                keeps_last = inp[-1] == out[-1] and math.prod(inp[:-1]) == math.prod(out[:-1])
                if keeps_last and axis == ind - 1 == len(inp) - 1:
                    found = (nd - 1, nd)  # channels last, leading axes merged or split
                elif ind == len(inp) and inp[:axis + 1] == out[:axis + 1]:
                    found = (axis, nd)  # the axes up to the channels' stay (NCHW -> NC(HW))
            elif nd == ind or (nd > ind and name in _BROADCASTING):
                found = (axis + nd - ind, nd)  # elementwise (broadcasting prepends axes)
            elif nd < ind and hasattr(fn, "_saved_dim") and not getattr(fn, "_saved_keepdim", True):
                dims = fn._saved_dim if isinstance(fn._saved_dim, tuple) else (fn._saved_dim,)
                dims = {d % ind for d in dims}
                found = None if axis in dims else (axis - sum(d < axis for d in dims), nd)
    memo[node] = found
    return found


def _slice_problem(node, ins, outs, ops=None) -> str | None:
    """A slice that drops channels (``out[:, :k]``) has fixed bounds: once channels before its end are pruned it
    keeps channels it used to drop. Slices of other axes (crops) keep every channel."""
    inp, out = ins[0], outs[0]
    fn = node.grad_fn
    dim = getattr(fn, "_saved_dim", None)
    if dim is None or len(inp) != len(out):
        return f"it slices {inp} to {out} along an axis that was not recorded"
    dim %= len(inp)
    axis = _input_axis(node, ops) if ops is not None else None
    if axis is not None and axis[1] == len(inp):
        channel = axis[0]
    else:  # torch-pruning's channel axis for slices
        channel = {4: 1, 3: 2, 2: 1}.get(len(inp))
    if inp[dim] == out[dim] or (channel is not None and dim != channel):
        return None
    return f"it slices channels {inp} -> {out} with fixed bounds, which cannot follow pruning"


def _offsets(sizes):
    return [0, *itertools.accumulate(sizes)][:-1]


def _split_problem(node, ins, outs) -> str | None:
    inp = ins[0]
    c = inp[1]
    rest = lambda s: s[:1] + s[2:]  # noqa: E731
    sizes = [o[1] for o in outs]
    if len(outs) > 1 and all(n == c for n in sizes):  # split along another axis: no channel moves
        offsets = [0] * len(outs)
    elif sum(sizes) == c and all(rest(o) == rest(inp) for o in outs):
        offsets = _offsets(sizes)
    else:
        return f"it splits {inp} into {outs}, which torch-pruning cannot map"
    for dst in node.outputs:
        parts = {nr for fn, nr in getattr(dst.grad_fn, "next_functions", ()) if fn is node.grad_fn}
        if len(parts) != 1:
            return "one consumer takes several of its parts"
        p = parts.pop()
        off, size = offsets[p], sizes[p]
        if not (_maps(node, dst, 0, c, lambda i: [i - off] if off <= i < off + size else [], (off, off + size)) and
                _maps(dst, node, 0, size, lambda k: [k + off])):
            return f"torch-pruning gives part {p} of the split {inp} -> {outs} the wrong channels"
    return None


def _concat_problem(node, ins, outs) -> str | None:
    out = outs[0]
    c = out[1]
    sizes = [i[1] for i in ins]
    if len(ins) > 1 and all(n == c for n in sizes):  # concatenated along another axis
        offsets = [0] * len(ins)
    elif sum(sizes) == c:
        offsets = _offsets(sizes)
    else:
        return f"it concatenates {ins} into {out}, which torch-pruning cannot map"
    inputs = [fn for fn, _ in getattr(node.grad_fn, "next_functions", ())]
    if len(inputs) != len(ins):
        return "its inputs do not match its recorded arguments"
    for src in node.inputs:
        at = [j for j, fn in enumerate(inputs) if fn is src.grad_fn]
        if len(at) != 1:
            return "one producer feeds it several times"
        j = at[0]
        off, size = offsets[j], sizes[j]
        if not (_maps(src, node, 1, size, lambda k: [k + off]) and
                _maps(node, src, 1, c, lambda i: [i - off] if off <= i < off + size else [], (off, off + size))):
            return f"torch-pruning gives input {j} of the concat {ins} -> {out} the wrong channels"
    return None


__all__ = ["build", "describe", "Traced", "Untraceable"]


@contextlib.contextmanager
def forward_hooks(modules, hook, *, with_kwargs: bool = False):
    """Register ``hook`` as a forward hook on every module for the duration of the block (``with_kwargs``: it is
    called as ``hook(module, args, kwargs, output)``)."""
    handles = [m.register_forward_hook(hook, with_kwargs=with_kwargs) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()

