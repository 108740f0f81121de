"""Channel importance per group, from torch-pruning's importance criteria.

Scores guide the seeded initial population, the guided mutation and the repair step: low-importance channels are
switched off first, high-importance ones switched on first. The result is a plain ``{group name: np.ndarray}``, so it
pickles small.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from ..errors import ConfigError
from . import graph
from .pruning_space import PruningSpace

KINDS = ("l1", "l2", "bn", "taylor", "random")


def channel_importance(model: nn.Module, space: PruningSpace, example_inputs: torch.Tensor, kind: str = "l1", *,
                       batches: Iterable | None = None, loss_fn: Callable | None = None,
                       seed: int = 0) -> dict[str, np.ndarray]:
    """Importance of every channel of every group of ``space``.

    ``l1``/``l2``: group weight magnitude (``tp.importance.GroupMagnitudeImportance``). ``bn``: BN scale
    (``BNScaleImportance``). ``taylor``: first-order Taylor (``GroupTaylorImportance``), which needs ``batches`` of
    ``(inputs, targets)`` to accumulate gradients. ``random``: a seeded baseline.
    """
    if kind not in KINDS:
        raise ConfigError(f"importance kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "random":
        rng = np.random.default_rng(seed)
        return {g.name: rng.random(g.size) for g in space.groups}
    work = copy.deepcopy(model).eval()
    if kind == "taylor":
        if batches is None:
            raise ConfigError("taylor importance needs batches=[(inputs, targets), ...] to compute gradients")
        loss_fn = loss_fn or nn.functional.cross_entropy
        work.zero_grad()
        for x, y in batches:
            loss_fn(work(x), y).backward()
        imp = tp.importance.GroupTaylorImportance()
    elif kind == "bn":
        imp = tp.importance.BNScaleImportance()
    else:
        imp = tp.importance.GroupMagnitudeImportance(p=1 if kind == "l1" else 2)
    dg = graph.build(work, example_inputs).graph  # survives what torch-pruning cannot map (see graph.py)
    modules = dict(work.named_modules())
    scores = {}
    for g in space.groups:
        root = modules[g.name]
        group = dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels, list(range(g.size)))
        with torch.no_grad():
            s = imp(group)
        if s is None:  # e.g. BN importance on a group without BN: fall back to magnitude
            s = tp.importance.GroupMagnitudeImportance(p=1)(group)
        s = s.detach().cpu().double().numpy()
        if s.shape != (g.size,) or not np.isfinite(s).all():
            s = np.nan_to_num(s.reshape(-1)[: g.size], nan=0.0, posinf=0.0, neginf=0.0)
        scores[g.name] = s
    return scores


def ranks(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per group, each channel's importance rank scaled to [0, 1] (0 = least important)."""
    out = {}
    for name, s in scores.items():
        r = np.empty(len(s))
        r[np.argsort(s, kind="stable")] = np.arange(len(s))
        out[name] = r / max(len(s) - 1, 1)
    return out
