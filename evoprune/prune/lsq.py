"""Least-squares building blocks of the layer refit (:mod:`evoprune.prune.refit`, :mod:`evoprune.prune.grams`): the
calibration images, a layer's inputs and outputs as sampled rows, the ridge solve, and setting a bias.

A conv's inputs become rows of patches (``F.unfold``) at a few sampled output positions per image; a linear's
inputs are its rows. :func:`solve` solves ``argmin |X W - Y|^2 + lambda |W - W0|^2`` per group from the normal
equations in float64, with ``lambda = ridge * mean(diag(X^T X))``: scale-free, and pulling towards the current
weights ``W0`` (the teacher's, sliced), so a direction the images never excite keeps the teacher's weight.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DataError
from ..space.pruning_space import PruningSpace

CALIB_IMAGES = 1024  # default calibration images: enough for the widest layers at 16 positions an image (B6)
REFIT_TYPES = (nn.Conv2d, nn.Linear)


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



def out_width(m):
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def depthwise(m) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def device_of(model):
    p = next(iter([*model.parameters(), *model.buffers()]), None)
    return p.device if p is not None else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- sampling
def input_rows(module, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """The layer's inputs as rows ``(samples, in_channels * kh * kw)``: conv patches at the sampled output positions
    ``idx`` (``(N, p)`` flat indices), or linear inputs with leading dims flattened."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if module.padding_mode == "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice)
    else:
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    rows = []
    chunk = max(1, int(2 ** 25 // max(1, x[0].numel() * taps(module))))  # bound unfold's memory
    for i in range(0, len(x), chunk):
        cols = F.unfold(x[i:i + chunk], module.kernel_size, dilation=module.dilation, stride=module.stride)
        j = idx[i:i + chunk]
        cols = cols.gather(2, j.unsqueeze(1).expand(-1, cols.shape[1], -1))  # (n, C*kk, p)
        rows.append(cols.permute(0, 2, 1).reshape(-1, cols.shape[1]))
    return torch.cat(rows)


def taps(module):
    return int(np.prod(module.kernel_size)) if isinstance(module, nn.Conv2d) else 1


def output_rows(module, y: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """A layer's outputs as rows ``(samples, out_channels)`` at the same samples as :func:`_rows`."""
    if isinstance(module, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    flat = y.flatten(2)
    return flat.gather(2, idx.unsqueeze(1).expand(-1, flat.shape[1], -1)).permute(0, 2, 1).reshape(-1, flat.shape[1])


def positions_of(y, positions, gen) -> torch.Tensor | None:
    """``(N, p)`` sampled flat output positions per image (all of them when there are at most ``positions``)."""
    if y.dim() != 4:
        return None
    n, hw = y.shape[0], y.shape[2] * y.shape[3]
    if hw <= positions:
        return torch.arange(hw, device=y.device).expand(n, hw)
    return torch.rand(n, hw, generator=gen).argsort(dim=1)[:, :positions].to(y.device)


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


def add_bias(module, value: torch.Tensor, *, absolute: bool = False) -> None:
    value = value.to(module.weight)
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(module.weight.shape[0], dtype=module.weight.dtype,
                                               device=module.weight.device))
    with torch.no_grad():
        if absolute:
            module.bias.copy_(value)
        else:
            module.bias.add_(value)


__all__ = ["CALIB_IMAGES", "REFIT_TYPES", "calibration_images", "calibration_subset", "input_rows", "output_rows",
           "positions_of", "taps", "out_width", "depthwise", "device_of", "solve", "add_bias"]
