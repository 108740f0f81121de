"""Physical removal (torch-pruning) and the cheap masked equivalent.

``apply_plan`` returns a new, genuinely smaller module: cut connection units are replaced by ``nn.Identity``, then
torch-pruning's DependencyGraph removes the channels of every group. ``masked`` zeroes the same channels on the
inputs of their consumers, in place and reversibly, so that a plan can be scored without copying the model.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

from ..errors import ModelError, PlanError
from ..space import graph
from ..space.plan import PruningPlan
from ..space.pruning_space import PruningSpace, ResolvedPlan
from .copying import own_tensors, structure_copy, swap


def _space_for(model, plan, example_inputs, space) -> PruningSpace:
    if space is None:
        space = PruningSpace.from_model(model, example_inputs, with_cost=False)
    elif tuple(example_inputs.shape[1:]) != tuple(space.input_shape[1:]):
        raise ModelError(f"example_inputs have shape {tuple(example_inputs.shape)}, but the space was built for "
                         f"{space.input_shape}")
    space.validate(plan)
    return space


def apply_plan(model: nn.Module, plan: PruningPlan | ResolvedPlan, example_inputs: torch.Tensor, *,
               space: PruningSpace | None = None) -> nn.Module:
    """A physically pruned copy of ``model``. The input model is left untouched.

    The plan is validated first (:class:`PlanError` before any work). Pass the ``space`` you decoded the plan with
    to skip rediscovering it (and ``plan`` may then be its :meth:`~PruningSpace.resolve` of the plan).
    """
    if isinstance(plan, ResolvedPlan):
        space, plan = space or plan.space, plan.plan
    if not isinstance(plan, PruningPlan):
        raise PlanError(f"apply_plan expects a PruningPlan, got {type(plan).__name__}")
    space = _space_for(model, plan, example_inputs, space)
    resolved = space.resolve(plan)
    pruned = structure_copy(model)
    was_training = pruned.training
    alive = resolved.alive
    for name in resolved.cut_modules:
        swap(pruned, name, nn.Identity())
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
    own_tensors(pruned, model)
    pruned.train(was_training)
    return pruned


@contextlib.contextmanager
def masked(model: nn.Module, plan: PruningPlan | ResolvedPlan, space: PruningSpace, *,
           validate: bool = True) -> Iterator[nn.Module]:
    """Evaluate ``model`` as if pruned by ``plan``, without copying it.

    Inside the block, cut units are bypassed and every consumer of a removed channel sees zero on that input. In eval
    mode the outputs equal those of ``apply_plan(model, plan, ...)``. The model is restored on exit.
    ``validate=False`` skips :meth:`PruningSpace.validate` (for a plan just decoded from genes).
    """
    if validate:
        space.validate(plan)
    resolved = space.resolve(plan)
    kept, alive = resolved.kept, resolved.alive
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
        for name in resolved.cut_modules:
            swapped.append((name, swap(model, name, nn.Identity())))
        yield model
    finally:
        for name, old in reversed(swapped):
            swap(model, name, old)
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
