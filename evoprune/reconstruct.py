"""Structural distillation without training: refit the layers a plan changed so that, on a few hundred unlabeled
images, the pruned network reproduces the teacher layer by layer.

The step after surgery (:func:`evoprune.apply_plan` / :func:`evoprune.slice_plan`). Two methods:

* ``"bias"``: bias compensation. Each changed layer's bias is shifted so that the mean of each kept output channel
  equals the teacher's (a layer without a bias gets one).
* ``"lsq"``: the least-squares refit of He et al. and ThiNet (ICCV 2017). Each changed conv or linear layer, in
  forward order, gets the weights and bias that best map its inputs *in the pruned network* (already refit upstream)
  to the teacher's output of the same layer at the kept output channels (pre-BatchNorm: the teacher's BN statistics
  then fit, so no re-calibration is needed afterwards). The normal equations are solved in float64 with a ridge
  ``lambda = ridge * mean(diag(X^T X))`` that pulls towards the pruned layer's current weights (the teacher's, sliced):
  the rule is scale-free, and a direction the calibration images never excite (a 3x3 tap that only ever sees padding,
  as in ResNet-18's 1x1 ``layer4``) keeps the teacher's weight instead of collapsing to zero.

A layer is *changed* when it runs after the first conv/linear that lost input channels or the first cut connection
unit; refitting an unchanged layer returns its weights (its targets are its own outputs), so that is harmless.
Grouped and depthwise convs are solved group by group. Labels are never used: batches are images, and an
``(images, labels)`` pair contributes its images only.

Memory: per layer, a ``D x D`` float64 Gram matrix with ``D = in_channels / groups * kh * kw + 1`` (VGG16's widest
conv, 512 inputs: 170 MB), plus the teacher's sampled outputs of every changed layer, ``images * positions *
out_channels`` float32 (1,024 images, 16 positions, 512 channels: 32 MB a layer).

:class:`TeacherGrams` is the cheap variant for fitness: the teacher's per-layer Gram matrices over its own inputs
are collected once per round; refitting a candidate is then a slice of them and a small solve per layer, no forward
pass (:attr:`evoprune.FitnessConfig.reconstruct`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError, DataError, ModelError, PlanError
from .plan import PruningPlan
from .slicing import channel_maps
from .space import PruningSpace

METHODS = ("none", "bias", "lsq")
CALIB_IMAGES = 1024  # default calibration images: enough for the widest layers at 16 positions an image (B6)
REFIT_TYPES = (nn.Conv2d, nn.Linear)


class ReconstructionWarning(UserWarning):
    """A layer was refit by bias compensation instead of least squares (too few samples or an unstable solve)."""


@dataclass(frozen=True)
class _Layer:
    """One layer to refit: its name, the teacher output channels its outputs are, and whether its input lost any."""

    name: str
    kept_out: torch.Tensor
    lost_inputs: bool


def reconstruct(teacher: nn.Module, pruned: nn.Module, plan: PruningPlan, space: PruningSpace, batches,
                method: str = "lsq", *, positions: int = 16, ridge: float = 1e-3, seed: int = 0,
                inplace: bool = False) -> nn.Module:
    """The pruned model refit to reproduce ``teacher`` (see the module docstring), a copy unless ``inplace``.

    ``pruned`` is ``apply_plan(teacher, plan, ...)`` or ``slice_plan(teacher, plan, space)``, with the same module
    names. ``batches``: an iterable of image tensors (or ``(images, labels)`` pairs, labels ignored), normalised as
    the teacher expects; 512-1,024 images are enough. ``positions``: spatial positions sampled per image and layer.
    ``method="none"`` returns the model as it is. The teacher is never modified."""
    method = check_method(method)
    if not isinstance(positions, int) or isinstance(positions, bool) or positions < 1:
        raise ConfigError(f"positions must be an int >= 1, got {positions!r}")
    if not (isinstance(ridge, (int, float)) and not isinstance(ridge, bool) and ridge > 0 and math.isfinite(ridge)):
        raise ConfigError(f"ridge must be a positive number, got {ridge!r}")
    if not isinstance(plan, PruningPlan):
        raise PlanError(f"reconstruct expects a PruningPlan, got {type(plan).__name__}")
    space.validate(plan)
    images = calibration_images(batches, space)
    net = pruned if inplace else _copy(pruned)
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
            for i, layer in enumerate(layers):
                _refit(net, layer, targets[layer.name], images, method, ridge)
    finally:
        net.train(was_training)
        teacher.train(teacher_training)
    return net


def check_method(method) -> str:
    if method not in METHODS:
        raise ConfigError(f"reconstruct method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def calibration_images(batches, space: PruningSpace) -> list[torch.Tensor]:
    """The image tensors of ``batches``, checked: non-empty, finite, shaped like the space's inputs."""
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    images = []
    for b in batches if batches is not None else ():
        if isinstance(b, (tuple, list)):  # (images, labels) from a DataLoader: the labels are not read
            b = b[0]
        if not isinstance(b, torch.Tensor) or not b.is_floating_point():
            raise DataError(f"calibration batches must be float image tensors, got {type(b).__name__}")
        if tuple(b.shape[1:]) != tuple(space.input_shape[1:]):
            raise DataError(f"calibration images have shape {tuple(b.shape[1:])} per sample, the space was built "
                            f"for {tuple(space.input_shape[1:])}")
        if len(b):
            images.append(b)
    if not images:
        raise DataError("reconstruction needs calibration images (a few hundred unlabeled training images)")
    if not all(bool(torch.isfinite(b).all()) for b in images):
        raise DataError("calibration images contain NaN or infinite values")
    return images


