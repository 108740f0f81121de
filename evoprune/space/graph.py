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
import math
import threading
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.overrides import TorchFunctionMode
from torch_pruning.dependency import index_mapping as _index_mapping

from .mismaps import TP_OPS, VIEWS, dependencies_of, misread_inputs, problem

_OPTYPE = tp.ops.OPTYPE
# the per-node updaters that torch-pruning's update_index_mapping dispatches to (module globals, looked up per call)
_UPDATERS = tuple(n for n in ("update_concat_index_mapping", "update_split_index_mapping",
                              "update_reshape_index_mapping", "update_unbind_index_mapping",
                              "update_expand_index_mapping", "update_slice_index_mapping")
                  if hasattr(_index_mapping, n))
_LOCK = threading.Lock()  # the patch is process-wide while it lasts: one build at a time


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
                    reason = problem(node, ops, failed)
                    if reason:
                        new[node] = reason
                for src, reason in misread_inputs(node, ops, axes):
                    if src not in bad:
                        new.setdefault(src, reason)
            if not new:
                break
            bad.update(new)
            for node in new:
                if isinstance(node.module, TP_OPS):  # a module of the model keeps its type (and its pruner)
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
    for dep in dependencies_of(node):
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
                    saved = tuple(getattr(g, "_saved_self_sym_sizes", ())) if g.name() in VIEWS else None
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


__all__ = ["build", "describe", "Traced", "Untraceable"]


