"""Image sets in memory: :class:`ImageSet` (one split), :class:`ImageData` (train + val) and their normalisation
statistics (:class:`ChannelStats`, :func:`channel_stats`).

Images are uint8 ``N x C x H x W`` tensors. Each set carries the per-channel mean and standard deviation its images
are normalised with (:attr:`ImageSet.stats`); CIFAR-10's are the default, which is what the shipped CIFAR models
expect. Data of another kind should carry their own: ``data.with_train_stats()`` computes them from the training
images, ``data.with_stats(ChannelStats(mean, std))`` sets given ones.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

import torch

from ..errors import ConfigError, DataError
from ..models import CIFAR10_MEAN, CIFAR10_STD

# ----------------------------------------------------------------------------------------------------------------
# Normalisation statistics
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChannelStats:
    """Per-channel ``mean`` and ``std`` of images scaled to [0, 1]: ``normalize`` maps ``x`` to ``(x - mean) / std``.

    Unpacks as ``mean, std`` (``normalize(batch, *stats)``). Raises :class:`ConfigError` (``setting`` ``"mean"`` or
    ``"std"``, for a command line to name its flag) unless both have the same number (>= 1) of finite values and
    every ``std`` is > 0.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        mean, std = (stats_values(name, values) for name, values in (("mean", self.mean), ("std", self.std)))
        if len(mean) != len(std):
            raise ConfigError(f"has {len(std)} value(s) but mean has {len(mean)}: give one mean and one std per "
                              "image channel", setting="std")
        if any(s <= 0 for s in std):
            raise ConfigError(f"must be > 0 for every channel, got {std}: a channel with no spread cannot be "
                              "normalised", setting="std")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def __iter__(self):
        return iter((self.mean, self.std))

    def __len__(self) -> int:
        return len(self.mean)

    def __str__(self) -> str:
        return (f"mean ({', '.join(f'{m:.4f}' for m in self.mean)}), "
                f"std ({', '.join(f'{s:.4f}' for s in self.std)})")


def stats_values(name: str, values) -> tuple[float, ...]:
    """``values`` as a non-empty tuple of finite floats, or :class:`ConfigError` naming ``name``."""
    try:
        if isinstance(values, (str, bytes)):
            raise TypeError(values)
        floats = tuple(float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values))
    except (TypeError, ValueError):
        raise ConfigError(f"must be a sequence of numbers, one per image channel, got {values!r}",
                          setting=name) from None
    if not floats or not all(math.isfinite(v) for v in floats):
        raise ConfigError(f"must hold one finite number per image channel, got {floats}", setting=name)
    return floats


#: The statistics of CIFAR-10's training images, which the shipped CIFAR models were trained with.
CIFAR10_STATS = ChannelStats(CIFAR10_MEAN, CIFAR10_STD)

#: Pixel values :func:`channel_stats` sums at once (8 bytes each, twice): bounds its memory.
STATS_CHUNK_VALUES = 2 ** 22


def as_stats(stats) -> ChannelStats:
    """``stats`` as :class:`ChannelStats`: one already, or a ``(mean, std)`` pair."""
    if isinstance(stats, ChannelStats):
        return stats
    if isinstance(stats, (str, bytes)) or not isinstance(stats, Sequence) or len(stats) != 2:
        raise ConfigError(f"normalisation statistics must be a ChannelStats or a (mean, std) pair, not {stats!r}")
    return ChannelStats(*stats)


