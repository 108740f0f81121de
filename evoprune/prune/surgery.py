"""Physical removal (torch-pruning) and the cheap masked equivalent.

``apply_plan`` returns a new, genuinely smaller module: cut connection units are replaced by ``nn.Identity``, then
torch-pruning's DependencyGraph removes the channels of every group. ``masked`` zeroes the same channels on the
inputs of their consumers, in place and reversibly, so that a plan can be scored without copying the model.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from ..space import graph
from ..errors import ModelError, PlanError
from ..space.plan import PruningPlan
from ..space.pruning_space import PruningSpace


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent, attr = _parent(model, name)
    old = parent._modules[attr]
    parent._modules[attr] = new
    return old


def _space_for(model, plan, example_inputs, space) -> PruningSpace:
    if space is None:
        space = PruningSpace.from_model(model, example_inputs, with_cost=False)
    elif tuple(example_inputs.shape[1:]) != tuple(space.input_shape[1:]):
        raise ModelError(f"example_inputs have shape {tuple(example_inputs.shape)}, but the space was built for "
                         f"{space.input_shape}")
    space.validate(plan)
    return space


def apply_plan(model: nn.Module, plan: PruningPlan, example_inputs: torch.Tensor, *,
               space: PruningSpace | None = None) -> nn.Module:
    """A physically pruned copy of ``model``. The input model is left untouched.

    The plan is validated first (:class:`PlanError` before any work). Pass the ``space`` you decoded the plan with
    to skip rediscovering it.
    """
    if not isinstance(plan, PruningPlan):
        raise PlanError(f"apply_plan expects a PruningPlan, got {type(plan).__name__}")
    space = _space_for(model, plan, example_inputs, space)
    pruned = _structure_copy(model)
    was_training = pruned.training
    alive = space.alive(plan)
    for unit in space.cut_units(plan):
        for name in unit.modules:
            _swap(pruned, name, nn.Identity())
    modules = dict(pruned.named_modules())
    dg = graph.build(pruned, example_inputs).graph  # survives what torch-pruning cannot map (see space/graph.py)
    for g in space.groups:
        kept = set(plan.groups.get(g.name, range(g.size)))
        removed = sorted(set(range(g.size)) - kept)
        producers = [m for m in g.members if alive(m)]
        if not removed or not producers:
            continue  # untouched, or every producer was bypassed with its unit
        root = modules[producers[0]]
        if dg.get_out_channels(root) != g.size:
            raise ModelError(f"group {g.name!r}: {producers[0]} has {dg.get_out_channels(root)} output channels, "
                             f"the space expects {g.size}; was the model changed after building the space?")
        pruner = dg.get_pruner_of_module(root)
        group = dg.get_pruning_group(root, pruner.prune_out_channels, removed)
        group.prune()
    _own_tensors(pruned, model)
    pruned.train(was_training)
    return pruned


def _tensors(model: nn.Module):
    return list(model.parameters()) + list(model.buffers())


def _structure_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the modules that still SHARES the parameter and buffer tensors. torch-pruning replaces every
    tensor it prunes with a new one (index_select), so copying them all first would be wasted: most are about to
    be thrown away. :func:`_own_tensors` then clones the ones pruning left shared."""
    return copy.deepcopy(model, memo={id(t): t for t in _tensors(model)})


def _own_tensors(pruned: nn.Module, original: nn.Module) -> None:
    """Replace every tensor of ``pruned`` that still shares memory with ``original`` by a copy."""
    shared = {t.untyped_storage().data_ptr() for t in _tensors(original) if t.numel()}
    for module in pruned.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.numel() and p.untyped_storage().data_ptr() in shared:
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and b.numel() and b.untyped_storage().data_ptr() in shared:
                module._buffers[name] = b.clone()


@contextlib.contextmanager
def masked(model: nn.Module, plan: PruningPlan, space: PruningSpace, *, validate: bool = True) -> Iterator[nn.Module]:
    """Evaluate ``model`` as if pruned by ``plan``, without copying it.

    Inside the block, cut units are bypassed and every consumer of a removed channel sees zero on that input. In eval
    mode the outputs equal those of ``apply_plan(model, plan, ...)``. The model is restored on exit.
    ``validate=False`` skips :meth:`PruningSpace.validate` (for a plan just decoded from genes).
    """
    if validate:
        space.validate(plan)
    kept = space.effective_kept(plan)
    alive = space.alive(plan)
    modules = dict(model.named_modules())
    masks: dict[str, tuple[int, torch.Tensor]] = {}
    for g in space.groups:
        if len(kept[g.name]) == g.size:
            continue
        keep = np.zeros(g.size, dtype=bool)
        keep[list(kept[g.name])] = True
        for c in g.consumers:
            if not alive(c.module):
                continue
            dim, mask = masks.get(c.module, (c.dim, None))
            if mask is None:
                mask = torch.ones(c.width)
            drop = np.asarray(c.idxs, dtype=np.int64)[~keep[np.asarray(c.root_idxs, dtype=np.int64)]]
            mask[torch.from_numpy(drop)] = 0.0
            masks[c.module] = (dim, mask)
    handles, swapped = [], []
    try:
        for name, (dim, mask) in masks.items():
            handles.append(modules[name].register_forward_pre_hook(_mask_hook(dim, mask)))
        for unit in space.cut_units(plan):
            for name in unit.modules:
                swapped.append((name, _swap(model, name, nn.Identity())))
        yield model
    finally:
        for name, old in reversed(swapped):
            _swap(model, name, old)
        for h in handles:
            h.remove()


def _mask_hook(dim: int, mask: torch.Tensor):
    cache = {}

    def hook(module, args):
        x = args[0]
        key = (x.device, x.dtype, x.dim())
        m = cache.get(key)
        if m is None:
            shape = [1] * x.dim()
            shape[dim] = -1
            m = cache[key] = mask.to(device=x.device, dtype=x.dtype).view(shape)
        return (x * m,) + tuple(args[1:])

    return hook
