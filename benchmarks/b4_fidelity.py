"""B4, fitness fidelity: does adaptive BN re-calibration make the quick score rank plans like fine-tuning does?

    python benchmarks/b4_fidelity.py --quick
    python benchmarks/b4_fidelity.py

On the VGG16 teacher, a spread of plans at one MACs budget (uniform L1, torch-pruning-style global L1 shapes,
random, and importance-seeded individuals) is scored three ways on the val-search split: the quick score without BN
re-calibration, with it, and the val-report accuracy after the same short fine-tune. Reports Spearman's rank
correlation of each quick score with the fine-tuned accuracy. Writes
benchmarks/results/b4_fidelity[_quick]_b<budget %>.json.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evoprune import PruningSpace, apply_plan  # noqa: E402
from evoprune.evolve import operators as ops  # noqa: E402
from evoprune.data import load_images, normalize  # noqa: E402
from evoprune.evolve.fitness import Evaluator, FitnessConfig  # noqa: E402
from evoprune.space.importance import channel_importance, ranks as to_ranks  # noqa: E402
from evoprune.models import load_weights, vgg16_bn_cifar  # noqa: E402
from evoprune.storage import write_json  # noqa: E402
from evoprune.evolve.toolbox import creator_types  # noqa: E402
from evoprune.train import evaluate, finetune  # noqa: E402

SHARED = ROOT.parent / "shared"


def spearman(a, b):
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n_plans, ft_batches, recal_batches = (8, 40, 20) if args.quick else (16, 150, 20)
    t0 = time.perf_counter()
    data = load_images(SHARED / "data" / "cifar10-jpeg-trainval.tar.gz")
    search_set, report_set = data.val.stratified_split(0.5, seed=0)
    score = search_set.stratified_sample(500, seed=0)
    sx, sy = normalize(score.images), score.labels
    recal_sample = data.train.stratified_sample(recal_batches * 64, seed=1)
    recal = [normalize(recal_sample.images[i:i + 64]) for i in range(0, len(recal_sample), 64)]
    teacher = load_weights(vgg16_bn_cifar(), SHARED / "models" / "vgg16_bn_cifar10.pt").eval()
    x = sx[:1]
    space = PruningSpace.from_model(teacher, x, connections=False)
    l1 = to_ranks(channel_importance(teacher, space, x, "l1"))
    budget = args.budget * space.base_macs
    _, ind_cls = creator_types()
    random.seed(0)
    plans = []
    for i in range(n_plans):  # a spread: importance-seeded with noise, random, and guided-mutated variants
        ranks = [l1[g.name] for g in space.groups] if i % 2 == 0 else \
            [to_ranks({"g": np.random.default_rng(i).random(g.size)})["g"] for g in space.groups]
        ind = ops.init_importance(ind_cls, space.layout, ranks, (0.3, 1.0), noise=0.05 * (i % 3))
        if i % 4 == 3:
            ind = ops.init_random(ind_cls, space.layout, (0.3, 1.0), conn_keep=1.0)
        ops.repair(ind, space, ranks, macs_budget=budget, fill=0.99)  # every plan at (nearly) the same MACs
        plans.append(ind)
    quick = Evaluator(teacher, space, sx, sy, config=FitnessConfig(bn_recalibration=False))
    adaptive = Evaluator(teacher, space, sx, sy, recal)
    rows = []
    for i, ind in enumerate(plans):
        s_plain, macs = quick(ind)
        s_recal, _ = adaptive(ind)
        net = apply_plan(teacher, space.decode(ind), x, space=space)
        finetune(net, data.train, 1, teacher=teacher, batch_size=64, max_batches=ft_batches, progress=False, seed=0)
        acc = evaluate(net.eval(), report_set)
        rows.append({"plan": i, "macs": macs, "quick_plain": s_plain, "quick_recal": s_recal, "finetuned": acc})
        print(f"[{time.strftime('%H:%M:%S')}] plan {i}: MACs {macs / 1e6:.1f}M quick {s_plain:.3f} "
              f"recal {s_recal:.3f} fine-tuned {acc:.4f}", file=sys.stderr, flush=True)
    result = {
        "settings": {"budget": args.budget, "plans": n_plans, "finetune_batches": ft_batches,
                     "recal_batches": recal_batches, "score_images": len(score), "report_images": len(report_set)},
        "rows": rows,
        "spearman_plain_vs_finetuned": spearman([r["quick_plain"] for r in rows], [r["finetuned"] for r in rows]),
        "spearman_recal_vs_finetuned": spearman([r["quick_recal"] for r in rows], [r["finetuned"] for r in rows]),
        "wall_time_s": time.perf_counter() - t0,
    }
    name = f"b4_fidelity{'_quick' if args.quick else ''}_b{round(100 * args.budget)}.json"
    write_json(ROOT / "benchmarks" / "results" / name, result)
    print(f"Spearman vs fine-tuned accuracy: without BN re-calibration {result['spearman_plain_vs_finetuned']:.3f}, "
          f"with it {result['spearman_recal_vs_finetuned']:.3f}")


if __name__ == "__main__":
    main()
