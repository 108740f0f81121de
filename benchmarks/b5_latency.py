"""B5: latency-aware search against torch-pruning's one-liners and random search at equal measured latency.

    python benchmarks/b5_latency.py --arch resnet18_tv                     # ~45 min on 2 CPU cores
    python benchmarks/b5_latency.py --arch vgg16_bn --ft-epochs 0 --seeds 0   # table study + a calibration-only smoke
    python benchmarks/b5_latency.py --quick                                 # smoke test, not evidence

Runtime: ONNX Runtime (CPU) at batch 1 with --latency-threads threads (1 by default), every model exported the way
``evoprune.deploy.exporter`` writes it. Data and splits as in B1s (val-search half for fitness, val-report half for
every top-1). Steps:

1. Latency table of the teacher (``LatencyTable.measure``, widths in multiples of the CPU's channel block): its
   build time, and its prediction error against end-to-end measurements of --error-plans random plans (random
   widths in multiples of the block, each connection unit cut with probability 0.2). The same plans with every
   width 1 to block-1 channels lower (fewer MACs, widths the kernels do not like) measure the gain of snapping.
2. Two latency budgets: (a) the measured latency of torch-pruning's uniform L1 at 25 % MACs; (b) 40 % of the
   teacher's measured latency.
3. At each budget and seed: ``ga-latency`` (target_kind="latency"), ``ga-macs`` (the MACs objective at the MACs
   fraction tp-uniform needs to reach the budget), ``random-latency`` (random search at the latency budget, the
   GA's evaluation count), ``tp-uniform`` and ``tp-global`` (MetaPruner, L1, the ratio bisected on measured
   latency; ``tp-uniform-snap``: the same with ``round_to`` = the channel block, torch-pruning's own way to keep
   kernel-friendly widths). On request: ``ga-latency-nocut`` (initial plans cut no connection, ``init_cut=0``)
   and ``ga-latency-distil`` (plans that cut a connection get --cut-steps distillation steps before scoring).
   Every model is then measured (latency, MACs, params), BN re-calibrated (calib) and fine-tuned with KD for
   --ft-epochs (ft; the same recipe and seed for every method).
4. Mean ± sd per method, and a hierarchical paired bootstrap 95 % CI of ga-latency minus each method (seeds, then
   report images). Writes benchmarks/results/b5_latency_<arch>[_quick].json and .md.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from b1_seeds import WEIGHTS, bits, classifier_of, correctness, log, paired_cell, setup  # noqa: E402
from evoprune import PruningPlan, PruningSpace, apply_plan, search  # noqa: E402
from evoprune.evolve.fitness import FitnessConfig, recalibrate_bn  # noqa: E402
from evoprune.deploy.latency import LatencyTable, kernel_step, measure  # noqa: E402
from evoprune.storage import write_json, write_text  # noqa: E402
from evoprune.train import finetune  # noqa: E402

SHARED = ROOT.parent / "shared"
METHODS = ("ga-latency", "ga-macs", "random-latency", "tp-uniform", "tp-global", "tp-uniform-snap",
           "ga-latency-nocut", "ga-latency-distil")
DEFAULT_METHODS = METHODS[:6]
SEARCH_SETTINGS = {  # method -> extra search() settings
    "ga-latency-nocut": {"init_cut": 0.0},  # the GA's initial plans cut no connection (the default before B5)
    "random-latency": {"method": "random"},
}
NEAR_CHANCE = 0.2  # a fitness score (top-1 on the search subset) at most this is "near chance" (10 classes)


def ms_of(model, x, threads) -> float:
    return measure(model, x, runtime="onnxruntime", batch=1, threads=threads, repeats=30).median_ms


def tp_model(teacher, x, ratio, global_pruning, round_to=None):
    model = copy.deepcopy(teacher)
    with torch.enable_grad():
        tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=1), pruning_ratio=ratio,
                             global_pruning=global_pruning, ignored_layers=[classifier_of(model)],
                             round_to=round_to).step()
    return model


def tp_at(teacher, x, key, target, global_pruning, steps=9, round_to=None):
    """torch-pruning's one-liner with its ratio bisected so that ``key(model)`` (MACs or measured ms) lands just
    under ``target``."""
    lo, hi, best = 0.0, 0.99, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        model = tp_model(teacher, x, mid, global_pruning, round_to)
        if key(model) > target:
            lo = mid
        else:
            hi, best = mid, model
    return best if best is not None else tp_model(teacher, x, hi, global_pruning, round_to)


def error_study(teacher, space, table, x, n, threads, seed=0):
    """Predicted vs measured ms on ``n`` random snapped plans, and the same plans de-snapped."""
    rng = random.Random(seed)
    step = table.step
    rows = []
    for _ in range(n):
        counts = [g.size if g.size % step else max(step, step * round(rng.uniform(0.15, 1.0) * g.size / step))
                  for g in space.groups]
        active = [rng.random() > 0.2 for _ in space.units]
        row = {}
        for name, cs in (("snapped", counts),
                         ("unsnapped", [c - rng.randint(1, step - 1) if c > step else c for c in counts])):
            plan = PruningPlan({g.name: tuple(range(c)) for g, c in zip(space.groups, cs)},
                               {u.name: a for u, a in zip(space.units, active)}, fingerprint=space.fingerprint)
            net = apply_plan(teacher, plan, x, space=space)
            row[name] = {"predicted_ms": table.predict(plan), "measured_ms": ms_of(net, x, threads),
                         "macs": space.cost(plan)[0]}
        rows.append(row)
    err = [abs(r["snapped"]["predicted_ms"] / r["snapped"]["measured_ms"] - 1) for r in rows]
    gain = [r["unsnapped"]["measured_ms"] / r["snapped"]["measured_ms"] for r in rows]
    macs = [r["unsnapped"]["macs"] / r["snapped"]["macs"] for r in rows]
    return {"plans": rows, "median_abs_error": float(np.median(err)), "p90_abs_error": float(np.percentile(err, 90)),
            "unsnapped_over_snapped_ms_median": float(np.median(gain)),
            "unsnapped_over_snapped_macs_median": float(np.median(macs))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(WEIGHTS), default="resnet18_tv")
    p.add_argument("--quick", action="store_true", help="1 seed, a tiny search, no fine-tune: a smoke test")
    p.add_argument("--data", default=str(SHARED / "data" / "cifar10-jpeg-trainval.tar.gz"))
    p.add_argument("--budgets", default="a,b", help="a: tp-uniform's latency at 25 %% MACs; b: 40 %% of the teacher's")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)} (ga-latency-distil: plans that cut a connection "
                        "unit get --cut-steps distillation steps before scoring)")
    p.add_argument("--cut-steps", type=int, default=20)
    p.add_argument("--population", type=int, default=30)
    p.add_argument("--elites", type=int, default=5)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--score-samples", type=int, default=1000)
    p.add_argument("--recal-batches", type=int, default=20)
    p.add_argument("--ft-epochs", type=float, default=1.0)
    p.add_argument("--ft-lr", type=float, default=0.01)
    p.add_argument("--error-plans", type=int, default=24)
    p.add_argument("--latency-threads", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch threads for search and fine-tune")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.population, args.elites, args.generations = "0", 6, 2, 1
        args.score_samples, args.recal_batches, args.ft_epochs, args.error_plans = 200, 4, 0.0, 4
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    if set(methods) - set(METHODS):
        p.error(f"unknown method(s); choose from {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    tag = "_quick" if args.quick else ""
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"b5_latency_{args.arch}{tag}.json")
    lt = args.latency_threads

    t_start = time.perf_counter()
    data, report_set, sx, sy, recal_x, teacher = setup(args)
    x = sx[:1]
    base_macs, base_params = tp.utils.count_ops_and_params(teacher, x)
    teacher_correct = correctness(teacher, report_set)

    space = PruningSpace.from_model(teacher, x, round_to=kernel_step())
    t0 = time.perf_counter()
    table = LatencyTable.measure(teacher, space, x, threads=lt, cache=False)
    build_s = time.perf_counter() - t0
    teacher_ms = ms_of(teacher, x, lt)
    log(f"{args.arch}: {table!r}; built in {build_s:.1f} s; teacher {teacher_ms:.3f} ms measured")
    errors = error_study(teacher, space, table, x, args.error_plans, lt)
    log(f"prediction error: median {errors['median_abs_error']:.1%}, p90 {errors['p90_abs_error']:.1%}; "
        f"unsnapped/snapped ms {errors['unsnapped_over_snapped_ms_median']:.2f}x at "
        f"{errors['unsnapped_over_snapped_macs_median']:.2f}x the MACs")
    results = {"settings": vars(args), "teacher": {"macs": base_macs, "params": base_params, "ms": teacher_ms,
                                                   "top1_report": float(teacher_correct.mean())},
               "table": {"build_s": build_s, "repr": repr(table), "step": table.step, "key": table.key,
                         "calibration": table.calibration}, "errors": errors, "budgets": {}, "rows": []}
    same = ("methods", "cut_steps")
    if out.exists():  # resume: keep the rows already measured with the same settings (methods may differ)
        old = json.loads(out.read_text())
        if {k: v for k, v in old["settings"].items() if k not in same} == \
                {k: v for k, v in vars(args).items() if k not in same}:
            results["rows"], results["budgets"] = old["rows"], old["budgets"]
    done = {(r["budget"], r["seed"], r["method"]) for r in results["rows"]}

    def save():
        results["wall_time_s"] = time.perf_counter() - t_start
        write_json(out, results)

    def macs_of(model):
        return tp.utils.count_ops_and_params(model, x)[0]

    for name in args.budgets.split(","):
        known = results["budgets"].get(name)  # a resumed run keeps its budgets
        if known:
            budget_ms = known["ms"]
        elif name == "a":
            ref = tp_at(teacher, x, macs_of, 0.25 * base_macs, False, steps=14)
            budget_ms = ms_of(ref, x, lt)
        else:
            budget_ms = 0.4 * teacher_ms
        todo = {m for m in methods if any((name, s, m) not in done for s in seeds)}
        wanted = {m for m in todo if m.startswith("tp-")} | (set() if known else {"tp-uniform"})  # ga-macs target
        tp_models = {m: tp_at(teacher, x, lambda net: ms_of(net, x, lt), budget_ms, m == "tp-global",
                              round_to=table.step if m.endswith("-snap") else None) for m in sorted(wanted)}
        macs_frac = known["ga_macs_target"] if known else macs_of(tp_models["tp-uniform"]) / base_macs
        results["budgets"][name] = {"ms": budget_ms, "ga_macs_target": macs_frac}
        log(f"budget {name}: {budget_ms:.3f} ms ({budget_ms / teacher_ms:.0%} of the teacher); ga-macs target "
            f"{macs_frac:.1%} MACs")
        for seed in seeds:
            for method in methods:
                if (name, seed, method) in done:
                    continue
                t0 = time.perf_counter()
                row = {"budget": name, "budget_ms": budget_ms, "seed": seed, "method": method}
                if method.startswith("tp-"):
                    model = copy.deepcopy(tp_models[method])
                else:
                    kw = dict(target_kind="latency", target=budget_ms, threads=lt) if "latency" in method else \
                        dict(target=macs_frac)
                    fit = FitnessConfig(cut_steps=args.cut_steps if method == "ga-latency-distil" else 0)
                    res = search(teacher, x, sx, sy, recal_x=recal_x, rounds=1, generations=args.generations,
                                 fitness=fit, population=args.population, elites=args.elites, seed=seed,
                                 verbose=False, progress=False, **kw, **SEARCH_SETTINGS.get(method, {}))
                    sp = PruningSpace.from_model(teacher, x, with_cost=False)
                    model = apply_plan(teacher, PruningPlan.from_dict(res.plans[0]), x, space=sp)
                    scores = [s for s, _ in res.evaluated[0]]
                    row.update(search_score=res.rows[0]["search_score"], evaluations=len(scores),
                               near_chance=sum(s <= NEAR_CHANCE for s in scores) / len(scores),
                               cut=res.rows[0]["cut"], predicted_ms=res.rows[0].get("predicted_ms"))
                row["search_time_s"] = time.perf_counter() - t0
                macs, params = tp.utils.count_ops_and_params(model, x)
                row.update(macs=macs, params=params, macs_pct=100 * macs / base_macs, ms=ms_of(model, x, lt))
                recalibrate_bn(model, recal_x)
                calib = correctness(model, report_set)
                row["top1_calib"], row["correct_calib"] = float(calib.mean()), bits(calib)
                if args.ft_epochs > 0:
                    t1 = time.perf_counter()
                    steps = None if args.ft_epochs >= 1 else max(1, int(args.ft_epochs * len(data.train) / 64))
                    finetune(model, data.train, max(1, int(np.ceil(args.ft_epochs))), teacher=teacher,
                             lr=args.ft_lr, batch_size=64, seed=seed, max_batches=steps, progress=False)
                    ft = correctness(model.cpu().eval(), report_set)
                    row["top1_ft"], row["correct_ft"] = float(ft.mean()), bits(ft)
                    row["ft_time_s"] = time.perf_counter() - t1
                results["rows"].append(row)
                save()
                log(f"{name} seed {seed} {method:14s} {row['ms']:.3f} ms (budget {budget_ms:.3f}) MACs "
                    f"{row['macs_pct']:5.1f}% calib {row['top1_calib']:.4f}"
                    + (f" ft {row['top1_ft']:.4f}" if "top1_ft" in row else "")
                    + (f" near-chance {row['near_chance']:.0%}" if "near_chance" in row else ""))
    text = render(results) + "\n" + cross_budget(results)
    write_text(out.with_suffix(".md"), text)
    print(text)
    log(f"done in {time.perf_counter() - t_start:.0f} s -> {out}")


def cross_budget(results, regime: str = "ft") -> str:
    """Equal top-1 at lower latency: ga-latency at budget b against each other method at budget a (paired by seed
    and image), with the ratio of their measured latencies."""
    rows = [r for r in results["rows"] if f"correct_{regime}" in r]
    ga = [r for r in rows if r["budget"] == "b" and r["method"] == "ga-latency"]
    if not ga:
        return ""
    when = "after fine-tuning" if regime == "ft" else "calib"
    lines = [f"### ga-latency at budget b against the others at budget a ({when})",
             "", "| method at budget a | its ms / ga-latency's ms | ga-latency (b) minus method (a) [95 % CI] |",
             "|---|---|---|"]
    ga_ms = statistics.mean(r["ms"] for r in ga)
    for m in METHODS:
        other = [r for r in rows if r["budget"] == "a" and r["method"] == m]
        if other:
            ratio = statistics.mean(r["ms"] for r in other) / ga_ms
            lines.append(f"| {m} | {ratio:.2f}x | {paired_cell(ga, other, regime, 'ga-latency (b)')} |")
    return "\n".join(lines) + "\n"


def _ms(vals, digits=3):
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.{digits}f}"


def render(results) -> str:
    t, e = results["teacher"], results["errors"]
    lines = [f"Teacher: top-1 {t['top1_report']:.4f} on val-report, {t['ms']:.3f} ms (ONNX Runtime, batch 1), "
             f"{t['macs'] / 1e6:.1f} MMACs.", "",
             f"Latency table: {results['table']['repr']}, built in {results['table']['build_s']:.1f} s. Prediction "
             f"error over {len(e['plans'])} random plans (widths in multiples of {results['table']['step']}): median "
             f"{e['median_abs_error']:.1%}, 90th percentile {e['p90_abs_error']:.1%}. The same plans with widths "
             f"1-{results['table']['step'] - 1} channels lower: {e['unsnapped_over_snapped_ms_median']:.2f}x the "
             f"measured latency at {e['unsnapped_over_snapped_macs_median']:.2f}x the MACs (median).", ""]
    rows = results["rows"]
    for name, b in results["budgets"].items():
        for regime in ("calib", "ft"):
            sub = [r for r in rows if r["budget"] == name and f"top1_{regime}" in r]
            if not sub:
                continue
            title = "BN re-calibration only" if regime == "calib" else "after fine-tuning with KD"
            lines += [f"### Budget {name}: {b['ms']:.3f} ms ({b['ms'] / t['ms']:.0%} of the teacher), {title}", "",
                      "| method | seeds | measured ms | MACs % | params (M) | top-1 (mean ± sd) | near-chance evals | "
                      "ga-latency minus method [95 % CI] |", "|---|---|---|---|---|---|---|---|"]
            base = [r for r in sub if r["method"] == "ga-latency"]
            order = {m: i for i, m in enumerate(METHODS)}
            for m in sorted(dict.fromkeys(r["method"] for r in sub), key=lambda m: order.get(m, len(order))):
                mr = sorted((r for r in sub if r["method"] == m), key=lambda r: r["seed"])
                vals = [100 * r[f"top1_{regime}"] for r in mr]
                nc = [r["near_chance"] for r in mr if "near_chance" in r]
                lines.append(f"| {m} | {len(mr)} | {_ms([r['ms'] for r in mr])} | "
                             f"{statistics.mean(r['macs_pct'] for r in mr):.1f} | "
                             f"{statistics.mean(r['params'] for r in mr) / 1e6:.2f} | {_ms(vals, 2)} | "
                             f"{f'{statistics.mean(nc):.0%}' if nc else '-'} | "
                             f"{'-' if m == 'ga-latency' else paired_cell(base, mr, regime, 'ga-latency')} |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
