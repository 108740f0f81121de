"""B6: structural distillation without training. What the least-squares refit (and bias compensation) recovers
after pruning, on the GA's, random search's and a uniform-L1 plan, and whether scoring plans after the refit helps.

    python benchmarks/b6_reconstruct.py --arch resnet18_tv --budgets 0.25,0.1 --seeds 0,1,2     # about 45 min
    python benchmarks/b6_reconstruct.py --arch vgg16_bn --budgets 0.25 --seeds 0 --plans ga,random,uniform
    python benchmarks/b6_reconstruct.py --quick                                                # smoke test only

Data and splits as B1s (b1_seeds.setup): fitness on 1,000 images of val-search, every top-1 here on val-report
(2,500 images); calibration images are the BN re-calibration batches (16 x 64 = 1,024 training images, labels
unused). Connection genes on (the default). Plans per (budget, seed), all at the same MACs budget:

  ga          evoprune's default search (rounds=1), fitness top-1 after BN re-calibration
  ga-refit    the same search with FitnessConfig(reconstruct="lsq"): plans scored after the cheap teacher-input refit
  random      random search at the GA's evaluations (method="random")
  uniform     one width ratio for every group, channels by L1 (torch-pruning's uniform GroupMagnitudeImportance
              expressed as a plan of the space, so it can be reconstructed), the ratio bisected to the budget

Recoveries of each plan (no training): recal (BN re-calibration only), bias (bias compensation alone),
bias+recal (then BN re-calibration), lsq (the sequential least-squares refit, no re-calibration), lsq+recal (then
BN re-calibration), lsq-select (lsq, then BN re-calibration only where it scores higher on the fitness subset:
what search() does). Also: seconds and peak RSS growth per reconstruction, lsq at 256/512/1024/2048 calibration
images (--sweep), at the first budget KD fine-tunes of the GA's plan after recal and after lsq (--ft-epochs, and
the shorter --ft-curve), and the refit-aware fitness's cost and rank agreement on --fidelity plans.
Paired bootstrap CIs (seeds, then images) as B1s. Resumes: rows already in --out are kept.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from b1_seeds import SHARED, bits, correctness, log, paired_cell, setup  # noqa: E402
from evoprune import FitnessConfig, PruningPlan, PruningSpace, reconstruct, search, slice_plan  # noqa: E402
from evoprune.evolve.fitness import recalibrate_bn  # noqa: E402
from evoprune.space.importance import channel_importance  # noqa: E402
from evoprune.storage import write_json, write_text  # noqa: E402
from evoprune.train import finetune  # noqa: E402

PLANS = ("ga", "ga-refit", "random", "uniform")
RECOVERIES = ("recal", "bias", "bias+recal", "lsq", "lsq+recal", "lsq-select")


class PeakRSS:
    """Peak resident-set growth of this process while the block runs (polled every 20 ms)."""

    def __enter__(self):
        self.proc, self.base, self.peak, self.stop = psutil.Process(), psutil.Process().memory_info().rss, 0, False
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()


def uniform_plan(teacher, space, x, budget, *, index: int = 0, steps: int = 20) -> PruningPlan:
    """torch-pruning's uniform L1 allocation: the highest-L1 channels at one keep ratio in every group, bisected
    (``steps`` halvings) to the largest ratio whose cost (``space.cost(plan)[index]``: 0 MACs, 1 params) is within
    ``budget``; no unit cut."""
    imp = channel_importance(teacher, space, x, "l1")
    order = {g.name: np.argsort(-np.asarray(imp[g.name]), kind="stable") for g in space.groups}

    def plan(r):
        groups = {g.name: tuple(sorted(int(i) for i in order[g.name][:max(1, math.ceil(r * g.size))]))
                  for g in space.groups}
        return PruningPlan(groups, {u.name: True for u in space.units}, fingerprint=space.fingerprint)
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        if space.cost(plan(mid))[index] > budget:
            hi = mid
        else:
            lo = mid
    return plan(lo)


_LAST: dict = {}  # the last lsq refit (plan, calibration images): lsq+recal and lsq-select start from it
SELECT = {}  # "lsq-select" scores both candidates on the fitness subset: SELECT["x"], SELECT["y"] (set in main)


def search_top1(model) -> float:
    with torch.inference_mode():
        return float((model.eval()(SELECT["x"]).argmax(1) == SELECT["y"]).float().mean())


def recover(teacher, plan, space, recal_x, how, calib):
    """The plan's model after the recovery ``how``, with the reconstruction's seconds and peak RSS growth.
    ``lsq-select``: lsq, then BN re-calibration only if that scores higher on the fitness subset (as search does)."""
    if how in ("lsq+recal", "lsq-select"):  # one refit serves lsq, lsq+recal and lsq-select
        model, secs, peak = recover(teacher, plan, space, recal_x, "lsq", calib)
        alt = recalibrate_bn(copy.deepcopy(model), recal_x)
        if how == "lsq+recal":
            return alt, secs, peak
        return (alt if search_top1(alt) > search_top1(model) else model), secs, peak
    key = (id(plan), id(calib[0]), len(calib), how)
    if how == "lsq" and key in _LAST:
        model, secs, peak = _LAST[key]
        return copy.deepcopy(model), secs, peak
    model = slice_plan(teacher, plan, space)
    seconds, peak = 0.0, 0
    method = {"recal": "none", "bias": "bias", "bias+recal": "bias", "lsq": "lsq", "recal+lsq": "lsq"}[how]
    if how == "recal+lsq":
        recalibrate_bn(model, recal_x)
    if method != "none":
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            model = reconstruct(teacher, model, plan, space, calib, method, inplace=True)
            seconds = time.perf_counter() - t0
        peak = mem.peak
    if how in ("recal", "bias+recal"):
        recalibrate_bn(model, recal_x)
    if how == "lsq":
        _LAST.clear()
        _LAST[key] = copy.deepcopy(model), seconds, peak
    return model, seconds, peak


def fidelity(teacher, space, x, sx, sy, recal_x, report_set, frac, n) -> dict:
    """``n`` MACs-matched plans at ``frac`` (half random, half importance-seeded, the GA's initial kinds): their
    fitness with and without the cheap refit (seconds per evaluation), and val-report top-1 after BN re-calibration
    and after the full sequential lsq; Kendall tau between them."""
    from deap import base
    from evoprune import Evaluator, register
    plans = []
    ev = {h: Evaluator(teacher, space, sx, sy, recal_x, FitnessConfig(reconstruct=h)) for h in ("none", "lsq")}
    imp = channel_importance(teacher, space, x, "l1")
    random.seed(0)  # register seeds nothing: the plans come from the global generators, as they did
    np.random.seed(0)
    for init in ("random", "importance"):
        tb = register(base.Toolbox(), space, ev["none"], macs_budget=frac * space.base_macs, importance=imp,
                      init=init, init_cut=0.2)
        plans += tb.population(n=n // 2)
    rows = []
    ev["lsq"](plans[0])  # collects the teacher's Gram matrices once: timed apart
    for ind in plans:
        row = {}
        for h, e in ev.items():
            t0 = time.perf_counter()
            row[f"score_{h}"] = e(ind)[0]
            row[f"eval_s_{h}"] = time.perf_counter() - t0
        plan = space.decode(ind)
        for how in ("recal", "lsq", "recal+lsq"):
            model, secs, _ = recover(teacher, plan, space, recal_x, how, recal_x)
            row[f"report_{how}"] = float(correctness(model, report_set).mean())
            if how == "lsq":
                row["lsq_s"] = secs
        row["cut"] = list(plan.cut)
        rows.append(row)
        log(f"fidelity plan {len(rows)}/{len(plans)}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                                   if isinstance(v, float)))
    t0 = time.perf_counter()
    from evoprune.prune.grams import TeacherGrams
    from evoprune.prune.lsq import calibration_subset
    TeacherGrams.collect(teacher, space, calibration_subset(recal_x, 1024))
    collect_s = time.perf_counter() - t0
    for e in ev.values():
        e.release()
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    return {"rows": rows, "collect_s": collect_s, "tau": {
        "refit_score~report_lsq": kendall(col("score_lsq"), col("report_lsq")),
        "recal_score~report_lsq": kendall(col("score_none"), col("report_lsq")),
        "refit_score~report_recal": kendall(col("score_lsq"), col("report_recal")),
        "recal_score~report_recal": kendall(col("score_none"), col("report_recal")),
        "report_recal~report_lsq": kendall(col("report_recal"), col("report_lsq")),
    }, "mean": {k: statistics.mean(col(k)) for k in ("report_recal", "report_lsq", "report_recal+lsq")}}


def kendall(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    s = np.sign(a[:, None] - a[None, :]) * np.sign(b[:, None] - b[None, :])
    n = len(a)
    return float(s[np.triu_indices(n, 1)].sum() / (n * (n - 1) / 2))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("resnet18_tv", "vgg16_bn"), default="resnet18_tv")
    p.add_argument("--quick", action="store_true", help="1 seed, a tiny search, no fine-tune: a smoke test")
    p.add_argument("--data", default=str(SHARED / "data" / "cifar10-jpeg-trainval.tar.gz"))
    p.add_argument("--budgets", default="0.25,0.1")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--plans", default=",".join(PLANS))
    p.add_argument("--recoveries", default=",".join(RECOVERIES))
    p.add_argument("--population", type=int, default=30)
    p.add_argument("--elites", type=int, default=5)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--score-samples", type=int, default=1000)
    p.add_argument("--recal-batches", type=int, default=16, help="64-image training batches (calibration images)")
    p.add_argument("--sweep", default="256,512,1024,2048", help="calibration images for lsq on the GA's plan")
    p.add_argument("--ft-epochs", type=float, default=1.0, help="fine-tune epochs at the first budget (0: none)")
    p.add_argument("--ft-lr", type=float, default=0.01)
    p.add_argument("--ft-curve", default="0.1,0.3", help="shorter fine-tunes (epochs) of the same plans, recal and lsq")
    p.add_argument("--fidelity", type=int, default=24, help="plans for the refit-aware fitness's rank study")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.population, args.elites, args.generations = "0", 6, 2, 1
        args.score_samples, args.recal_batches, args.ft_epochs, args.budgets = 200, 4, 0.0, "0.25"
        args.sweep, args.fidelity, args.ft_curve = "128,256", 6, ""
    torch.set_num_threads(args.threads)
    plans = [m for m in args.plans.split(",") if m]
    if set(plans) - set(PLANS):
        p.error(f"unknown plan(s) {', '.join(sorted(set(plans) - set(PLANS)))}; choose from {', '.join(PLANS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    recoveries = [h for h in RECOVERIES if h in args.recoveries.split(",")]
    sweep = [int(s) for s in args.sweep.split(",") if s]
    out = Path(args.out or ROOT / "benchmarks" / "results"
               / f"b6_reconstruct_{args.arch}{'_quick' if args.quick else ''}.json")

    t_start = time.perf_counter()
    ns = argparse.Namespace(**vars(args))
    ns.recal_batches = max(args.recal_batches, math.ceil(max(sweep + [0]) / 64))
    data, report_set, sx, sy, recal_all, teacher = setup(ns)
    recal_x = recal_all[:args.recal_batches]
    x = sx[:1]
    SELECT.update(x=sx, y=sy)
    space = PruningSpace.from_model(teacher, x)
    teacher_correct = correctness(teacher, report_set)
    results = {"settings": vars(args), "teacher": {"macs": space.base_macs, "params": space.base_params,
                                                   "top1_report": float(teacher_correct.mean())}, "rows": []}
    if out.exists():
        old = json.loads(out.read_text())
        keep = ("plans", "sweep", "ft_epochs", "fidelity", "ft_curve", "recoveries")
        if {k: v for k, v in old["settings"].items() if k not in keep} == \
                {k: v for k, v in vars(args).items() if k not in keep}:
            results["rows"] = old["rows"]
            if old.get("fidelity") and old["settings"].get("fidelity") == args.fidelity:
                results["fidelity"] = old["fidelity"]
    done = {(r["budget"], r["seed"], r["plan"], r["recovery"], r.get("images")) for r in results["rows"]}
    log(f"{args.arch}: teacher top-1 on val-report {teacher_correct.mean():.4f}; {len(done)} rows already measured")

    def save():
        results["wall_time_s"] = time.perf_counter() - t_start
        write_json(out, results)

    def add(row, model, **extra):
        macs, params = space.cost(row.pop("_plan"))
        c = correctness(model, report_set)
        row.update(macs_pct=100 * macs / space.base_macs, params=params, top1=float(c.mean()), correct=bits(c), **extra)
        results["rows"].append(row)
        save()
        log(f"{row['budget']:.0%} seed {row['seed']} {row['plan']:9s} {row['recovery']:10s}"
            f"{'' if row.get('images') is None else ' ' + str(row['images']) + ' img'} MACs {row['macs_pct']:5.1f}% "
            f"top-1 {row['top1']:.4f}" + (f" ({row['reconstruct_s']:.1f} s)" if row.get("reconstruct_s") else ""))

    chosen: dict = {}
    stored = {(r["budget"], r["seed"], r["plan"]): r for r in results["rows"] if "plan_dict" in r}

    def plan_of(frac, seed, name):
        """The plan of (budget, seed, method) and its search facts: from a stored row, or found now (memoised)."""
        key = (frac, seed, name)
        if key in chosen:
            return chosen[key]
        if key in stored:
            r = stored[key]
            chosen[key] = PruningPlan.from_dict(r["plan_dict"]), {
                k: r[k] for k in ("search_score", "evaluations", "best_by_gen", "search_time_s", "cut") if k in r}
            return chosen[key]
        t0 = time.perf_counter()
        if name == "uniform":
            plan, info = uniform_plan(teacher, space, x, frac * space.base_macs), {}
        else:
            kw = {"method": "random"} if name == "random" else {}
            fit = FitnessConfig(reconstruct="lsq") if name == "ga-refit" else None
            res = search(teacher, x, sx, sy, recal_x=recal_x, rounds=1, generations=args.generations,
                         population=args.population, elites=args.elites, target=frac, seed=seed,
                         verbose=False, progress=False, reconstruct="none", fitness=fit, **kw)
            plan = PruningPlan.from_dict(res.plans[0])
            info = {"search_score": res.rows[0]["search_score"], "evaluations": res.rows[0]["evaluations"],
                    "best_by_gen": [r["best"] for r in res.logbook]}
        info["search_time_s"] = time.perf_counter() - t0
        info["cut"] = list(plan.cut)
        chosen[key] = plan, info
        return chosen[key]

    first = float(args.budgets.split(",")[0])
    for frac in [float(b) for b in args.budgets.split(",")]:
        for seed in seeds:
            for name in plans:
                for how in recoveries:
                    if (frac, seed, name, how, None) in done:
                        continue
                    plan, info = plan_of(frac, seed, name)
                    model, secs, peak = recover(teacher, plan, space, recal_x, how, recal_x)
                    add({"budget": frac, "seed": seed, "plan": name, "recovery": how, "_plan": plan}, model,
                        reconstruct_s=secs, peak_rss_mb=peak / 2**20, plan_dict=plan.to_dict(), **info)
            for n in sweep if "ga" in plans else ():  # calibration images, on the GA's plan
                if (frac, seed, "ga", "lsq", n) in done:
                    continue
                plan, _ = plan_of(frac, seed, "ga")
                calib = recal_all[:math.ceil(n / 64)]
                calib[-1] = calib[-1][:n - 64 * (len(calib) - 1)]
                model, secs, peak = recover(teacher, plan, space, recal_x, "lsq", calib)
                add({"budget": frac, "seed": seed, "plan": "ga", "recovery": "lsq", "images": n, "_plan": plan},
                    model, reconstruct_s=secs, peak_rss_mb=peak / 2**20)
        curve = [(f"ft{e:g}", e) for e in (float(v) for v in args.ft_curve.split(",") if v)]
        for seed in seeds if args.ft_epochs > 0 and "ga" in plans and frac == first else ():
            for tag, ft_epochs in [("ft", args.ft_epochs)] + curve:
                for how in ("recal", "lsq"):
                    if (frac, seed, "ga", f"{how}+{tag}", None) in done:
                        continue
                    plan, _ = plan_of(frac, seed, "ga")
                    model, _, _ = recover(teacher, plan, space, recal_x, how, recal_x)
                    t1 = time.perf_counter()
                    epochs = max(1, int(np.ceil(ft_epochs)))
                    steps = None if ft_epochs >= 1 else max(1, int(ft_epochs * len(data.train) / 64))
                    finetune(model, data.train, epochs, teacher=teacher, lr=args.ft_lr, batch_size=64, seed=seed,
                             max_batches=steps, progress=False)
                    add({"budget": frac, "seed": seed, "plan": "ga", "recovery": f"{how}+{tag}", "_plan": plan},
                        model.cpu().eval(), ft_time_s=time.perf_counter() - t1)
    if args.fidelity > 0 and not results.get("fidelity"):
        results["fidelity"] = fidelity(teacher, space, x, sx, sy, recal_x, report_set, first, args.fidelity)
        save()
    write_text(out.with_suffix(".md"), render(results))
    print(render(results))
    log(f"done in {time.perf_counter() - t_start:.0f} s -> {out}")


def render(results) -> str:
    rows = results["rows"]
    teacher = results["teacher"]["top1_report"]
    lines = [f"Teacher top-1 on val-report: {teacher:.4f}", ""]
    fid = results.get("fidelity")
    if fid:
        r = fid["rows"]
        mean = lambda k: statistics.mean(x[k] for x in r)  # noqa: E731
        lines += [f"Refit-aware fitness, {len(r)} MACs-matched plans (half random, half importance-seeded): "
                  f"{mean('eval_s_none'):.2f} s per evaluation without the refit, {mean('eval_s_lsq'):.2f} s with "
                  f"it (+{fid['collect_s']:.0f} s per round to collect the teacher's Gram matrices)"
                  + (f"; the full sequential lsq {mean('lsq_s'):.1f} s per plan" if mean("lsq_s") else "")
                  + ". Kendall tau:", "",
                  "| pair | tau |", "|---|---|"] + [f"| {k} | {v:+.3f} |" for k, v in fid["tau"].items()] + [""]
        lines += ["Mean val-report top-1 over those plans: " + ", ".join(
            f"{k.removeprefix('report_')} {100 * v:.2f}" for k, v in fid["mean"].items())
            + " (recal+lsq: BN re-calibration before the refit)", ""]
    for frac in sorted({r["budget"] for r in rows}, reverse=True):
        sub = [r for r in rows if r["budget"] == frac and r.get("images") is None]
        lines += [f"### {frac:.0%} MACs", "",
                  "| plan | recovery | seeds | MACs % | top-1 (mean ± sd) | gap to teacher (pp) | s / refit | "
                  "peak RSS (MB) | minus recal (+ the same fine-tune), same plan [95 % CI] |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for plan in dict.fromkeys(r["plan"] for r in sub):
            for how in dict.fromkeys(r["recovery"] for r in sub if r["plan"] == plan):
                mr = sorted((r for r in sub if r["plan"] == plan and r["recovery"] == how), key=lambda r: r["seed"])
                vals = [r["top1"] for r in mr]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                tail = how.split("+")[-1]
                ref = f"recal+{tail}" if tail.startswith("ft") else "recal"  # fine-tuned rows: against recal + same
                base = [r for r in sub if r["plan"] == plan and r["recovery"] == ref]
                cell = "-" if how == ref else _diff(mr, base)
                lines.append(f"| {plan} | {how} | {len(vals)} | {statistics.mean(r['macs_pct'] for r in mr):.1f} | "
                             f"{100 * statistics.mean(vals):.2f} ± {100 * sd:.2f} | "
                             f"{100 * (statistics.mean(vals) - teacher):+.2f} | "
                             f"{statistics.mean(r.get('reconstruct_s', 0) for r in mr):.1f} | "
                             f"{statistics.mean(r.get('peak_rss_mb', 0) for r in mr):.0f} | {cell} |")
        lines.append("")
        lines += ["Between plans, same recovery (row minus ga):", "", "| recovery | plan | ga minus plan [95 % CI] |",
                  "|---|---|---|"]
        for how in ("recal", "lsq", "lsq-select"):
            ga = [r for r in sub if r["plan"] == "ga" and r["recovery"] == how]
            for plan in dict.fromkeys(r["plan"] for r in sub):
                if plan != "ga":
                    lines.append(f"| {how} | {plan} | "
                                 f"{_diff(ga, [r for r in sub if r['plan'] == plan and r['recovery'] == how])} |")
        lines.append("")
        sweep = [r for r in rows if r["budget"] == frac and r.get("images") is not None]
        if sweep:
            lines += ["lsq on the GA's plan by calibration images:", "", "| images | seeds | top-1 | s / refit | "
                      "peak RSS (MB) |", "|---|---|---|---|---|"]
            for n in sorted({r["images"] for r in sweep}):
                mr = [r for r in sweep if r["images"] == n]
                vals = [r["top1"] for r in mr]
                lines.append(f"| {n} | {len(mr)} | {100 * statistics.mean(vals):.2f} ± "
                             f"{100 * (statistics.stdev(vals) if len(vals) > 1 else 0):.2f} | "
                             f"{statistics.mean(r['reconstruct_s'] for r in mr):.1f} | "
                             f"{statistics.mean(r['peak_rss_mb'] for r in mr):.0f} |")
            lines.append("")
    return "\n".join(lines)


def _diff(rows_a, rows_b) -> str:
    """mean(a - b) in pp over common seeds, paired by image (b1_seeds.paired_cell on the 'correct' bits)."""
    a = [dict(r, correct_x=r["correct"]) for r in rows_a]
    b = [dict(r, correct_x=r["correct"]) for r in rows_b]
    return paired_cell(a, b, "x", "row").replace("row better", "better").replace("row worse", "worse")


if __name__ == "__main__":
    main()