def calibration_subset(batches, n: int) -> list[torch.Tensor] | None:
    """The first ``n`` images of ``batches`` (a list of tensors), as batches; None for no batches."""
    if not batches:
        return None
    out, left = [], n
    for b in batches:
        if left <= 0:
            break
        out.append(b[:left])
        left -= len(out[-1])
    return out


def _copy(model):
    import copy
    return copy.deepcopy(model)


# ---------------------------------------------------------------------------------------------- which layers
def _changed_layers(teacher, net, plan, space, probe) -> list[_Layer]:
    """The conv/linear layers to refit, in the order the pruned network runs them."""
    t_modules, modules = dict(teacher.named_modules()), dict(net.named_modules())
    maps = channel_maps(teacher, plan, space)
    cut = {name for u in space.cut_units(plan) for name in u.modules}
    order: list[str] = []
    calls: dict[str, int] = {}

    def hook(name):
        def record(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
        return record

    watched = {n: m for n, m in modules.items()
               if n in cut or (type(m) in REFIT_TYPES and type(t_modules.get(n)) is type(m))}
    handles = [m.register_forward_hook(hook(n)) for n, m in watched.items()]
    try:
        with torch.no_grad():
            was = net.training
            net.eval()
            net(probe.to(_device(net)))
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
        width = _out_width(t_modules[name])
        drop = maps.get(name, (set(), set()))[0]
        if _depthwise(modules[name]):
            drop = drop | maps.get(name, (set(), set()))[1]
        kept = torch.tensor([c for c in range(width) if c not in drop], dtype=torch.long)
        if len(kept) != _out_width(modules[name]):
            raise ModelError(f"{name}: the pruned model has {_out_width(modules[name])} outputs, the plan keeps "
                             f"{len(kept)}; pass the model apply_plan or slice_plan made from this teacher")
        layers.append(_Layer(name, kept, bool(maps.get(name, (set(), set()))[1])))
    return layers


def _out_width(m):
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _depthwise(m) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def _device(model):
    p = next(iter([*model.parameters(), *model.buffers()]), None)
    return p.device if p is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- sampling
def _rows(module, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """The layer's inputs as rows ``(samples, in_channels * kh * kw)``: conv patches at the sampled output positions
    ``idx`` (``(N, p)`` flat indices), or linear inputs with leading dims flattened."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if module.padding_mode == "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice)
    else:
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    rows = []
    chunk = max(1, int(2 ** 25 // max(1, x[0].numel() * _taps(module))))  # bound unfold's memory
    for i in range(0, len(x), chunk):
        cols = F.unfold(x[i:i + chunk], module.kernel_size, dilation=module.dilation, stride=module.stride)
        j = idx[i:i + chunk]
        cols = cols.gather(2, j.unsqueeze(1).expand(-1, cols.shape[1], -1))  # (n, C*kk, p)
        rows.append(cols.permute(0, 2, 1).reshape(-1, cols.shape[1]))
    return torch.cat(rows)


def _taps(module):
    return int(np.prod(module.kernel_size)) if isinstance(module, nn.Conv2d) else 1


def _out_rows(module, y: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """A layer's outputs as rows ``(samples, out_channels)`` at the same samples as :func:`_rows`."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    flat = y.flatten(2)
    return flat.gather(2, idx.unsqueeze(1).expand(-1, flat.shape[1], -1)).permute(0, 2, 1).reshape(-1, flat.shape[1])


def _positions(y, positions, gen) -> torch.Tensor | None:
    """``(N, p)`` sampled flat output positions per image (all of them when there are at most ``positions``)."""
    if y.dim() != 4:
        return None
    n, hw = y.shape[0], y.shape[2] * y.shape[3]
    if hw <= positions:
        return torch.arange(hw, device=y.device).expand(n, hw)
    return torch.rand(n, hw, generator=gen).argsort(dim=1)[:, :positions].to(y.device)


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
            chan = y.transpose(0, 1).reshape(y.shape[1], -1) if isinstance(module, nn.Conv2d) else \
                y.reshape(-1, y.shape[-1]).T
            s = chan.double().sum(1).cpu(), chan.shape[1]
            mean = s if mean is None else (mean[0] + s[0], mean[1] + s[1])
            if method == "lsq":
                idx = _positions(y, positions, gen) if isinstance(module, nn.Conv2d) else None
                idxs.append(idx)
                rows.append(_out_rows(module, y, idx).float().cpu())
            else:
                idxs.append(None)
            out[layer.name] = (idxs, rows, mean)

        handles.append(modules[layer.name].register_forward_hook(hook))
    try:
        dev = _device(teacher)
        for b in images:
            teacher(b.to(dev))
    finally:
        for h in handles:
            h.remove()
    return {n: (i, r, m[0] / m[1]) for n, (i, r, m) in out.items()}


# ---------------------------------------------------------------------------------------------- refitting
def _refit(net, layer: _Layer, target, images, method, ridge) -> None:
    module = dict(net.named_modules())[layer.name]
    idxs, rows, mean_t = target
    dev = _device(net)
    if method == "bias":
        _set_bias(module, mean_t - _mean_output(net, module, images))
        return
    groups = module.groups if isinstance(module, nn.Conv2d) else 1
    d = module.weight[0].numel()  # inputs per output: (in_channels / groups) * kh * kw
    out_pg = module.weight.shape[0] // groups
    gram = torch.zeros(groups, d + 1, d + 1, dtype=torch.float64)
    cross = torch.zeros(groups, d + 1, out_pg, dtype=torch.float64)
    state = {"batch": 0, "n": 0}

    def hook(m, args):
        k = state["batch"]
        x = _rows(m, args[0], None if idxs[k] is None else idxs[k].to(args[0].device)).float()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1).cpu()
        y = rows[k]
        if len(y) != len(x):
            raise ModelError(f"{layer.name}: {len(x)} input samples against {len(y)} teacher outputs; the pruned "
                             "model must run its layers at the teacher's resolution")
        xg = x[:, :-1].reshape(len(x), groups, d)
        xg = torch.cat([xg, x[:, -1:].expand(-1, groups).unsqueeze(2)], 2)  # (n, g, d+1)
        gram.add_(torch.einsum("ngi,ngj->gij", xg, xg).double())  # float32 products per batch, float64 sums
        cross.add_(torch.einsum("ngi,ngo->gio", xg, y.reshape(len(y), groups, out_pg)).double())
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
    n, live = state["n"], int((torch.diagonal(gram, dim1=1, dim2=2) > 0).sum(1).max())
    if n < live:
        warnings.warn(f"{layer.name}: {n} calibration samples for {live} unknowns per output; refit by bias "
                      "compensation instead (pass more calibration images)", ReconstructionWarning, stacklevel=3)
        _set_bias(module, mean_t - _mean_output(net, module, images))
        return
    w0 = _weights(module, groups, d, out_pg)
    w = solve(gram, cross, w0, ridge)
    if w is None:
        warnings.warn(f"{layer.name}: the least-squares system is unstable; refit by bias compensation instead",
                      ReconstructionWarning, stacklevel=3)
        _set_bias(module, mean_t - _mean_output(net, module, images))
        return
    _set_weights(module, w, groups, d, out_pg)


def solve(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, ridge: float) -> torch.Tensor | None:
    """Per group ``g``: ``argmin_W |X W - Y|^2 + lambda |W - W0|^2`` from ``gram = X^T X`` ``(g, D, D)`` and
    ``cross = X^T Y`` ``(g, D, out)``, with ``lambda = ridge * mean(diag(gram))``; None when the solve fails."""
    diag = torch.diagonal(gram, dim1=1, dim2=2)
    lam = ridge * diag.mean(1).clamp_min(1e-12)
    a = gram + lam[:, None, None] * torch.eye(gram.shape[1], dtype=gram.dtype)
    b = cross + lam[:, None, None] * w0.double()
    chol, info = torch.linalg.cholesky_ex(a)
    if bool((info != 0).any()):
        return None
    w = torch.cholesky_solve(b, chol)
    return w if bool(torch.isfinite(w).all()) else None


def _weights(module, groups, d, out_pg) -> torch.Tensor:
    """The module's weights and bias as ``(groups, d + 1, out_per_group)``, the layout :func:`solve` uses."""
    w = module.weight.detach().reshape(groups, out_pg, d).double().cpu()
    b = module.bias.detach().double().cpu() if module.bias is not None else torch.zeros(module.weight.shape[0],
                                                                                         dtype=torch.float64)
    return torch.cat([w, b.reshape(groups, out_pg, 1)], 2).transpose(1, 2)


def _set_weights(module, w, groups, d, out_pg) -> None:
    w = w.transpose(1, 2)  # (g, out_pg, d + 1)
    weight = w[..., :d].reshape(module.weight.shape).to(module.weight)
    bias = w[..., d].reshape(-1)
    module.weight.data.copy_(weight)
    _set_bias(module, bias, absolute=True)


def _set_bias(module, value: torch.Tensor, *, absolute: bool = False) -> None:
    value = value.to(module.weight)
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(module.weight.shape[0], dtype=module.weight.dtype,
                                               device=module.weight.device))
    with torch.no_grad():
        if absolute:
            module.bias.copy_(value)
        else:
            module.bias.add_(value)


