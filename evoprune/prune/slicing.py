"""Physical pruning by slicing tensors: :func:`slice_plan`, the fast twin of :func:`evoprune.prune.surgery.apply_plan`.

``apply_plan`` re-traces a torch-pruning DependencyGraph on a copy of the model for every plan. The pruning space
already holds, for every channel group, the output index map of each producer and the input index map of each
consumer, so the smaller model can be cut out of the original tensors directly: no graph, no forward pass. The
result is the one ``apply_plan`` returns (same modules, names, shapes, values and attributes); the family matrix in
``tests/test_slicing.py`` checks it against ``apply_plan``. ``apply_plan`` stays the path for exported models.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn as nn

from ..errors import ModelError, PlanError
from ..space.plan import PruningPlan
from ..space.pruning_space import PruningSpace, ResolvedPlan
from .copying import own_tensors, structure_copy, swap
from .surgery import apply_plan

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # exact types: no ConvTranspose, no subclasses
_LINEARS = (nn.Linear,)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
SLICEABLE = _CONVS + _LINEARS + _NORMS
# The modules whose parameters torch-pruning prunes with a pruner of its own (isinstance, as torch-pruning tests
# them). The space records each one a group reaches (as a producer, or a consumer for convs and linears), so a
# removed channel reaching one slice_plan does not handle shows up as a drop on it and sends the plan to apply_plan.
# A parameter held by any other module is an "unwrapped parameter" to torch-pruning, which prunes it out of the
# space's sight: such a model always goes to apply_plan.
_RECORDED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.PReLU, nn.LayerNorm,
             nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.Embedding)


def slice_plan(model: nn.Module, plan: PruningPlan | ResolvedPlan, space: PruningSpace, *, validate: bool = True,
               strict: bool = False, example_inputs: torch.Tensor | None = None) -> nn.Module:
    """A physically pruned copy of ``model``, equal to ``apply_plan(model, plan, x, space=space)``, built by slicing.

    Cut connection units become ``nn.Identity``; every surviving module whose output channels (producers) or input
    channels (consumers) lose channels gets new parameters and buffers by ``index_select`` along the output or input
    dimension, and its attributes set as torch-pruning's pruners set them. Every tensor of the result is owned (no
    storage is shared with ``model``), which is left untouched. Nothing is traced and the model is never run.

    Supported (exact types, no subclasses), when channels are removed from them:

    * ``nn.Conv1d/2d/3d`` with ``groups == 1`` (``out_channels``, ``in_channels``; weight dim 0/1, bias dim 0), or
      depthwise with ``groups == in_channels == out_channels`` (all three shrink together);
    * ``nn.Linear`` (``out_features``, ``in_features``; weight dim 0/1, bias dim 0);
    * ``nn.BatchNorm1d/2d/3d`` (``num_features``; weight, bias, running_mean, running_var).

    Fallback: the plan goes to :func:`apply_plan` (same result, the slow way) when a removed channel reaches a module
    of any other type or configuration (ConvTranspose, grouped non-depthwise convs, PReLU, LayerNorm, GroupNorm,
    InstanceNorm, Embedding, subclasses...), when the model holds parameters in a module that torch-pruning has no
    pruner for (it prunes those as "unwrapped parameters", out of the space's sight: a custom module with its own
    ``nn.Parameter``; also LSTM and MultiheadAttention).
    The fallback traces ``example_inputs`` (default: zeros of ``space.input_shape`` on the model's device);
    ``strict=True`` raises :class:`ModelError` naming the reason instead.

    ``validate=False`` skips :meth:`PruningSpace.validate` for a caller that has validated ``plan`` already (a
    decoded individual). As with torch-pruning, every sliced parameter is a fresh ``nn.Parameter`` (requires_grad
    True, gradient sliced along); untouched tensors are copied as they are. ``plan`` may be the space's
    :meth:`~PruningSpace.resolve` of it, which the caller then shares with the refit.
    """
    if validate:
        if not isinstance(plan, (PruningPlan, ResolvedPlan)):
            raise PlanError(f"slice_plan expects a PruningPlan, got {type(plan).__name__}")
        space.validate(plan)
    resolved = space.resolve(plan)
    plan = resolved.plan
    modules = dict(model.named_modules())
    drops = _drops(space, resolved, modules)
    reason = _unsliceable(drops, modules)
    if reason is not None:
        if strict:
            raise ModelError(f"slice_plan cannot slice this plan: {reason}; apply_plan can")
        return _fallback(model, plan, space, example_inputs)
    pruned = structure_copy(model)
    for name in resolved.cut_modules:
        swap(pruned, name, nn.Identity())
    new = dict(pruned.named_modules())
    with torch.no_grad():
        for name, (out_drop, in_drop) in drops.items():
            _slice(new[name], out_drop, in_drop)
    own_tensors(pruned, model)
    pruned.train(model.training)  # as apply_plan: the Identity modules, and every submodule, take the root's mode
    return pruned


def _unsliceable(drops, modules: dict[str, nn.Module]) -> str | None:
    """Why :func:`slice_plan` must fall back to ``apply_plan`` (None: it can slice). ``drops`` as built by
    :func:`_drops`, ``modules`` the model's ``named_modules()``."""
    for name, (out_drop, in_drop) in drops.items():
        m = modules[name]
        if not (out_drop or in_drop):
            continue
        if type(m) not in SLICEABLE:
            return f"{name} ({type(m).__name__}) loses channels and is not a supported type"
        if type(m) in _CONVS and m.groups != 1 and not _depthwise(m):
            return f"{name} is a grouped convolution (groups={m.groups})"
    for name, m in modules.items():  # parameters torch-pruning could reach that the space does not record
        if not isinstance(m, _RECORDED) and any(p is not None for p in m._parameters.values()):
            return f"{name or 'the model'} ({type(m).__name__}) holds parameters of its own"
    return None


def _fallback(model, plan, space, example_inputs):
    if example_inputs is None:
        ref = next(iter([*model.parameters(), *model.buffers()]), None)
        example_inputs = torch.zeros(space.input_shape, device=ref.device if ref is not None else None,
                                     dtype=ref.dtype if ref is not None and ref.is_floating_point() else None)
    return apply_plan(model, plan, example_inputs, space=space)


def _depthwise(m) -> bool:
    return m.groups == m.in_channels == m.out_channels and m.groups > 1


# ---------------------------------------------------------------------------------------------- the copy
# ---------------------------------------------------------------------------------------------- index maps
_MAPS: "weakref.WeakKeyDictionary[PruningSpace, list]" = weakref.WeakKeyDictionary()


def _index_maps(space: PruningSpace):
    """Per group: ``([(producer, root_idxs, idxs)], [(consumer, root_idxs, idxs, width)])`` with the index maps as
    arrays. Cached per space (a space does not change once built)."""
    maps = _MAPS.get(space)
    if maps is None:
        maps = []
        for g in space.groups:
            prod = [(p.module, np.asarray(p.root_idxs, dtype=np.int64), np.asarray(p.idxs, dtype=np.int64))
                    for p in g.producers]
            cons = [(c.module, np.asarray(c.root_idxs, dtype=np.int64), np.asarray(c.idxs, dtype=np.int64), c.width)
                    for c in g.consumers]
            maps.append((prod, cons))
        _MAPS[space] = maps
    return maps


def _drops(space, resolved: ResolvedPlan, modules):
    """``{module: (dropped output idxs, dropped input idxs)}`` over every surviving producer and consumer of the
    groups that lose channels (after cut sequential units hand their input group on)."""
    maps = _index_maps(space)
    kept, alive = resolved.kept, resolved.alive
    out: dict[str, tuple[set, set]] = {}
    for g, (prod, cons) in zip(space.groups, maps):
        keep = kept[g.name]
        if len(keep) == g.size:
            continue
        mask = np.zeros(g.size, dtype=bool)
        mask[list(keep)] = True
        for name, roots, idxs in prod:
            if alive(name):
                width = _out_width(modules[name])
                if width is not None and len(idxs) and int(idxs.max()) >= width:
                    raise ModelError(f"group {g.name!r}: {name} has {width} output channels, the space maps index "
                                     f"{int(idxs.max())}; was the model changed after building the space?")
                out.setdefault(name, (set(), set()))[0].update(idxs[~mask[roots]].tolist())
        for name, roots, idxs, width in cons:
            if alive(name):
                have = _in_width(modules[name])
                if have is not None and have != width:
                    raise ModelError(f"group {g.name!r}: {name} has {have} input channels, the space expects "
                                     f"{width}; was the model changed after building the space?")
                out.setdefault(name, (set(), set()))[1].update(idxs[~mask[roots]].tolist())
    return out


def channel_maps(model: nn.Module, plan: PruningPlan | ResolvedPlan, space: PruningSpace) -> dict[str, tuple[set, set]]:
    """``{module: (dropped output indices, dropped input indices)}``, in ``model``'s (the unpruned model's) index
    space, for every surviving module whose outputs or inputs lose channels under ``plan``: which teacher channel
    each channel of the pruned model is."""
    return _drops(space, space.resolve(plan), dict(model.named_modules()))


def _out_width(m):
    for attr in ("out_channels", "out_features", "num_features"):
        if hasattr(m, attr):
            return getattr(m, attr)
    return None


def _in_width(m):
    for attr in ("in_channels", "in_features"):
        if hasattr(m, attr):
            return getattr(m, attr)
    return None


# ---------------------------------------------------------------------------------------------- slicing
def _select(m: nn.Module, names: tuple[str, ...], dim: int, width: int, drop: set) -> int:
    """Keep the indices of ``range(width)`` not in ``drop`` along ``dim`` of each named tensor of ``m``, as
    torch-pruning's ``_prune_parameter_and_grad`` does: a new Parameter (its gradient sliced along) or buffer.
    Returns the new width."""
    keep = torch.tensor([i for i in range(width) if i not in drop], dtype=torch.long)
    for name in names:
        if name in m._parameters:
            t = m._parameters[name]
            if t is not None:
                idx = keep.to(t.device)
                p = nn.Parameter(torch.index_select(t.detach(), dim, idx))
                if t.grad is not None:
                    p.grad = torch.index_select(t.grad, dim, idx)
                m._parameters[name] = p
        elif m._buffers.get(name) is not None:
            t = m._buffers[name]
            m._buffers[name] = torch.index_select(t, dim, keep.to(t.device))
    return len(keep)


def _slice(m: nn.Module, out_drop: set, in_drop: set) -> None:
    """Remove the dropped output/input channels of one supported module, attributes as torch-pruning sets them."""
    kind = type(m)
    if kind in _CONVS and _depthwise(m):  # one channel axis: in, out and groups shrink together
        drop = out_drop | in_drop
        if drop:
            m.out_channels = m.in_channels = m.groups = _select(m, ("weight", "bias"), 0, m.out_channels, drop)
    elif kind in _CONVS:
        if out_drop:
            m.out_channels = _select(m, ("weight", "bias"), 0, m.out_channels, out_drop)
        if in_drop:
            m.in_channels = _select(m, ("weight",), 1, m.in_channels, in_drop)
    elif kind in _LINEARS:
        if out_drop:
            m.out_features = _select(m, ("weight", "bias"), 0, m.out_features, out_drop)
        if in_drop:
            m.in_features = _select(m, ("weight",), 1, m.in_features, in_drop)
    elif kind in _NORMS:
        drop = out_drop | in_drop
        if drop:
            m.num_features = _select(m, ("weight", "bias", "running_mean", "running_var"), 0, m.num_features, drop)
    else:  # _unsliceable() sends every other type to apply_plan before any copy is made
        raise AssertionError(f"slice_plan cannot slice {kind.__name__}")


__all__ = ["slice_plan", "structure_copy", "channel_maps", "SLICEABLE"]
