"""Structural distillation without training: refit the layers a plan changed so that, on a few hundred unlabeled
images, the pruned network reproduces the teacher layer by layer (:func:`reconstruct`).

The step after surgery (:func:`evoprune.apply_plan` / :func:`evoprune.slice_plan`). Two methods:

* ``"bias"``: bias compensation. Each changed layer's bias is shifted so that the mean of each kept output channel
  equals the teacher's.
* ``"lsq"``: the least-squares refit of He et al. and ThiNet (ICCV 2017). Each changed conv or linear layer, in
  forward order, gets the weights and bias that best map its inputs *in the pruned network* (already refit upstream)
  to the teacher's output of the same layer at the kept output channels (pre-BatchNorm: the teacher's BN statistics
  then fit, so no re-calibration is needed afterwards). The normal equations are solved in float64 with a ridge
  ``lambda = r * mean(diag(X^T X))`` that pulls towards the layer's current weights (the teacher's, sliced): the rule
  is scale-free, and a direction the calibration images never excite (a 3x3 tap that only ever sees padding, as in
  ResNet-18's 1x1 ``layer4``) keeps the teacher's weight instead of collapsing to zero. ``r`` is chosen per layer
  from :data:`RIDGES` by the error on every fifth calibration batch, held out of a first fit (B6: layers with few
  samples per unknown, late in ResNet-18, pick 0.1-1; early ones 1e-3-1e-2).

A bias-free conv read by a BatchNorm gets its bias folded into the BN's running mean (eval mode), so the refit
model has exactly the parameters the plan gives; other layers without a bias get one.

A layer is *changed* when it runs after the first conv/linear that lost input channels or the first cut connection
unit; refitting an unchanged layer returns its weights (its targets are its own outputs), so that is harmless.
Grouped and depthwise convs are solved group by group. Labels are never used: batches are images, and an
``(images, labels)`` pair contributes its images only.

The least-squares pieces live in :mod:`evoprune.prune.lsq`. Memory: per layer, two ``D x D`` float64 Gram matrices (fit
and held out) with ``D = in_channels / groups * kh * kw + 1`` (VGG16's widest conv, 512 inputs: 2 x 170 MB), plus
the teacher's sampled outputs of every changed layer, ``images * positions * out_channels`` float32 (1,024 images,
16 positions, 512 channels: 32 MB a layer).

:class:`evoprune.prune.grams.TeacherGrams` is the cheap variant for fitness: the teacher's per-layer Gram matrices over
its own inputs are collected once per round; refitting a candidate is then a slice of them and a small solve per layer,
no forward pass (``FitnessConfig(reconstruct="lsq")``).
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError, ModelError, PlanError
from ..space.plan import PruningPlan
from ..space.pruning_space import PruningSpace, ResolvedPlan
from ..validators import check_int, is_number
from .lsq import (REFIT_TYPES, add_bias, calibration_images, depthwise, device_of, input_rows, out_width, output_rows,
                  positions_of, solve)
from .slicing import channel_maps

METHODS = ("none", "bias", "lsq")
RIDGES = (1e-3, 1e-2, 1e-1, 1.0)  # ridge="auto" picks one per layer on held-out calibration batches
DEFAULT_RIDGE = 1e-3  # ridge="auto" with fewer than 5 batches (nothing to hold out)


class ReconstructionWarning(UserWarning):
    """A layer was refit by bias compensation instead of least squares (too few samples or an unstable solve)."""


@dataclass(frozen=True)
class _Layer:
    """One layer to refit: its name, and the teacher output channels its outputs are."""

    name: str
    kept_out: torch.Tensor
    norm: str | None = None  # the BatchNorm that reads this layer's output: a bias-free layer's bias folds into it


def reconstruct(teacher: nn.Module, pruned: nn.Module, plan: PruningPlan, space: PruningSpace, batches,
                method: str = "lsq", *, positions: int = 16, ridge: float | str = "auto",
                min_samples: float = 1.0, seed: int = 0, inplace: bool = False,
                report: list | None = None) -> nn.Module:
    """The pruned model refit to reproduce ``teacher`` (see the module docstring), a copy unless ``inplace``.

    ``pruned`` is ``apply_plan(teacher, plan, ...)`` or ``slice_plan(teacher, plan, space)``, with the same module
    names. ``batches``: an iterable of image tensors (or ``(images, labels)`` pairs, labels ignored), normalised as
    the teacher expects; 512-1,024 images are enough. ``positions``: spatial positions sampled per image and layer.
    ``min_samples``: a layer with fewer samples than this many times its unknowns per output falls back to bias
    compensation, with a :class:`ReconstructionWarning`. ``ridge``: times the mean diagonal of ``X^T X``, or
    ``"auto"``: per layer, the one of :data:`RIDGES` that best reproduces every fifth calibration batch held out of
    the fit (then all batches fit). ``report``: a list that gets one dict per refit layer (samples, unknowns,
    method, ridge). ``method="none"`` returns the model as it is. The teacher is never modified."""
    method = check_method(method)
    check_int("positions", positions)
    if ridge != "auto" and not (is_number(ridge) and ridge > 0 and math.isfinite(ridge)):
        raise ConfigError(f"must be 'auto' or a positive number, got {ridge!r}", setting="ridge")
    if not (is_number(min_samples) and 0 <= min_samples < 1e9):
        raise ConfigError(f"must be a number >= 0, got {min_samples!r}", setting="min_samples")
    if not isinstance(plan, (PruningPlan, ResolvedPlan)):
        raise PlanError(f"reconstruct expects a PruningPlan, got {type(plan).__name__}")
    space.validate(plan)
    plan = space.resolve(plan)
    images = calibration_images(batches, space)
    net = pruned if inplace else copy.deepcopy(pruned)
    if method == "none":
        return net
    layers = _changed_layers(teacher, net, plan, space, images[0][:1])
    if not layers:
        return net
    was_training, teacher_training = net.training, teacher.training
    net.eval()
    teacher.eval()
    try:
        with torch.no_grad():
            targets = _teacher_outputs(teacher, layers, images, positions, seed, method)
            for layer in layers:
                _refit(net, layer, targets[layer.name], images, method, ridge, min_samples, report)
    finally:
        net.train(was_training)
        teacher.train(teacher_training)
    return net


def check_method(method) -> str:
    if method not in METHODS:
        raise ConfigError(f"reconstruct method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


# ---------------------------------------------------------------------------------------------- which layers
def _changed_layers(teacher, net, plan, space, probe) -> list[_Layer]:
    """The conv/linear layers to refit, in the order the pruned network runs them."""
    t_modules, modules = dict(teacher.named_modules()), dict(net.named_modules())
    maps = channel_maps(teacher, plan, space)
    cut = set(space.resolve(plan).cut_modules)
    order: list[str] = []
    calls: dict[str, int] = {}

    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    norms: dict[str, str] = {}

    def hook(name):
        def record(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
            outputs[id(output)] = (name, output)
        return record

    def norm_hook(name):
        def record(module, args):
            hit = outputs.get(id(args[0]))
            if hit is not None and hit[1] is args[0]:
                norms[hit[0]] = name
        return record

    watched = {n: m for n, m in modules.items()
               if n in cut or (type(m) in REFIT_TYPES and type(t_modules.get(n)) is type(m))}
    handles = [m.register_forward_hook(hook(n)) for n, m in watched.items()]
    handles += [m.register_forward_pre_hook(norm_hook(n)) for n, m in modules.items()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    try:
        with torch.no_grad():
            was = net.training
            net.eval()
            net(probe.to(device_of(net)))
            net.train(was)
    finally:
        for h in handles:
            h.remove()
    start = None
    for i, name in enumerate(order):
        if name in cut or maps.get(name, (None, None))[1]:
            start = i
            break
    if start is None:
        return []
    layers = []
    for name in order[start:]:
        if name in cut or calls[name] > 1:  # a module run twice has no single input to fit
            continue
        width = out_width(t_modules[name])
        drop = maps.get(name, (set(), set()))[0]
        if depthwise(modules[name]):
            drop = drop | maps.get(name, (set(), set()))[1]
        kept = torch.tensor([c for c in range(width) if c not in drop], dtype=torch.long)
        if len(kept) != out_width(modules[name]):
            raise ModelError(f"{name}: the pruned model has {out_width(modules[name])} outputs, the plan keeps "
                             f"{len(kept)}; pass the model apply_plan or slice_plan made from this teacher")
        layers.append(_Layer(name, kept, norms.get(name)))
    return layers


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer being refit has seen its input."""