def _mean_output(net, module, images) -> torch.Tensor:
    """The mean of each output channel of ``module`` in ``net`` over ``images`` (a forward stopped there)."""
    acc = {"sum": None, "n": 0}

    def hook(m, args, y):
        chan = y.transpose(0, 1).reshape(y.shape[1], -1) if isinstance(m, nn.Conv2d) else y.reshape(-1, y.shape[-1]).T
        s = chan.double().sum(1).cpu()
        acc["sum"] = s if acc["sum"] is None else acc["sum"] + s
        acc["n"] += chan.shape[1]
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        for b in images:
            try:
                net(b.to(_device(net)))
            except _Stop:
                pass
    finally:
        handle.remove()
    return acc["sum"] / acc["n"]


# ---------------------------------------------------------------------------------------------- the cheap variant
class TeacherGrams:
    """The teacher's per-layer Gram matrices ``X^T X`` over its own inputs (sampled as in :func:`reconstruct`), for
    every conv (``groups == 1``) or linear layer whose inputs a plan can cut. :meth:`refit` then refits a pruned
    model's layers from the teacher's inputs at the kept channels: since the teacher's output is ``X W^T + b``,
    ``X_kept^T Y = G[kept, :] W^T``, so a candidate costs a slice and a small solve per layer, no forward pass.
    Only columns that ever see a non-zero input are stored (a 3x3 conv at 1x1 keeps its centre tap)."""

    def __init__(self, grams: dict, ridge: float):
        self.grams = grams  # layer -> (live column indices, Gram over them, float64)
        self.ridge = ridge

    @classmethod
    def collect(cls, teacher: nn.Module, space: PruningSpace, batches, *, positions: int = 16, ridge: float = 1e-3,
                seed: int = 0) -> "TeacherGrams":
        images = calibration_images(batches, space)
        consumers = {c.module for g in space.groups for c in g.consumers}
        modules = dict(teacher.named_modules())
        names = [n for n in modules if n in consumers and type(modules[n]) in REFIT_TYPES
                 and getattr(modules[n], "groups", 1) == 1]
        acc: dict[str, torch.Tensor] = {}
        calls: dict[str, int] = {}
        handles = []
        for k, name in enumerate(names):
            gen = torch.Generator().manual_seed(seed * 100_003 + k)

            def hook(m, args, y, name=name, gen=gen):
                calls[name] = calls.get(name, 0) + 1
                idx = _positions(y, positions, gen) if isinstance(m, nn.Conv2d) else None
                x = _rows(m, args[0], idx).float()
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
                g = (x.T @ x).double().cpu()  # float32 products per batch, summed in float64
                acc[name] = g if name not in acc else acc[name] + g

            handles.append(modules[name].register_forward_hook(hook))
        was = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                for b in images:
                    teacher(b.to(_device(teacher)))
        finally:
            teacher.train(was)
            for h in handles:
                h.remove()
        grams = {}
        for name, g in acc.items():
            if calls[name] != len(images) or not bool(torch.isfinite(g).all()):
                continue  # run more than once per forward, or non-finite: not refit
            live = torch.nonzero(torch.diagonal(g) > 0).flatten()
            grams[name] = (live, g[live][:, live].contiguous())
        return cls(grams, ridge)

    def refit(self, teacher: nn.Module, net: nn.Module, plan: PruningPlan, space: PruningSpace) -> nn.Module:
        """Refit, in place, every layer of ``net`` (``slice_plan(teacher, plan, space)``) whose inputs lost channels,
        from the teacher's inputs at the kept channels. Returns ``net``."""
        t_modules, modules = dict(teacher.named_modules()), dict(net.named_modules())
        for name, (out_drop, in_drop) in channel_maps(teacher, plan, space).items():
            if not in_drop or name not in self.grams or name not in modules:
                continue
            t, m = t_modules[name], modules[name]
            taps = _taps(t)
            in_width = t.weight.shape[1]
            kept_in = torch.tensor([c for c in range(in_width) if c not in in_drop], dtype=torch.long)
            kept_out = torch.tensor([c for c in range(_out_width(t)) if c not in out_drop], dtype=torch.long)
            cols = torch.cat([(kept_in[:, None] * taps + torch.arange(taps)).flatten(),
                              torch.tensor([in_width * taps])])  # kept input columns, then the bias column
            live, gram = self.grams[name]
            w_t = torch.cat([t.weight.detach().reshape(t.weight.shape[0], -1).double().cpu(),
                             (t.bias.detach().double().cpu() if t.bias is not None
                              else torch.zeros(t.weight.shape[0], dtype=torch.float64))[:, None]], 1)[kept_out]
            pos = torch.full((in_width * taps + 1,), -1, dtype=torch.long)
            pos[live] = torch.arange(len(live))
            k_pos = pos[cols]
            sel = k_pos >= 0  # kept columns that see data; the others keep the teacher's weight
            a = gram[k_pos[sel]][:, k_pos[sel]]
            b = gram[k_pos[sel]] @ w_t[:, live].T
            w = solve(a[None], b[None], w_t[:, cols[sel]].T[None], self.ridge)
            if w is None:
                continue
            new = w_t[:, cols].clone()
            new[:, sel] = w[0].T
            m.weight.data.copy_(new[:, :-1].reshape(m.weight.shape).to(m.weight))
            _set_bias(m, new[:, -1], absolute=True)
        return net

    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for _, g in self.grams.values())


__all__ = ["reconstruct", "TeacherGrams", "ReconstructionWarning", "METHODS", "solve", "check_method",
           "calibration_images", "calibration_subset", "CALIB_IMAGES"]
