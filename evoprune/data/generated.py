"""Generated image data for the built-in demo and the tests: a small classification task that needs no download."""
from __future__ import annotations

import torch

from ..errors import ConfigError
from .sets import ImageData, ImageSet


def synthetic(n_train: int = 2000, n_val: int = 1000, *, classes: int = 4, size: int = 16, noise: float = 0.35,
              seed: int = 0) -> ImageData:
    """A small generated image classification task: each class is a fixed random smooth colour pattern; a sample is
    its class pattern, randomly shifted by up to 2 pixels and contrast-jittered, plus pixel noise. ``noise`` sets
    how hard it is. It uses the same uint8 layout (and, loosely, the statistics) of CIFAR-10, and carries CIFAR-10's
    normalisation statistics like any loaded data."""
    if classes < 2 or size < 8 or n_train < classes or n_val < classes:
        raise ConfigError("synthetic data need >= 2 classes, size >= 8 and at least one image per class per split")
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(classes, 3, 4, 4, generator=gen)
    templates = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def draw(n):
        labels = torch.arange(n) % classes
        labels = labels[torch.randperm(n, generator=gen)]
        shifts = torch.randint(-2, 3, (n, 2), generator=gen)
        base = templates[labels]
        images = torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(1, 2)) for img, (dy, dx) in zip(base, shifts)])
        contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen)
        images = 0.5 + contrast * (images - 0.5) + noise * torch.randn(images.shape, generator=gen)
        return ImageSet((images.clamp(0, 1) * 255).round().to(torch.uint8), labels.long(),
                        [f"class{c}" for c in range(classes)])

    return ImageData(draw(n_train), draw(n_val))
