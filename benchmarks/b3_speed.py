"""B3, speed: fitness calls per second, GA overhead, SCOOP 1 vs 2 workers, pruned vs original latency, peak RSS.

    python benchmarks/b3_speed.py --quick     # ~10 minutes on 2 CPU cores
    python benchmarks/b3_speed.py

Model: the VGG16-BN CIFAR layout (random weights are enough for timing; the shared teacher is used when present).
Plans keep the top-L1 fraction of every group (1.0, 0.5, 0.25). Every timing is the median of repeated runs with
the spread (min, max). Writes benchmarks/results/b3_speed[_quick].json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evoprune import PruningSpace, apply_plan  # noqa: E402
from evoprune import operators as ops  # noqa: E402
from evoprune.fitness import Evaluator, FitnessConfig  # noqa: E402
from evoprune.importance import channel_importance, ranks as to_ranks  # noqa: E402
from evoprune.models import load_weights, vgg16_bn_cifar  # noqa: E402
from evoprune.evolve import vary  # noqa: E402
from evoprune.storage import write_json  # noqa: E402
from evoprune.toolbox import register  # noqa: E402

SHARED = ROOT.parent / "shared"


def stats(times):
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


def timeit(fn, repeat):
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return stats(out)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def uniform_genes(space, imp, keep):
    genes = []
    for g in space.groups:
        top = set(np.argsort(-imp[g.name])[:max(1, round(keep * g.size))].tolist())
        genes += [int(i in top) for i in range(g.size)]
    return genes + [1] * len(space.units)


def fitness_rates(model, space, imp, x, y, recal, repeat):
    rows = []
    configs = {"masked": FitnessConfig(mode="masked", bn_recalibration=False),
               "masked+recal": FitnessConfig(mode="masked"),
               "physical": FitnessConfig(mode="physical", bn_recalibration=False),
               "physical+recal": FitnessConfig(mode="physical")}
    for keep in (1.0, 0.5, 0.25):
        genes = uniform_genes(space, imp, keep)
        macs = space.cost_of(genes)[0]
        for name, cfg in configs.items():
            ev = Evaluator(model, space, x, y, recal if cfg.bn_recalibration else None, cfg)

            def call():
                uncache(ev)  # time real scoring, not the genome cache
                ev(genes)
            t = timeit(call, repeat)
            rows.append({"keep": keep, "mode": name, "macs_ratio": macs / space.base_macs,
                         "seconds": t, "calls_per_s": 1 / t["median"]})
            log(f"fitness keep {keep:.2f} {name:15s} {1 / t['median']:.2f} calls/s (median {t['median']:.3f} s)")
            ev.release()
    return rows


def uncache(ev):
    from evoprune import fitness
    w = fitness._WORKERS.get(ev.token)
    if w is not None:
        w.cache.clear()


def overhead(model, space, imp, x, repeat):
    """GA bookkeeping per evaluation (variation, repair, decode, cost, surgery) vs the bare forward it feeds."""
    ranks_map = to_ranks(imp)
    ranks = [ranks_map[g.name] for g in space.groups]
    tb = register(__import__("deap").base.Toolbox(), space, lambda ind: (0.0, 0.0), objective="budget",
                  macs_budget=0.5 * space.base_macs, importance=imp, seed=0)
    parents = [tb.repair(tb.individual())[0] for _ in range(6)]
    for p in parents:
        p.fitness.values = (0.5, 1.0)
    genes = uniform_genes(space, imp, 0.7)
    plan = space.decode(genes)
    pruned = apply_plan(model, plan, x[:1], space=space).eval()
    res = {
        "vary_per_child": timeit(lambda: vary(tb, parents, 2), repeat),
        "repair_to_budget": timeit(lambda: ops.repair(list(genes), space, ranks,
                                                      macs_budget=0.5 * space.base_macs), repeat),
        "decode": timeit(lambda: space.decode(genes), repeat),
        "analytic_cost": timeit(lambda: space.cost(plan, validate=False), repeat),
        "surgery_apply_plan": timeit(lambda: apply_plan(model, plan, x[:1], space=space), max(3, repeat // 3)),
    }
    with torch.inference_mode():
        res["bare_forward_pruned"] = timeit(lambda: pruned(x), repeat)
    res["vary_per_child"] = {k: (v / 2 if k != "n" else v) for k, v in res["vary_per_child"].items()}
    fwd = res["bare_forward_pruned"]["median"]
    ga = res["vary_per_child"]["median"] + res["decode"]["median"] + res["analytic_cost"]["median"]
    res["ga_overhead_fraction_masked"] = ga / fwd
    res["ga_overhead_fraction_physical"] = (ga + res["surgery_apply_plan"]["median"]) / fwd
    log(f"overhead: GA {ga * 1e3:.1f} ms, surgery {res['surgery_apply_plan']['median'] * 1e3:.0f} ms, "
        f"forward on {len(x)} images {fwd * 1e3:.0f} ms")
    return res


def latency(model, space, imp, x, repeat):
    rows = []
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    base_macs = space.base_macs
    for keep in (1.0, 0.5, 0.25):
        net = apply_plan(model, space.decode(uniform_genes(space, imp, keep)), x[:1], space=space).eval()
        macs = space.cost_of(uniform_genes(space, imp, keep))[0]
        for batch in (1, 64):
            inp = torch.randn(batch, *x.shape[1:])
            with torch.inference_mode():
                for _ in range(3):
                    net(inp)
                eager = timeit(lambda: net(inp), repeat)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ts = torch.jit.freeze(torch.jit.trace(net, inp).eval())
            with torch.inference_mode():
                for _ in range(3):
                    ts(inp)
                script = timeit(lambda: ts(inp), repeat)
            row = {"keep": keep, "batch": batch, "macs_ratio": macs / base_macs, "eager": eager,
                   "torchscript": script}
            if ort is not None:
                with tempfile.TemporaryDirectory() as d:
                    path = os.path.join(d, "m.onnx")
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        torch.onnx.export(net, (inp,), path, dynamo=False)
                    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                    feed = {sess.get_inputs()[0].name: inp.numpy()}
                    for _ in range(3):
                        sess.run(None, feed)
                    row["onnxruntime"] = timeit(lambda: sess.run(None, feed), repeat)
            rows.append(row)
            log(f"latency keep {keep} batch {batch}: eager {eager['median'] * 1e3:.1f} ms, torchscript "
                f"{script['median'] * 1e3:.1f} ms" + (f", ort {row['onnxruntime']['median'] * 1e3:.1f} ms"
                                                     if "onnxruntime" in row else ""))
    return rows


def scoop_speedup():
    """The tiny search job serially and under python -m scoop -n 2 (wall time of the whole job, median of 2)."""
    job = ROOT / "tests" / "jobs" / "tiny_search.py"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = {}
    with tempfile.TemporaryDirectory() as d:
        subprocess.run([sys.executable, str(job), f"{d}/warm", "--no-checkpoint", "--rounds", "1",
                        "--generations", "1"], env=env, check=True, capture_output=True)
        for name, cmd in (("serial_1_process", [sys.executable, str(job)]),
                          ("scoop_2_workers", [sys.executable, "-m", "scoop", "-n", "2", str(job)])):
            times = []
            for i in range(2):
                run_dir = Path(d) / f"{name}{i}"
                run_dir.mkdir()
                (run_dir / "weights.pt").write_bytes((Path(d) / "warm" / "weights.pt").read_bytes())
                t0 = time.perf_counter()
                r = subprocess.run(cmd + [str(run_dir), "--no-checkpoint"], env=env, capture_output=True, text=True)
                times.append(time.perf_counter() - t0)
                assert r.returncode == 0 and "tiny_search: done" in r.stderr, r.stderr[-2000:]
            out[name] = stats(times)
    out["speedup"] = out["serial_1_process"]["median"] / out["scoop_2_workers"]["median"]
    log(f"SCOOP: serial {out['serial_1_process']['median']:.1f} s, 2 workers {out['scoop_2_workers']['median']:.1f} s"
        f" -> x{out['speedup']:.2f}")
    return out


def scoop_fitness_map():
    """One map of 14 VGG16 fitness calls: serial (2 threads, and 1 thread) vs ``python -m scoop -n 2``
    (1 thread per worker). Workers are warmed up first; the time is the map alone."""
    job = ROOT / "benchmarks" / "jobs" / "fitness_map.py"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = {}
    for name, cmd in (("serial_2_threads", [sys.executable, str(job), "--threads", "2"]),
                      ("serial_1_thread", [sys.executable, str(job), "--threads", "1"]),
                      ("scoop_2_workers", [sys.executable, "-m", "scoop", "-n", "2", str(job)])):
        times = []
        for _ in range(2):
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("fitness_map:")]
            assert line, (r.stdout + r.stderr)[-2000:]
            times.append(float(line[0].split(" in ")[1].split()[0]))
        out[name] = stats(times)
    out["speedup_vs_serial_2_threads"] = out["serial_2_threads"]["median"] / out["scoop_2_workers"]["median"]
    out["speedup_vs_serial_1_thread"] = out["serial_1_thread"]["median"] / out["scoop_2_workers"]["median"]
    log(f"SCOOP fitness map: serial 2 threads {out['serial_2_threads']['median']:.1f} s, 1 thread "
        f"{out['serial_1_thread']['median']:.1f} s, scoop -n 2 {out['scoop_2_workers']['median']:.1f} s")
    return out


def peak_rss_of_search():
    job = ROOT / "tests" / "jobs" / "tiny_search.py"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as d:
        code = ("import resource, subprocess, sys; "
                f"subprocess.run([sys.executable, {str(job)!r}, {d!r}, '--no-checkpoint'], check=True); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    kib = int(r.stdout.split()[-1])
    log(f"peak RSS of the tiny search job: {kib / 1024:.0f} MiB")
    return {"tiny_search_job_MiB": kib / 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--parts", default="fitness,overhead,latency,scoop,rss",
                   help="comma-separated subset to (re)measure; other parts already in --out are kept")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    repeat = 5 if args.quick else 20
    n_images = 256 if args.quick else 500
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"b3_speed{'_quick' if args.quick else ''}.json")
    torch.manual_seed(0)
    random.seed(0)
    model = vgg16_bn_cifar().eval()
    weights = SHARED / "models" / "vgg16_bn_cifar10.pt"
    if weights.exists():
        load_weights(model, weights)
    x = torch.randn(n_images, 3, 32, 32)
    y = torch.randint(0, 10, (n_images,))
    recal = [torch.randn(64, 3, 32, 32) for _ in range(5)]
    space = PruningSpace.from_model(model, x[:1])
    imp = channel_importance(model, space, x[:1], "l1")
    result = json.loads(out.read_text()) if out.exists() else {}
    result["settings"] = {"threads": args.threads, "score_images": n_images, "recal_batches": 5, "repeat": repeat,
                          "torch": torch.__version__, "cpus": os.cpu_count()}
    t0 = time.perf_counter()
    steps = (("fitness", lambda: fitness_rates(model, space, imp, x, y, recal, max(3, repeat // 4))),
             ("overhead", lambda: overhead(model, space, imp, x, repeat)),
             ("latency", lambda: latency(model, space, imp, x, repeat if not args.quick else 20)),
             ("scoop", lambda: scoop_speedup()), ("scoop_fitness_map", lambda: scoop_fitness_map()),
             ("peak_rss", lambda: peak_rss_of_search()))
    for key, measure in steps:
        if key.split("_")[0] in parts or (key == "peak_rss" and "rss" in parts):
            result[key] = measure()
            write_json(out, result)
    if "rss" in parts:
        result["peak_rss"]["this_benchmark_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["wall_time_s"] = time.perf_counter() - t0
    write_json(out, result)
    log(f"done -> {out}")


if __name__ == "__main__":
    main()
