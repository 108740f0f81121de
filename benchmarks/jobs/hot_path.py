"""The fitness hot path on VGG16-BN: fitness calls at 25 % of the MACs, and the GA's own work per evaluation
(variation with repair, decoding, analytic cost, surgery, mask set-up) next to the bare forward pass it feeds.

    python benchmarks/jobs/hot_path.py [--repeat N] [--threads T]

Uses only API that every evoprune version since 0.1 has, so B3 runs it against an older checkout too
(``PYTHONPATH=<checkout>``), alternating old and new. Every fitness call scores a genome it has not seen (no cache
hits). Prints one line ``hot_path: {json}`` of medians in seconds.
"""
import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from deap import base

import evoprune
from evoprune import PruningSpace, apply_plan, masked
from evoprune.evolve import vary
from evoprune.evolve.fitness import Evaluator, FitnessConfig
from evoprune.space.importance import channel_importance
from evoprune.models import load_weights, vgg16_bn_cifar
from evoprune.evolve.toolbox import register

# the direct-slicing surgery the fitness path uses since issue 12; apply_plan before. (Not ``from evoprune.prune.slicing
# import ...``: an editable install's finder would fetch that module from the installed tree into an older one.)
fitness_surgery = getattr(evoprune, "slice_plan", None)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plans_at(space, imp, keep, n, rng):
    """``n`` different individuals that keep ``keep`` of every group (top-L1 plus a few random swaps)."""
    out = []
    for _ in range(n):
        genes = []
        for g in space.groups:
            k = max(1, round(keep * g.size))
            order = np.argsort(-imp[g.name])
            top, rest = order[:k].copy(), order[k:]
            if len(rest):
                swap = rng.choice(k, size=min(2, k, len(rest)), replace=False)
                top[swap] = rng.choice(rest, size=len(swap), replace=False)
            bits = np.zeros(g.size, int)
            bits[top] = 1
            genes += bits.tolist()
        out.append(genes + [1] * len(space.units))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    rng = np.random.default_rng(0)
    model = vgg16_bn_cifar().eval()
    weights = SHARED / "models" / "vgg16_bn_cifar10.pt"
    if weights.exists():
        load_weights(model, weights)
    x, y = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
    recal = [torch.randn(64, 3, 32, 32) for _ in range(5)]
    space = PruningSpace.from_model(model, x[:1])
    imp = channel_importance(model, space, x[:1], "l1")
    out = {"fitness_25pct_macs": {}}
    for mode, recal_on in (("physical", False), ("physical+recal", True), ("masked", False)):
        ev = Evaluator(model, space, x, y, recal if recal_on else None,
                       FitnessConfig(mode=mode.split("+")[0], bn_recalibration=recal_on))
        todo = iter(plans_at(space, imp, 0.5, args.repeat + 2, rng))
        ev(next(todo)), ev(next(todo))  # warm-up: the state is loaded, kernels are primed
        out["fitness_25pct_macs"][mode] = median_time(lambda: ev(next(todo)), args.repeat)
        ev.release()

    random.seed(0)
    np.random.seed(0)
    tb = register(base.Toolbox(), space, lambda ind: (0.0, 0.0), objective="budget",
                  macs_budget=0.5 * space.base_macs, importance=imp)
    parents = [tb.individual() for _ in range(6)]
    for ind in parents:
        ind.fitness.values = (0.5, 1.0)
    genes = plans_at(space, imp, 0.7, 1, rng)[0]
    plan = space.decode(genes)
    pruned = apply_plan(model, plan, x[:1], space=space).eval()
    surgery = fitness_surgery or apply_plan
    kw = {"space": space} if surgery is apply_plan else {}
    res = {
        "vary_per_child": median_time(lambda: vary(tb, parents, 2), args.repeat * 3) / 2,
        "decode": median_time(lambda: space.decode(genes), args.repeat * 3),
        "analytic_cost": median_time(lambda: space.cost(plan, validate=False), args.repeat * 3),
        "surgery": median_time(lambda: surgery(model, plan, x[:1], **kw) if surgery is apply_plan
                               else surgery(model, plan, space, validate=False), args.repeat),
        "surgery_kind": "apply_plan" if surgery is apply_plan else "slice_plan",
    }

    def mask_setup():
        with masked(model, plan, space):
            pass
    res["mask_setup"] = median_time(mask_setup, args.repeat * 3)
    with torch.inference_mode():
        res["forward_contiguous"] = median_time(lambda: pruned(x), args.repeat)
        cl = pruned.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        res["forward_channels_last"] = median_time(lambda: cl(xc), args.repeat)
    out["overhead"] = res
    print("hot_path: " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
