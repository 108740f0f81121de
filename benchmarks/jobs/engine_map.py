"""One engine's overhead on a map of fitness calls: time to first result, engine overhead per task and as a share
of the map's wall time, and memory per worker.

    python benchmarks/jobs/engine_map.py --engine {serial,processes,dask} --workers N --model {tiny,vgg16}
    python -m scoop -n N benchmarks/jobs/engine_map.py --engine scoop --workers N --model ...

Two maps of ``--plans`` different plans at 50 % of the MACs each: the first (cold: the engine's pool or cluster
starts, the fitness state is published) gives the time to the first result; the second (warm) gives the overhead.
Every fitness call logs its own duration (``FitnessConfig(trace_dir=...)``), so the engine's overhead is what the
map's wall time holds beyond the fitness work spread over the workers: ``overhead = 1 - sum(call seconds) /
(workers x wall)``, and per task ``(workers x wall - sum(call seconds)) / tasks``. Prints ``engine_map: {json}``.
"""
import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from evoprune import PruningSpace
from evoprune.evolve import operators as ops
from evoprune.evolve.engines import default_map, opened
from evoprune.evolve.fitness import Evaluator, FitnessConfig
from evoprune.models import load_weights, tiny_cnn, vgg16_bn_cifar
from evoprune.evolve.toolbox import creator_types

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


def rss_mib(pid) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_pids(engine, mapper) -> list[int]:
    if engine == "processes":
        return sorted(p.pid for p in mapper._pool._processes.values())
    if engine == "dask":
        return sorted(mapper.client.run(os.getpid).values())
    if engine == "scoop":
        return sorted(set(default_map()(_pid, range(64))))
    return [os.getpid()]


def _pid(_):
    time.sleep(0.01)
    return os.getpid()


def traced_seconds(trace: Path) -> float:
    return sum(float(line.split()[-1]) for p in trace.glob("evals-*.log") for line in p.read_text().splitlines())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--engine", required=True, choices=("serial", "processes", "dask", "scoop"))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--model", choices=("tiny", "vgg16"), default="vgg16")
    p.add_argument("--plans", type=int, default=16)
    args = p.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    if args.model == "vgg16":
        model, shape, n = vgg16_bn_cifar().eval(), (3, 32, 32), 500
        weights = SHARED / "models" / "vgg16_bn_cifar10.pt"
        if weights.exists():
            load_weights(model, weights)
    else:
        model, shape, n = tiny_cnn(4, 16).eval(), (3, 16, 16), 200
    x, y = torch.randn(n, *shape), torch.randint(0, 4, (n,))
    recal = [torch.randn(64, *shape) for _ in range(2)]
    space = PruningSpace.from_model(model, x[:1])
    trace = Path(tempfile.mkdtemp(prefix="engine-map-"))
    evaluator = Evaluator(model, space, x, y, recal, FitnessConfig(trace_dir=str(trace)))
    ranks = [torch.rand(g.size).numpy() for g in space.groups]
    _, ind_cls = creator_types()
    plans = []
    for _ in range(2 * args.plans):
        ind = ops.init_random(ind_cls, space.layout, (0.4, 0.9), conn_keep=1.0)
        ops.repair(ind, space, ranks, macs_budget=0.5 * space.base_macs, fill=0.98)
        plans.append(list(ind))
    t0 = time.perf_counter()
    with opened(args.engine, workers=args.workers if args.engine in ("processes", "dask") else None) as mapper:
        start_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = mapper(evaluator, plans[:args.plans])
        next(iter(results))
        first_s = time.perf_counter() - t0
        list(results)
        cold_s = time.perf_counter() - t0
        for f in trace.glob("*.log"):
            f.unlink()
        t0 = time.perf_counter()
        list(mapper(evaluator, plans[args.plans:]))
        wall = time.perf_counter() - t0
        work = traced_seconds(trace)
        rss = [rss_mib(pid) for pid in worker_pids(args.engine, mapper)]
    out = {"engine": args.engine, "workers": args.workers, "model": args.model, "tasks": args.plans,
           "engine_start_s": start_s, "first_result_s": first_s, "cold_map_s": cold_s, "warm_map_s": wall,
           "fitness_work_s": work, "overhead_fraction": 1 - work / (args.workers * wall),
           "overhead_per_task_ms": 1e3 * (args.workers * wall - work) / args.plans, "worker_rss_MiB": rss}
    print("engine_map: " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
