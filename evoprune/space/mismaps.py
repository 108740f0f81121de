"""Is a node of torch-pruning's graph mapped faithfully? The checks behind :func:`evoprune.space.graph.build`.

torch-pruning carries channel indices across reshapes, splits, concats and slices with index mappings it infers
from the graph, and on torch 2.14 it gets some of them wrong without a word (``chunk`` gets offsets for the wrong
sizes, most views that move channels pass them straight through). Each check here compares a node's mappings with
what its op really does to the channel axis, from the shapes recorded during torch-pruning's own forward pass
(:func:`problem`), and finds the inputs a node reads along an axis other than the channels (:func:`misread_inputs`).
"""
from __future__ import annotations

import itertools
import math

import torch.nn as nn
import torch_pruning as tp
from torch_pruning import _helpers
from torch_pruning.dependency import index_mapping as _index_mapping

_OPTYPE = tp.ops.OPTYPE
_FLATTEN = getattr(_index_mapping, "_FlattenIndexMapping", None)  # None: trust only reshapes we can check
_H = _helpers._HybridIndex  # torch-pruning's (index, root index) pair, what index mappings take and return
#: autograd ops of a view, whose saved input size tells what it reshaped
VIEWS = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0")


def problem(node, ops, failed) -> str | None:
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


def misread_inputs(node, ops, memo) -> list:
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


def dependencies_of(node):
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
        if _FLATTEN is not None and all(getattr(m, "_stride", None) == 1 for d in dependencies_of(node)
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
TP_OPS = tuple(getattr(tp.ops, n) for n in ("_ElementWiseOp", "_ConcatOp", "_SplitOp", "_ReshapeOp", "_SliceOp",
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
    if not isinstance(mod, TP_OPS):  # a module of the model (or an unwrapped parameter)
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
            elif name in VIEWS:
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
