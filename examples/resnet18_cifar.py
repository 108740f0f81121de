"""Prune the paper's ResNet-18 on CIFAR-10 with evoprune's genetic algorithm (the paper's ResNet18 experiment).

    python -m scoop -n 2 examples/resnet18_cifar.py --data ../shared/data/cifar10-jpeg-trainval.tar.gz \\
        --weights ../shared/models/resnet18_tv_cifar10.pt --out runs/resnet18

The paper's protocol (T=5 rounds of N=30, K=5, p_c=0.6, p_mut=0.6; lsq reconstruction and a 1-epoch KD fine-tune
after each round) down to the paper's 0.1 M parameters (0.1 M / 11.18 M), as ``benchmarks/b2_paper_protocol.py
--arch resnet18_tv`` runs it (BENCHMARKS.md, B2)::

    python -m scoop -n 2 examples/resnet18_cifar.py --data ../shared/data/cifar10-jpeg-trainval.tar.gz \
        --weights ../shared/models/resnet18_tv_cifar10.pt --out runs/resnet18 --rounds 5 --population 30 \
        --elites 5 --p-c 0.6 --p-mut 0.6 --generations 4 --target-params 0.0089432 --finetune-epochs 1

The network is torchvision's ResNet-18 with its ImageNet stem (``evoprune.models.resnet18_tv``, ``--arch
resnet18_tv`` in the CLI): 11.2 M parameters, 37.2 M MACs at 32x32, the layout of the shared teacher. Residual
blocks with an identity shortcut become connection genes: cutting one bypasses the block. Without ``--weights`` a
baseline is trained first (``--baseline-epochs``) and cached in --out. (``evoprune prune --arch resnet18`` is the
CIFAR-stem variant, 557 M MACs.)

For a latency target on the deployment runtime instead of a MACs fraction: ``--target-latency-ms MS`` (ONNX Runtime
on the CPU by default: ``--runtime``, ``--latency-batch``, ``--threads``; needs ``pip install 'evoprune[onnx]'``).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import exit_code, main  # noqa: E402

from evoprune.models import resnet18_tv  # noqa: E402

if __name__ == "__main__":
    exit_code(main(resnet18_tv, "evoprune: ResNet-18 (torchvision, ImageNet stem) on CIFAR-10"))
