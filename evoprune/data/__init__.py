"""Image data for evoprune, held in memory as uint8 tensors: loading, splits, normalisation and batches.

- :mod:`~evoprune.data.loading`: :func:`load_images` reads an ImageFolder tree (``train/<class>/*`` +
  ``val/<class>/*``), a tar archive of one, or torchvision's CIFAR-10 folder (:func:`load_torchvision_cifar10`,
  which can download it) as :class:`ImageData` ``(train, val)``;
- :mod:`~evoprune.data.decoding`: decodes image files with PIL and caches the decoded splits;
- :mod:`~evoprune.data.sets`: :class:`ImageSet` (one split: stratified splits and samples) and :class:`ImageData`,
  with the :class:`ChannelStats` their images are normalised with (CIFAR-10's by default; :func:`channel_stats`
  computes a set's own);
- :mod:`~evoprune.data.batching`: :func:`augment`, :func:`normalize` and :func:`batches` for training and evaluation;
- :mod:`~evoprune.data.generated`: :func:`synthetic`, generated data for the demo and the tests.
"""
from .batching import augment, batches, normalize, num_batches
from .decoding import decode_images, default_cache_dir
from .generated import synthetic
from .loading import ACCEPTED_FORMS, load_images, load_torchvision_cifar10
from .sets import (CIFAR10_STATS, NORMALIZATIONS, ChannelStats, ImageData, ImageSet, channel_stats, normalized,
                   parse_normalization)

__all__ = [
    "ACCEPTED_FORMS", "CIFAR10_STATS", "ChannelStats", "ImageData", "ImageSet", "augment", "batches", "channel_stats",
    "decode_images", "default_cache_dir", "load_images", "load_torchvision_cifar10", "normalize", "normalized",
    "num_batches", "parse_normalization", "NORMALIZATIONS", "synthetic",
]
