"""Time one map of VGG16 fitness calls (the parallel part of a generation): serially or under SCOOP.

    python benchmarks/jobs/fitness_map.py [--threads T]
    python -m scoop -n 2 benchmarks/jobs/fitness_map.py

Prints one line "fitness_map: N plans in S s" (the map only, after the state is published and warmed up).
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evoprune import PruningSpace
from evoprune.evolve import operators as ops  # noqa: E402
from evoprune.evolve.fitness import Evaluator  # noqa: E402
from evoprune.models import vgg16_bn_cifar  # noqa: E402
from evoprune.evolve.engines import default_map  # noqa: E402
from evoprune.evolve.toolbox import creator_types  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--plans", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = vgg16_bn_cifar().eval()
    x, y = torch.randn(500, 3, 32, 32), torch.randint(0, 10, (500,))
    recal = [torch.randn(64, 3, 32, 32) for _ in range(5)]
    space = PruningSpace.from_model(model, x[:1])
    evaluator = Evaluator(model, space, x, y, recal)
    _, ind_cls = creator_types()
    random.seed(0)
    ranks = [torch.rand(g.size).numpy() for g in space.groups]
    plans = []
    for _ in range(args.plans):
        ind = ops.init_random(ind_cls, space.layout, (0.4, 0.9), conn_keep=1.0)
        ops.repair(ind, space, ranks, macs_budget=0.5 * space.base_macs, fill=0.98)
        plans.append(ind)
    mapper = default_map()
    list(mapper(evaluator, plans[:2]))  # publish the state and warm every process up
    t0 = time.perf_counter()
    results = list(mapper(evaluator, plans[2:]))
    print(f"fitness_map: {len(results)} plans in {time.perf_counter() - t0:.2f} s", flush=True)


if __name__ == "__main__":
    main()
