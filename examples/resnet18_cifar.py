"""Prune a CIFAR-10 ResNet-18 with evoprune's genetic algorithm (the paper's ResNet18 experiment).

    python -m scoop -n 2 examples/resnet18_cifar.py --data ../shared/data/cifar10-jpeg-trainval.tar.gz \\
        --weights resnet18_cifar10.pt --out runs/resnet18

Residual blocks with an identity shortcut become connection genes: cutting one bypasses the block. Without
``--weights`` a baseline is trained first (``--baseline-epochs``) and cached in --out.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import exit_code, main  # noqa: E402

from evoprune.models import resnet18_cifar  # noqa: E402

if __name__ == "__main__":
    exit_code(main(resnet18_cifar, "evoprune: ResNet-18 on CIFAR-10"))