def _teacher_outputs(teacher, layers, images, positions, seed, method):
    """Per layer: ``(sample indices per batch, teacher output rows per batch, mean output per kept channel)``."""
    modules = dict(teacher.named_modules())
    out = {layer.name: ([], [], None) for layer in layers}
    handles = []
    for k, layer in enumerate(layers):
        gen = torch.Generator().manual_seed(seed * 100_003 + k)

        def hook(module, args, y, layer=layer, gen=gen):
            idxs, rows, mean = out[layer.name]
            y = y.index_select(1 if isinstance(module, nn.Conv2d) else y.dim() - 1, layer.kept_out.to(y.device))
            s = _channel_sums(module, y)
            mean = s if mean is None else (mean[0] + s[0], mean[1] + s[1])
            if method == "lsq":
                idx = positions_of(y, positions, gen) if isinstance(module, nn.Conv2d) else None
                idxs.append(idx)
                rows.append(output_rows(module, y, idx).float().cpu())
            else:
                idxs.append(None)
            out[layer.name] = (idxs, rows, mean)

        handles.append(modules[layer.name].register_forward_hook(hook))
    try:
        dev = device_of(teacher)
        for b in images:
            teacher(b.to(dev))
    finally:
        for h in handles:
            h.remove()
    return {n: (i, r, m[0] / m[1]) for n, (i, r, m) in out.items()}


