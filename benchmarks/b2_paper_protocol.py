"""B2, the paper's protocol on VGG16: N=30, K=5, p_c=0.6, p_mut=0.6, T=5 rounds, fine-tuning between rounds.

    python benchmarks/b2_paper_protocol.py --quick     # 1 generation per round, short fine-tunes
    python benchmarks/b2_paper_protocol.py

It runs the same job as ``examples/vgg16_cifar.py`` (report files in benchmarks/results/b2_run[_quick]/) and
writes benchmarks/results/b2_paper_protocol[_quick].json with our per-round rows and per-layer widths beside the
paper's Tables 2, 3 and 5. MACs are torch-pruning's count (the paper's "FLOPS" column is quoted as printed).
ResNet18 is not run here: it has no trained teacher in ../shared (see BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evoprune import job  # noqa: E402
from evoprune.data import load_images  # noqa: E402
from evoprune.models import load_weights, vgg16_bn_cifar  # noqa: E402
from evoprune.storage import write_json  # noqa: E402

SHARED = ROOT.parent / "shared"
PAPER_TABLE2_VGG16 = [  # round, params M, MB, top-1, reduction %, FLOPS 1e6 (as printed)
    (1, 13.2, 53.438, 0.8571, 7, 60.1), (2, 3.1, 11.882, 0.8597, 21, 48.5), (3, 0.9, 3.578, 0.8551, 29, 40.8),
    (4, 0.5, 1.787, 0.8473, 55, 29.5), (5, 0.3, 1.243, 0.8374, 60, 11.2)]
PAPER_TABLE3_VGG16_S = [543.81, 491.52, 488.79, 246.66, 219.34]
PAPER_TABLE5_VGG16 = {  # conv index (1-based) -> widths after rounds 1..5
    1: [64, 39, 24, 15, 9], 2: [64, 52, 42, 34, 28], 3: [128, 116, 105, 95, 86], 4: [128, 122, 116, 111, 106],
    5: [256, 231, 208, 188, 170], 6: [256, 128, 64, 32, 16], 7: [256, 128, 64, 32, 16],
    **{i: [512, 205, 82, 33, 14] for i in range(8, 14)}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data", default=str(SHARED / "data" / "cifar10-jpeg-trainval.tar.gz"))
    p.add_argument("--weights", default=str(SHARED / "models" / "vgg16_bn_cifar10.pt"))
    p.add_argument("--target-macs", type=float, default=0.13,
                   help="final MACs fraction; 0.13 is where the paper's Table 5 widths end (41.7 of 314.2 M)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tag = "_quick" if args.quick else ""
    out_dir = ROOT / "benchmarks" / "results" / f"b2_run{tag}"
    opts = job.JobOptions(rounds=5, population=30, elites=5, p_c=0.6, p_mut=0.6,
                          generations=1 if args.quick else 4, target=args.target_macs,
                          finetune_epochs=0.1 if args.quick else 1.0, score_samples=500 if args.quick else 1000,
                          recal_batches=5 if args.quick else 20, seed=0)
    t0 = time.perf_counter()
    data = load_images(args.data)
    teacher = load_weights(vgg16_bn_cifar(), args.weights).eval()
    result = job.run(teacher, data, out_dir, opts, title="B2: the paper's protocol on VGG16-BN")
    convs = [name for name in result.widths[0] if name.startswith("features.")]
    widths = {f"conv{i + 1} ({name})": {"ours": [w.get(name, 0) for w in result.widths[1:]],
                                        "paper": PAPER_TABLE5_VGG16[i + 1]} for i, name in enumerate(convs)}
    write_json(ROOT / "benchmarks" / "results" / f"b2_paper_protocol{tag}.json", {
        "settings": {**vars(args), **vars(opts)}, "baseline": result.baseline, "rows": result.rows,
        "paper_table2_vgg16": PAPER_TABLE2_VGG16, "paper_table3_vgg16_s": PAPER_TABLE3_VGG16_S,
        "widths": widths, "wall_time_s": time.perf_counter() - t0})
    print(result.table())
    print(result.widths_table())


if __name__ == "__main__":
    main()
