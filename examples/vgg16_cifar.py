"""Prune the VGG16-BN CIFAR-10 network with evoprune's genetic algorithm (the paper's VGG16 experiment).

    python -m scoop -n 2 examples/vgg16_cifar.py --data ../shared/data/cifar10-jpeg-trainval.tar.gz \\
        --weights ../shared/models/vgg16_bn_cifar10.pt --out runs/vgg16

The paper's protocol (T=5 rounds of N=30, K=5, p_c=0.6, p_mut=0.6; lsq reconstruction and a 1-epoch KD fine-tune
after each round) down to the paper's 0.3 M parameters, as ``benchmarks/b2_paper_protocol.py --arch vgg16_bn`` runs
it (BENCHMARKS.md, B2)::

    python -m scoop -n 2 examples/vgg16_cifar.py --data ../shared/data/cifar10-jpeg-trainval.tar.gz \
        --weights ../shared/models/vgg16_bn_cifar10.pt --out runs/vgg16 --rounds 5 --population 30 --elites 5 \
        --p-c 0.6 --p-mut 0.6 --generations 4 --target-params 0.02037 --finetune-epochs 1

(0.02037 = 0.3 M / 14.72 M: ``--target-params`` is a fraction of the teacher's parameters, like ``--target-macs`` of its
MACs.) Without ``python -m scoop`` it runs serially. Without ``--weights`` it trains (and caches) a baseline first.
Writes round{k}.pt / .pt2 / .onnx / .json, report.md, report.json, pareto.png and logbook.csv into --out.

For a latency target on the deployment runtime instead of a MACs fraction: ``--target-latency-ms MS`` (ONNX Runtime
on the CPU by default: ``--runtime``, ``--latency-batch``, ``--threads``; needs ``pip install 'evoprune[onnx]'``).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import exit_code, main  # noqa: E402

from evoprune.models import vgg16_bn_cifar  # noqa: E402

if __name__ == "__main__":
    exit_code(main(vgg16_bn_cifar, "evoprune: VGG16-BN on CIFAR-10"))