# ---------------------------------------------------------------------------------------------- refitting
def _held_out_ridge(gram, cross, w0) -> float:
    """The ridge of :data:`RIDGES` whose fit on ``gram[0], cross[0]`` best reproduces the held-out batches
    (``gram[1], cross[1]``): the held-out error is ``tr(W^T G W) - 2 tr(W^T C)`` up to a constant."""
    best, best_err = DEFAULT_RIDGE, math.inf
    for r in RIDGES:
        w = solve(gram[0], cross[0], w0, r)
        if w is None:
            continue
        err = float((w * (gram[1] @ w)).sum() - 2 * (w * cross[1]).sum())
        if err < best_err:
            best, best_err = r, err
    return best


def _refit(net, layer: _Layer, target, images, method, ridge, min_samples, report) -> None:
    modules = dict(net.named_modules())
    module = modules[layer.name]
    norm = modules[layer.norm] if layer.norm and module.bias is None else None

    def _set_bias(module, value, *, absolute=False):  # a bias-free conv before a BN: fold the bias into the BN
        if norm is None:
            return add_bias(module, value, absolute=absolute)
        with torch.no_grad():  # the BN reads conv(x) + b as conv(x) with running_mean - b (eval mode)
            norm.running_mean.sub_(value.to(norm.running_mean))

    idxs, rows, mean_t = target
    dev = device_of(net)

    def compensate():  # bias compensation: each kept channel's mean set to the teacher's
        _set_bias(module, mean_t - _mean_output(net, module, images))

    if method == "bias":
        compensate()
        return
    groups = module.groups if isinstance(module, nn.Conv2d) else 1
    d = module.weight[0].numel()  # inputs per output: (in_channels / groups) * kh * kw
    out_pg = module.weight.shape[0] // groups
    # ridge="auto": every fifth batch is held out to choose the ridge (RIDGES), then all of them fit
    held = [ridge == "auto" and len(images) >= 5 and k % 5 == 4 for k in range(len(images))]
    gram = torch.zeros(2, groups, d + 1, d + 1, dtype=torch.float64)  # [fit, held out]
    cross = torch.zeros(2, groups, d + 1, out_pg, dtype=torch.float64)
    state = {"batch": 0, "n": 0}

    def hook(m, args):
        k = state["batch"]
        x = input_rows(m, args[0], None if idxs[k] is None else idxs[k].to(args[0].device)).float()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1).cpu()
        y = rows[k]
        if len(y) != len(x):
            raise ModelError(f"{layer.name}: {len(x)} input samples against {len(y)} teacher outputs; the pruned "
                             "model must run its layers at the teacher's resolution")
        xg = x[:, :-1].reshape(len(x), groups, d)
        xg = torch.cat([xg, x[:, -1:].expand(-1, groups).unsqueeze(2)], 2)  # (n, g, d+1)
        part = int(held[k])
        gram[part].add_(torch.einsum("ngi,ngj->gij", xg, xg).double())  # float32 products per batch, float64 sums
        cross[part].add_(torch.einsum("ngi,ngo->gio", xg, y.reshape(len(y), groups, out_pg)).double())
        state["n"] += len(x)
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for k, b in enumerate(images):
            state["batch"] = k
            try:
                net(b.to(dev))
            except _Stop:
                pass
    finally:
        handle.remove()
    if not bool(torch.isfinite(gram).all()):
        raise ModelError(f"non-finite activations reach {layer.name} in the pruned model; check the model and the "
                         "calibration images")
    n, live = state["n"], int((torch.diagonal(gram.sum(0), dim1=1, dim2=2) > 0).sum(1).max())
    entry = {"layer": layer.name, "samples": n, "unknowns": live}
    if report is not None:
        report.append(entry)
    if n < min_samples * live:
        entry["method"] = "bias"
        warnings.warn(f"{layer.name}: {n} calibration samples for {live} unknowns per output; refit by bias "
                      "compensation instead (pass more calibration images)", ReconstructionWarning, stacklevel=3)
        compensate()
        return
    w0 = _weights(module, groups, d, out_pg)
    if ridge == "auto":
        ridge = _held_out_ridge(gram, cross, w0) if any(held) else DEFAULT_RIDGE
    entry.update(method="lsq", ridge=ridge)
    w = solve(gram.sum(0), cross.sum(0), w0, ridge)
    if w is None:
        entry["method"] = "bias"
        warnings.warn(f"{layer.name}: the least-squares system is unstable; refit by bias compensation instead",
                      ReconstructionWarning, stacklevel=3)
        compensate()
        return
    module.weight.data.copy_(w.transpose(1, 2)[..., :d].reshape(module.weight.shape).to(module.weight))
    _set_bias(module, w.transpose(1, 2)[..., d].reshape(-1), absolute=True)


