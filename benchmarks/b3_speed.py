"""B3, speed: fitness calls per second, GA overhead, SCOOP 1 vs 2 workers, pruned vs original latency, peak RSS.

    python benchmarks/b3_speed.py --quick     # ~10 minutes on 2 CPU cores
    python benchmarks/b3_speed.py
    python benchmarks/b3_speed.py --quick --parts hot,rounds --against 4544bea   # this tree vs an older commit
    python benchmarks/b3_speed.py --quick --parts engines   # serial, processes, SCOOP, Dask at 2 and 8 workers

``--against REF`` runs the version-neutral jobs (benchmarks/jobs/hot_path.py: fitness calls at 25 % of the MACs
and the GA's overhead per evaluation; benchmarks/jobs/rss_rounds.py: RSS after each round of a 5-round search,
serially and under ``python -m scoop -n 2``) on this tree and on ``git archive REF``, alternating, in one run.

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
from evoprune.evolve import operators as ops  # noqa: E402
from evoprune.evolve.fitness import Evaluator, FitnessConfig  # noqa: E402
from evoprune.space.importance import channel_importance, ranks as to_ranks  # noqa: E402
from evoprune.models import load_weights, vgg16_bn_cifar  # noqa: E402
from evoprune.evolve import vary  # noqa: E402
from evoprune.storage import write_json  # noqa: E402
from evoprune.evolve.toolbox import register  # noqa: E402

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
    from evoprune.evolve import fitness
    w = fitness._WORKERS.get(ev.token)
    if w is not None:
        w.cache.clear()


def overhead(model, space, imp, x, repeat):
    """GA bookkeeping per evaluation (variation, repair, decode, cost, surgery) vs the bare forward it feeds."""
    ranks_map = to_ranks(imp)
    ranks = [ranks_map[g.name] for g in space.groups]
    random.seed(0)
    np.random.seed(0)
    tb = register(__import__("deap").base.Toolbox(), space, lambda ind: (0.0, 0.0), objective="budget",
                  macs_budget=0.5 * space.base_macs, importance=imp)
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


def _job(script, tree, *, scoop=False, args=()):
    """Run a benchmarks/jobs script against the evoprune of ``tree``; its ``name: {json}`` line, parsed."""
    cmd = [sys.executable] + (["-m", "scoop", "-n", "2"] if scoop else []) + [str(ROOT / "benchmarks" / "jobs" /
                                                                             script), *args]
    r = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True,
                       cwd=tree)
    tag = script.removesuffix(".py") + ": "
    line = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith(tag)]
    if r.returncode != 0 or not line:  # python -m scoop exits 0 when the script fails: trust the line only
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    return json.loads(line[0][len(tag):])


def _median_of(runs, path):
    vals = []
    for run in runs:
        v = run
        for key in path:
            v = v[key]
        vals.append(v)
    return statistics.median(vals)


def hot_path_compare(trees, repeat, n_runs):
    """Fitness calls at 25 % MACs and GA overhead, each tree ``n_runs`` times, alternating."""
    runs = {name: [] for name in trees}
    for i in range(n_runs):
        for name, tree in trees.items():
            runs[name].append(_job("hot_path.py", tree, args=("--repeat", str(repeat))))
            log(f"hot path run {i + 1}/{n_runs} on {name}: {runs[name][-1]['fitness_25pct_macs']}")
    out = {"runs": runs}
    for name in trees:
        o = {k: _median_of(runs[name], ("overhead", k)) for k in runs[name][0]["overhead"] if k != "surgery_kind"}
        ga = o["vary_per_child"] + o["decode"] + o["analytic_cost"]
        fwd = o["forward_channels_last"] if runs[name][0]["overhead"]["surgery_kind"] == "slice_plan" \
            else o["forward_contiguous"]  # the forward each version's fitness path runs
        out[name] = {"fitness_25pct_macs": {m: _median_of(runs[name], ("fitness_25pct_macs", m))
                                            for m in runs[name][0]["fitness_25pct_macs"]},
                     "overhead": o, "surgery_kind": runs[name][0]["overhead"]["surgery_kind"],
                     "overhead_fraction_masked": (ga + o["mask_setup"]) / fwd,
                     "overhead_fraction_physical": (ga + o["surgery"]) / fwd}
    if "before" in trees:
        out["fitness_speedup"] = {m: out["before"]["fitness_25pct_macs"][m] / out["after"]["fitness_25pct_macs"][m]
                                  for m in out["after"]["fitness_25pct_macs"]}
        log(f"fitness call at 25 % MACs, before / after: {out['fitness_speedup']}")
    return out


def rss_rounds_compare(trees):
    """RSS after rounds 1..5 of a small VGG16 search, serial and under scoop -n 2, on each tree."""
    out = {}
    for name, tree in trees.items():
        for mode in ("serial", "scoop_2_workers"):
            rows = _job("rss_rounds.py", tree, scoop=mode != "serial")
            main = [r["main"] for r in rows]
            workers = [max(w.get("VmRSS", 0) for w in r["workers"].values()) for r in rows]
            peak_workers = [max(w.get("VmHWM", 0) for w in r["workers"].values()) for r in rows]
            out[f"{name}/{mode}"] = {
                "rows": rows, "main_hwm_MiB": [m.get("VmHWM") for m in main],
                "main_rss_MiB": [m.get("VmRSS") for m in main], "worker_rss_max_MiB": workers,
                "worker_hwm_max_MiB": peak_workers,
                "growth_round5_over_round1": {
                    "main_hwm": main[-1]["VmHWM"] / main[0]["VmHWM"],
                    "worker_hwm": peak_workers[-1] / peak_workers[0],
                    "worker_rss": workers[-1] / workers[0]}}
            log(f"RSS {name} {mode}: main HWM {out[f'{name}/{mode}']['main_hwm_MiB']}, worker HWM {peak_workers}")
    return out


def engines_compare(quick):
    """Per-task engine overhead, time to first result and memory per worker: serial, processes, SCOOP and Dask at
    2 and 8 workers (8 oversubscribe the 2 cores: fine for overhead), on the tiny model and on VGG16 fitness calls
    (benchmarks/jobs/engine_map.py)."""
    rows = []
    for model in ("tiny", "vgg16"):
        for engine, workers in (("serial", 1), ("processes", 2), ("scoop", 2), ("dask", 2), ("processes", 8),
                                ("scoop", 8), ("dask", 8)):
            args = ("--engine", engine, "--workers", str(workers), "--model", model, "--plans",
                    str(16 if quick else 32))
            if engine == "scoop":
                cmd = [sys.executable, "-m", "scoop", "-n", str(workers), str(ROOT / "benchmarks" / "jobs" /
                                                                             "engine_map.py"), *args]
            else:
                cmd = [sys.executable, str(ROOT / "benchmarks" / "jobs" / "engine_map.py"), *args]
            r = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
            line = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("engine_map: ")]
            if not line:  # python -m scoop exits 0 even when the script fails
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{(r.stdout + r.stderr)[-3000:]}")
            rows.append(json.loads(line[0][len("engine_map: "):]))
            row = rows[-1]
            log(f"engine {engine} x{workers} on {model}: first result {row['first_result_s']:.2f} s, overhead "
                f"{100 * row['overhead_fraction']:.1f} % ({row['overhead_per_task_ms']:.1f} ms/task), worker RSS "
                f"{max(row['worker_rss_MiB']):.0f} MiB")
    return rows


def _trees(against):
    """``{"after": this tree}``, plus ``{"before": an extracted copy of commit ``against``}``."""
    trees = {"after": ROOT}
    if against:
        d = Path(tempfile.mkdtemp(prefix="b3-before-"))
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", against], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(d)], input=archive.stdout, check=True)
        (d / "benchmarks" / "jobs").mkdir(parents=True, exist_ok=True)
        trees = {"before": d, "after": ROOT}
    return trees


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--parts", default="fitness,overhead,latency,scoop,rss",
                   help="comma-separated subset to (re)measure (also: hot, rounds); other parts already in --out "
                        "are kept")
    p.add_argument("--against", default=None, metavar="REF",
                   help="for the hot and rounds parts: also measure git commit REF, alternating with this tree")
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
    trees = _trees(args.against) if parts & {"hot", "rounds"} else {}
    steps += (("hot_path", lambda: hot_path_compare(trees, 5 if args.quick else 9, 3 if args.quick else 5)),
              ("rounds_rss", lambda: rss_rounds_compare(trees)), ("engines", lambda: engines_compare(args.quick)))
    if args.against:
        result["settings"]["against"] = args.against
    for key, measure in steps:
        if key.split("_")[0] in parts or (key == "peak_rss" and "rss" in parts) or \
                (key == "hot_path" and "hot" in parts) or (key == "rounds_rss" and "rounds" in parts):
            result[key] = measure()
            write_json(out, result)
    if "rss" in parts:
        result["peak_rss"]["this_benchmark_MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["wall_time_s"] = time.perf_counter() - t0
    write_json(out, result)
    log(f"done -> {out}")


if __name__ == "__main__":
    main()