def channel_stats(imageset: "ImageSet") -> ChannelStats:
    """The per-channel mean and (population) standard deviation of ``imageset``'s pixels, scaled to [0, 1].

    Compute them on the training images and normalise every split with them (:meth:`ImageData.with_train_stats`).
    The sums are exact (integers), in chunks, so any set size fits in memory. Raises :class:`DataError` for an
    empty set or a channel with the same value everywhere (its std is 0).
    """
    if not isinstance(imageset, ImageSet):
        raise DataError(f"channel_stats needs an ImageSet, not {type(imageset).__name__}")
    if len(imageset) == 0:
        raise DataError("channel_stats: the image set is empty; compute the statistics on the training images")
    images = imageset.images
    channels = images.shape[1]
    rows = max(1, STATS_CHUNK_VALUES // max(1, images[0].numel()))
    total = torch.zeros(channels, dtype=torch.int64)
    squares = torch.zeros(channels, dtype=torch.int64)
    for start in range(0, len(imageset), rows):
        chunk = images[start:start + rows].to(torch.int64).transpose(0, 1).reshape(channels, -1)
        total += chunk.sum(1)
        squares += (chunk * chunk).sum(1)
    count = images.numel() // channels
    mean = total.double() / (count * 255.0)
    variance = (squares.double() / (count * 255.0 ** 2) - mean ** 2).clamp(min=0.0)
    std = variance.sqrt()
    flat = [c for c in range(channels) if std[c] * 255.0 < 1e-6]
    if flat:
        raise DataError(f"channel_stats: channel(s) {flat} have the same value in every image, so their std is 0 "
                        "and they cannot be normalised; pass a ChannelStats with std > 0 instead")
    return ChannelStats(tuple(mean.tolist()), tuple(std.tolist()))


# ----------------------------------------------------------------------------------------------------------------
# One split
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class ImageSet:
    """Images as a uint8 tensor ``N x C x H x W``, int64 labels ``N``, the class names labels index into, and the
    :class:`ChannelStats` the images are normalised with (default: CIFAR-10's, :data:`CIFAR10_STATS`)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    stats: ChannelStats = CIFAR10_STATS

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"ImageSet images must be a uint8 N x C x H x W tensor, not {self.images.dtype} "
                            f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise DataError(f"ImageSet labels must be an int64 tensor of length {self.images.shape[0]}, not "
                            f"{self.labels.dtype} {tuple(self.labels.shape)}")
        self.classes = list(self.classes)
        self.stats = as_stats(self.stats)
        if len(self.stats) != self.images.shape[1]:
            raise ConfigError(f"normalisation mean and std have {len(self.stats)} value(s) but the images have "
                              f"{self.images.shape[1]} channel(s); give one mean and one std per image channel")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        stats = "" if self.stats == CIFAR10_STATS else f", normalised with {self.stats}"
        return f"ImageSet({len(self)} images {tuple(self.images.shape[1:])}, {len(self.classes)} classes{stats})"

    def with_stats(self, stats) -> "ImageSet":
        """The same images (not copied) normalised with ``stats`` (a :class:`ChannelStats` or ``(mean, std)``)."""
        return replace(self, stats=as_stats(stats))

    def subset(self, index) -> "ImageSet":
        """The images at ``index`` (a tensor, array, list of ints or a boolean mask), as a new set."""
        index = torch.as_tensor(index)
        if index.dtype != torch.bool:
            index = index.long()
        return ImageSet(self.images[index], self.labels[index], self.classes, self.stats)

    def fingerprint(self) -> str:
        """A short digest of the labels and a sample of the pixels: which data a cached result came from."""
        h = hashlib.sha1(self.labels.numpy().tobytes())
        h.update(self.images.reshape(-1)[:: 997].numpy().tobytes())
        h.update(str(tuple(self.images.shape)).encode())
        return h.hexdigest()[:10]

    def class_counts(self) -> torch.Tensor:
        """Number of images of each class, indexed like :attr:`classes`."""
        return torch.bincount(self.labels, minlength=len(self.classes))

    def stratified_split(self, size: float | int, seed: int = 0) -> tuple["ImageSet", "ImageSet"]:
        """Split into ``(a, b)`` with the class proportions of the whole set kept in both parts.

        ``size`` is the share of images that go to ``a``: a float in (0, 1) or an int count in [1, len - 1]. Each
        class's images are permuted with ``seed`` and the first ones go to ``a``; the per-class counts are rounded by
        largest remainder so that ``len(a)`` is exact. Both parts keep the original order of their images.
        """
        in_a = self._stratified_mask(self._split_count(size), seed)
        return self.subset(in_a), self.subset(~in_a)

    def stratified_sample(self, n: int, seed: int = 0) -> "ImageSet":
        """``n`` images drawn without replacement, class-stratified and seeded; ``n == len`` returns a copy."""
        if isinstance(n, int) and n == len(self):
            return self.subset(torch.arange(len(self)))
        return self.stratified_split(n, seed)[0]

    def _split_count(self, size: float | int) -> int:
        total = len(self)
        if isinstance(size, bool) or not isinstance(size, (int, float)):
            raise ConfigError(f"split size must be a fraction in (0, 1) or an image count, not {size!r}")
        if isinstance(size, float):
            if not 0.0 < size < 1.0:
                raise ConfigError(f"split fraction must be in (0, 1), not {size}")
            size = round(size * total)
        if not 0 < size < total:
            raise ConfigError(f"cannot split {total} images into parts of {size} and {total - size}: "
                              "both parts need at least one image")
        return size

    def _stratified_mask(self, count: int, seed: int) -> torch.Tensor:
        counts = self.class_counts()
        share = counts.double() * count / len(self)
        take = share.floor().long()
        remainder_order = torch.argsort(share - take, descending=True, stable=True)
        take[remainder_order[: count - int(take.sum())]] += 1
        generator = torch.Generator().manual_seed(seed)
        mask = torch.zeros(len(self), dtype=torch.bool)
        for label in range(len(self.classes)):
            members = torch.nonzero(self.labels == label).flatten()
            chosen = members[torch.randperm(len(members), generator=generator)[: int(take[label])]]
            mask[chosen] = True
        return mask


# ----------------------------------------------------------------------------------------------------------------
# Train + val
# ----------------------------------------------------------------------------------------------------------------

class ImageData(NamedTuple):
    """The ``(train, val)`` image sets of a data source; unpacks like a tuple. Both carry the same statistics."""

    train: ImageSet
    val: ImageSet

    @property
    def stats(self) -> ChannelStats:
        """The normalisation statistics of the training images (what a model trained on them expects)."""
        return self.train.stats

    def with_stats(self, stats) -> "ImageData":
        """Both sets normalised with ``stats``: a :class:`ChannelStats` or a ``(mean, std)`` pair."""
        stats = as_stats(stats)
        return ImageData(self.train.with_stats(stats), self.val.with_stats(stats))

    def with_train_stats(self) -> "ImageData":
        """Both sets normalised with the statistics of the training images (:func:`channel_stats`)."""
        return self.with_stats(channel_stats(self.train))

    def describe(self) -> str:
        """``50000 train + 10000 val images (3x32x32, 10 classes)``."""
        shape = "x".join(str(d) for d in self.train.images.shape[1:])
        return (f"{len(self.train)} train + {len(self.val)} val images ({shape}, "
                f"{len(self.train.classes)} classes)")


NORMALIZATIONS = ("data", "train")


def parse_normalization(spec: str) -> "ChannelStats | str":
    """A normalisation setting: ``"data"`` (the data's own statistics, CIFAR-10's unless set), ``"train"`` (computed
    from the training images) or ``"M1,M2,M3/S1,S2,S3"`` (a mean and std per channel). :class:`ConfigError`
    (``setting="normalize"``) for anything else."""
    if spec in NORMALIZATIONS:
        return spec
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in str(spec).split("/"))
        return ChannelStats(mean, std)
    except (ValueError, ConfigError) as exc:
        detail = f" ({exc})" if isinstance(exc, ConfigError) else ""
        raise ConfigError(f"must be data, train or MEAN/STD as comma-separated values per channel (e.g. "
                          f"0.5,0.5,0.5/0.25,0.25,0.25), got {spec!r}{detail}", setting="normalize") from None


def normalized(data: "ImageData", spec: str) -> "ImageData":
    """``data`` with the statistics a normalisation setting names (:func:`parse_normalization`)."""
    stats = parse_normalization(spec)
    if stats == "data":
        return data
    return data.with_train_stats() if stats == "train" else data.with_stats(stats)