def _weights(module, groups, d, out_pg) -> torch.Tensor:
    """The module's weights and bias as ``(groups, d + 1, out_per_group)``, the layout :func:`solve` uses."""
    w = module.weight.detach().reshape(groups, out_pg, d).double().cpu()
    b = module.bias.detach().double().cpu() if module.bias is not None else torch.zeros(module.weight.shape[0],
                                                                                         dtype=torch.float64)
    return torch.cat([w, b.reshape(groups, out_pg, 1)], 2).transpose(1, 2)


def _channel_sums(module, y) -> tuple[torch.Tensor, int]:
    """``(sum of each output channel of y in float64, values per channel)``: channels are dim 1 of a conv's output,
    the last dim of a linear's."""
    chan = y.transpose(0, 1).reshape(y.shape[1], -1) if isinstance(module, nn.Conv2d) else y.reshape(-1, y.shape[-1]).T
    return chan.double().sum(1).cpu(), chan.shape[1]


def _mean_output(net, module, images) -> torch.Tensor:
    """The mean of each output channel of ``module`` in ``net`` over ``images`` (a forward stopped there)."""
    acc = {"sum": None, "n": 0}

    def hook(m, args, y):
        s, n = _channel_sums(m, y)
        acc["sum"] = s if acc["sum"] is None else acc["sum"] + s
        acc["n"] += n
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        for b in images:
            try:
                net(b.to(device_of(net)))
            except _Stop:
                pass
    finally:
        handle.remove()
    return acc["sum"] / acc["n"]


__all__ = ["reconstruct", "ReconstructionWarning", "METHODS", "check_method"]
