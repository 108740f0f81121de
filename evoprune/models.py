"""Models: the CIFAR-sized CNNs (VGG-BN, ResNet-18, a tiny test network) and strict weight loading (the checks every
model passes before evoprune uses it are in :mod:`evoprune.netinfo`).

Every builder returns a freshly initialised ``nn.Module`` whose layout matches the checkpoints evoprune ships with
(``vgg16_bn_cifar`` loads ``shared/models/vgg16_bn_cifar10.pt`` with ``strict=True``). Models take RGB images scaled
to [0, 1] and normalised with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence, Union

import torch
import torchvision
from torch import nn

from .errors import ConfigError, ModelError
from .storage import load_state_dict

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)

#: A VGG layer config: an int n is a conv-BN-ReLU unit with n output channels, "M" is a 2x2 max-pool.
VGGConfig = Sequence[Union[int, str]]

VGG11_CFG: VGGConfig = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
VGG16_CFG: VGGConfig = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """The three modules of one unit: ``Conv2d(3x3, padding 1, no bias)``, ``BatchNorm2d``, ``ReLU(inplace)``."""
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def init_weights(model: nn.Module) -> nn.Module:
    """Kaiming-normal convs, unit BN, small normal linear layers (the torchvision VGG initialisation)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
    return model


class VGGCifar(nn.Module):
    """VGG with batch norm for 32x32 inputs: ``classifier(flatten(features(x), 1))``.

    ``features`` is one flat ``nn.Sequential`` (conv, BN, ReLU per unit; ``MaxPool2d(2)`` per "M"), so VGG16 has
    module indices 0-43; five pools bring 32x32 down to 1x1 and ``classifier`` is a single ``Linear(512, classes)``.
    """

    def __init__(self, cfg: VGGConfig, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            elif isinstance(item, int) and item > 0:
                layers += conv_bn_relu(channels, item)
                channels = item
            else:
                raise ConfigError(f"VGG config entries must be positive ints or 'M', not {item!r}")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg_cifar(cfg: VGGConfig, num_classes: int = 10) -> VGGCifar:
    """A :class:`VGGCifar` built from any config (the input must shrink to 1x1 after the pools)."""
    return VGGCifar(cfg, num_classes)


def vgg16_bn_cifar(num_classes: int = 10) -> VGGCifar:
    """VGG16-BN for CIFAR: 14,724,042 parameters with 10 classes; the layout of ``vgg16_bn_cifar10.pt``."""
    return VGGCifar(VGG16_CFG, num_classes)


def vgg11_bn_cifar(num_classes: int = 10) -> VGGCifar:
    """VGG11-BN for CIFAR (config A)."""
    return VGGCifar(VGG11_CFG, num_classes)


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool, the usual CIFAR variant."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def resnet18_tv(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 unchanged, ImageNet stem included (7x7 stride-2 conv, 3x3 stride-2 max-pool): the
    paper's 11.2 M-parameter network, 37.2 M MACs on a 32x32 image, and the layout of
    ``../shared/models/resnet18_tv_cifar10.pt`` (which loads strictly into it)."""
    return torchvision.models.resnet18(num_classes=num_classes)


class TinyCNN(nn.Module):
    """A small CNN for tests and demos (3x16x16 input, about 17k parameters at width 16).

    ``features`` holds four conv-BN-ReLU units and a max-pool: ``3->w, w->w, pool, w->2w, 2w->2w``. Units 1 and 3
    (``features[3]`` and ``features[10]``) keep their channel count, so they can be bypassed. Then global average
    pooling and ``classifier = Linear(2w, num_classes)``.
    """

    def __init__(self, num_classes: int = 4, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(3, width),
            *conv_bn_relu(width, width),
            nn.MaxPool2d(2),
            *conv_bn_relu(width, 2 * width),
            *conv_bn_relu(2 * width, 2 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)
        init_weights(self)
        nn.init.normal_(self.classifier.weight, 0.0, 0.1)  # 0.01 is too timid for so few features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def tiny_cnn(num_classes: int = 4, width: int = 16) -> TinyCNN:
    """A :class:`TinyCNN`."""
    if width < 1:
        raise ConfigError(f"tiny_cnn width must be >= 1, not {width}")
    return TinyCNN(num_classes, width)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg16_bn": vgg16_bn_cifar,
    "vgg11_bn": vgg11_bn_cifar,
    "resnet18": resnet18_cifar,
    "resnet18_tv": resnet18_tv,
    "tiny": tiny_cnn,
}


def build(name: str, num_classes: int = 10) -> nn.Module:
    """Build the model registered in :data:`MODELS` under ``name``."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, not {num_classes!r}")
    return MODELS[name](num_classes=num_classes)


def state_dict_mismatch(model: nn.Module, state: dict) -> list[str]:
    """Human-readable differences between ``model.state_dict()`` and ``state`` (empty if they match)."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:5])}")
    for key, value in state.items():
        if key in expected and getattr(value, "shape", None) != expected[key].shape:
            problems.append(f"{key}: shape {tuple(getattr(value, 'shape', ()))} in the file, "
                            f"{tuple(expected[key].shape)} in the model")
    return problems


DEFAULT_FIT_HINT = "Build the architecture it was saved from (check the model name and num_classes)."


def fit_weights(model: nn.Module, state: dict, where: str | os.PathLike = "state_dict", *,
                hint: str = DEFAULT_FIT_HINT) -> nn.Module:
    """Load the tensors ``state`` into ``model`` strictly; return ``model``.

    Raises :class:`~evoprune.errors.ModelError` listing the missing/unexpected keys and shape mismatches (``where``
    names the source, ``hint`` says what to do) if they were saved from a different architecture.
    """
    problems = state_dict_mismatch(model, state)
    if problems:
        raise ModelError(f"{where}: does not fit {type(model).__name__} ({'; '.join(problems[:8])}). {hint}")
    model.load_state_dict(state, strict=True)
    return model


def load_weights(model: nn.Module, path: str | os.PathLike, *, hint: str = DEFAULT_FIT_HINT) -> nn.Module:
    """Load a state_dict file into ``model`` strictly (tensors only); return ``model``.

    Raises :class:`~evoprune.errors.CheckpointError` if the file is missing or not a tensors-only state_dict (its
    ``reason`` says what the file is instead), and :class:`~evoprune.errors.ModelError` listing the
    missing/unexpected keys and shape mismatches if it was saved from a different architecture (``hint``, what to do
    then, ends that message).
    """
    return fit_weights(model, load_state_dict(path), path, hint=hint)
