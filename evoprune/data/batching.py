"""Batches for training and evaluation: whole-batch augmentation (:func:`augment`), normalisation
(:func:`normalize`) and the iterator that ties them together (:func:`batches`), on tensors on any device."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..errors import ConfigError, DataError
from ..models import CIFAR10_MEAN, CIFAR10_STD
from .sets import ImageSet


def augment(batch: torch.Tensor, generator: torch.Generator | None = None, *, padding: int = 4) -> torch.Tensor:
    """Random crop with ``padding``-pixel reflect padding, then random horizontal flip, for a whole batch at once.

    ``batch`` is ``N x C x H x W`` of any dtype (uint8 or float) on any device; the result has the same shape, dtype
    and device. Each image gets its own offsets and flip, drawn from ``generator`` (a CPU generator). The padding is
    never materialised: each output pixel is gathered from its reflected source position.
    """
    if batch.dim() != 4:
        raise DataError(f"augment expects an N x C x H x W batch, not shape {tuple(batch.shape)}")
    n, c, h, w = batch.shape
    if not 0 <= padding < min(h, w):
        raise ConfigError(f"reflect padding must be in [0, {min(h, w) - 1}] for {h}x{w} images, not {padding}")
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = reflect_index(h, padding)[offsets[0, :, None] + torch.arange(h)]            # n x h
    cols = reflect_index(w, padding)[offsets[1, :, None] + torch.arange(w)]            # n x w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    source = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, h * w).to(batch.device)
    return batch.reshape(n, c, h * w).gather(2, source.expand(n, c, h * w)).reshape(n, c, h, w)


def reflect_index(size: int, padding: int) -> torch.Tensor:
    """Source index of each position of a reflect-padded axis: ``[p, ..., 1, 0, 1, ..., size-1, size-2, ...]``."""
    position = torch.arange(-padding, size + padding).abs()
    return torch.where(position >= size, 2 * (size - 1) - position, position)


_augment = augment  # `batches` has a flag of the same name


def normalize(batch: torch.Tensor, mean: Sequence[float] = CIFAR10_MEAN,
              std: Sequence[float] = CIFAR10_STD) -> torch.Tensor:
    """uint8 ``N x C x H x W`` in [0, 255] -> float32 ``(x / 255 - mean) / std`` per channel, on the batch's device.

    ``mean`` and ``std`` hold one value per channel (or one for all); CIFAR-10's are only the default. Pass the
    statistics of the data instead: ``normalize(batch, *imageset.stats)`` (see :class:`~evoprune.data.ChannelStats`
    and :func:`~evoprune.data.channel_stats`).
    """
    if batch.dim() != 4:
        raise DataError(f"normalize expects an N x C x H x W batch, not shape {tuple(batch.shape)}")
    channels = batch.shape[1]
    if not isinstance(std, torch.Tensor):  # checked on the CPU: no device sync per batch
        std = torch.as_tensor(std, dtype=torch.float32)
        if not bool((std > 0).all()):
            raise ConfigError(f"must be > 0 for every channel, got {std.tolist()}", setting="std")
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=batch.device).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=batch.device).reshape(-1)
    for name, values in (("mean", mean_t), ("std", std_t)):
        if values.numel() not in (1, channels):
            raise ConfigError(f"has {values.numel()} value(s) but the batch has {channels} channels; give one "
                              "value per channel", setting=name)
    return (batch.to(torch.float32) / 255.0 - mean_t.view(1, -1, 1, 1)) / std_t.view(1, -1, 1, 1)


def batches(imageset: ImageSet, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
            augment: bool = False, device: str | torch.device = "cpu", drop_last: bool = False,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, labels)``: normalised float32 images and int64 labels on ``device``.

    The images are normalised with ``imageset.stats`` unless ``mean`` / ``std`` are given. ``shuffle`` draws a fresh
    order from ``generator`` each call; ``augment`` applies :func:`augment` (on ``device``, to the uint8 images
    before normalising). ``drop_last`` drops a final batch smaller than ``batch_size``.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, not {batch_size}")
    mean = imageset.stats.mean if mean is None else mean
    std = imageset.stats.std if std is None else std
    total = len(imageset)
    order = torch.randperm(total, generator=generator) if shuffle else None
    stop = total - total % batch_size if drop_last else total
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size] if order is not None else slice(start, start + batch_size)
        images = imageset.images[index].to(device, non_blocking=True)
        labels = imageset.labels[index].to(device, non_blocking=True)
        if augment:
            images = _augment(images, generator)
        yield normalize(images, mean, std), labels


def num_batches(imageset: ImageSet, batch_size: int, *, drop_last: bool = False) -> int:
    """How many batches :func:`batches` yields."""
    return len(imageset) // batch_size if drop_last else -(-len(imageset) // batch_size)
