"""B7: search-efficiency curves. The val-report top-1 of the plan each method would choose so far, against fitness
evaluations and against seconds, at the same budget, objective and snapping, connection genes on (the default).

    python benchmarks/b7_search_curves.py --arch resnet18_tv --seeds 0,1,2                      # about 40 min
    python benchmarks/b7_search_curves.py --arch resnet18_tv --latency a --ft-epochs 1 --seeds 0,1,2
    python benchmarks/b7_search_curves.py --arch vgg16_bn --seeds 0 --methods ga,random,knapsack,l1-uniform
    python benchmarks/b7_search_curves.py --quick                                               # smoke test only

Data and splits as B1s/B6 (b1_seeds.setup): the fitness scores plans on 1,000 images of val-search; the other
1,500 images of val-search (val-choose) choose each method's plan among its 5 best (the search's final choice,
the same rule for every method); every top-1 quoted is on val-report (2,500 images), which nothing selects on.
Recovery: the default lsq refit on 1,024 calibration images, then BN re-calibration where it scores higher on the
fitness subset ("lsq-select", as search() does). With --ft-epochs the last checkpoint's plan is also KD
fine-tuned from the teacher.

Methods (rows already in --out are kept; --mult sets how far the curves go, in multiples of the default 130
evaluations):

  ga          the default search (level-switch mutation, duplicate rejection, final choice on val-choose)
  ga-screen   the same, staged: 50 children screened on 25 % of the images, the best 10 scored in full
  ga-mixed    the search before B7: mutation "mixed", no duplicate rejection, the best fitness score wins
  ga-paper    the paper's operators (--crossover paper --mutation bitflip) with the default final choice
  random      random search (method="random"); curve points are prefixes of one run
  init        the GA's initial population alone (method="init"); prefixes likewise
  knapsack    widths by dynamic programming over the cost table, values from L1 importance (one evaluation;
              evoprune.evolve.knapsack's defaults, chosen on val-choose)
  l1-uniform  torch-pruning's uniform L1 allocation as a plan (one width ratio, bisected to the budget; at a
              latency budget with round_to = the channel block, torch-pruning's way to stay on fast kernels)
  l1-global   torch-pruning's global L1 allocation as a plan (scores / group mean, one threshold)

Paired bootstrap CIs (seeds, then images) as B1s: "beats" only where the CI excludes 0.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from b1_seeds import bits, bootstrap_diff, correctness, log, setup, unbits  # noqa: E402
from b6_reconstruct import uniform_plan  # noqa: E402
from evoprune import PruningPlan, Search, reconstruct, slice_plan  # noqa: E402
from evoprune.prune.bn import recalibrate_bn  # noqa: E402
from evoprune.data import normalize  # noqa: E402
from evoprune.space.importance import channel_importance  # noqa: E402
from evoprune.evolve.round import final_choice  # noqa: E402
from evoprune.storage import write_json, write_text  # noqa: E402
from evoprune.train import finetune  # noqa: E402

SEARCHES = {
    "ga": {},
    "ga-screen": {"screen": 0.25, "offspring": 50, "survivors": 10},
    "ga-mixed": {"mutation": "mixed", "dedupe": False, "final_pool": 1},
    "ga-paper": {"crossover": "paper", "mutation": "bitflip"},
    "random": {"method": "random"},
    "init": {"method": "init"},
    "knapsack": {"method": "knapsack"},
}
PLANS = ("l1-uniform", "l1-global")
ALL = tuple(SEARCHES) + PLANS
DEFAULT = ("ga", "random", "init", "knapsack", "l1-uniform", "l1-global", "ga-mixed", "ga-paper", "ga-screen")
GENS = (0, 2, 4, 8, 16)  # curve points, in generations of the default GA (30 + 25 g evaluations)


def global_plan(teacher, space, x, budget, cost) -> PruningPlan:
    """torch-pruning's global L1 allocation as a plan: channel scores divided by their group's mean, one threshold
    for all groups (bisected so that ``cost(plan) <= budget``), every group keeping at least one channel."""
    imp = channel_importance(teacher, space, x, "l1")
    normed = {g.name: np.asarray(imp[g.name], dtype=float) / max(float(np.mean(imp[g.name])), 1e-12)
              for g in space.groups}

    def plan(q):
        allv = np.concatenate(list(normed.values()))
        t = np.quantile(allv, q)
        groups = {}
        for g in space.groups:
            keep = np.flatnonzero(normed[g.name] >= t)
            if len(keep) == 0:
                keep = [int(np.argmax(normed[g.name]))]
            groups[g.name] = tuple(sorted(int(i) for i in keep))
        return PruningPlan(groups, {u.name: True for u in space.units}, fingerprint=space.fingerprint)
    lo, hi = 0.0, 1.0  # q: the share of channels removed
    for _ in range(30):
        mid = (lo + hi) / 2
        if cost(plan(mid)) > budget:
            lo = mid
        else:
            hi = mid
    return plan(hi)


def recover(teacher, plan, space, calib, recal_x, sx, sy):
    """lsq refit, then BN re-calibration where it scores higher on the fitness subset (search()'s recovery)."""
    model = reconstruct(teacher, slice_plan(teacher, plan, space), plan, space, calib, "lsq", inplace=True)
    alt = recalibrate_bn(copy.deepcopy(model), recal_x)

    def top1(m):
        with torch.inference_mode():
            return float((m.eval()(sx).argmax(1) == sy).float().mean())
    return alt if top1(alt) > top1(model) else model


class Curve:
    """Runs one method's search and measures the plan it would choose at each curve point."""

    def __init__(self, args, ctx, method, seed):
        self.args, self.ctx, self.method, self.seed = args, ctx, method, seed
        self.points = []

    def measure(self, plan, space, evals, seconds, search_score, choice_score):
        c = self.ctx
        t0 = time.perf_counter()
        model = recover(c.teacher, plan, space, c.calib, c.recal_x, c.sx, c.sy)
        rep = correctness(model, c.report_set)
        choose = float(correctness(model, c.choose_set).mean())
        self.points.append({"evals": evals, "seconds": seconds, "search_score": search_score,
                            "choice_score": choice_score, "top1_report": float(rep.mean()), "correct": bits(rep),
                            "top1_choose": choose, "recover_s": time.perf_counter() - t0,
                            "macs_frac": space.cost(plan)[0] / space.base_macs, "cut": list(plan.cut),
                            "widths": {k: len(v) for k, v in plan.groups.items()}})
        log(f"  {self.method} seed {self.seed}: {evals} evals, {seconds:.0f} s: top-1 {rep.mean():.4f} "
            f"(choose {choose:.4f}, search {search_score:.4f}), cut {list(plan.cut) or 'none'}")
        return model


def run_search(args, ctx, method, seed, budget_kw) -> Curve:
    mult = args.mult if method in args.long.split(",") else 1
    cfg = dict(SEARCHES[method], rounds=1, seed=seed, population=args.population, elites=args.elites,
               generations=mult * args.generations)  # random and init: as many evaluations as the GA's curve
    curve = Curve(args, ctx, method, seed)
    pool = 1 if cfg.get("final_pool") == 1 else 5
    t0 = time.perf_counter()
    run = Search(ctx.teacher, ctx.x, ctx.sx, ctx.sy, recal_x=ctx.recal_x, choose_x=ctx.cx, choose_y=ctx.cy,
                 reconstruct="none", progress=False, verbose=False, **budget_kw, **cfg)
    rnd = run.start_round(1)
    t_first = time.perf_counter() - t0
    spent = 0.0

    def point(candidates, evals, seconds):
        view = types.SimpleNamespace(population=candidates, front=[], budget=rnd.budget, space=rnd.space,
                                     evaluator=rnd.evaluator)
        best, choice, _ = final_choice(view, pool, ctx.cx if pool > 1 else None, ctx.cy)
        return curve.measure(rnd.space.decode(best), rnd.space, evals, seconds, best.fitness.values[0], choice)

    per_gen = args.population - args.elites
    points = [args.population + per_gen * g for g in GENS if g <= mult * args.generations]
    last = None
    if method in ("random", "init", "knapsack"):
        total = len(rnd.population)
        for n in ([1] if method == "knapsack" else points):
            last = point(rnd.population[:n], n, t_first * n / total)
    else:
        while True:
            evals = sum(r["evals"] + math.ceil(r.get("screened", 0) * cfg.get("screen", 1.0))
                        for r in run.logbook if r["round"] == 1)
            if rnd.gen in GENS:
                last = point(rnd.population + list(rnd.front), evals, t_first + spent)
            if rnd.gen >= rnd.last_gen:
                break
            t1 = time.perf_counter()
            run.generation(rnd)
            spent += time.perf_counter() - t1
        curve.logbook = [dict(r) for r in run.logbook]
    rnd.evaluator.release()
    curve.last_model = last
    return curve


def snapped_uniform_plan(teacher, space, x, budget, cost, step) -> PruningPlan:
    """torch-pruning's uniform L1 with ``round_to=step``: one width ratio, every width a multiple of ``step``, the
    ratio bisected so that ``cost(plan) <= budget``."""
    imp = channel_importance(teacher, space, x, "l1")
    order = {g.name: np.argsort(-np.asarray(imp[g.name]), kind="stable") for g in space.groups}

    def plan(r):
        groups = {}
        for g in space.groups:
            n = g.size if r >= 1 else min(g.size, max(step, int(r * g.size) // step * step))
            groups[g.name] = tuple(sorted(int(i) for i in order[g.name][:n]))
        return PruningPlan(groups, {u.name: True for u in space.units}, fingerprint=space.fingerprint)
    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(plan(mid)) > budget else (mid, hi)
    return plan(lo)


def plan_method(args, ctx, method, seed, budget_kw) -> Curve:
    from evoprune import PruningSpace
    t0 = time.perf_counter()
    if budget_kw.get("target_kind") == "latency":  # with round_to = the channel block, as the search snaps
        from evoprune.deploy.latency import LatencyTable
        from evoprune.deploy.runtime import kernel_step
        space = PruningSpace.from_model(ctx.teacher, ctx.x, round_to=kernel_step())
        table = LatencyTable.measure(ctx.teacher, space, ctx.x, runtime="onnxruntime", batch=1, threads=1)
        plan = snapped_uniform_plan(ctx.teacher, space, ctx.x, budget_kw["target"], table.predict, kernel_step())
    else:
        space = PruningSpace.from_model(ctx.teacher, ctx.x)
        budget = budget_kw["target"] * space.base_macs
        plan = uniform_plan(ctx.teacher, space, ctx.x, budget) if method == "l1-uniform" else \
            global_plan(ctx.teacher, space, ctx.x, budget, lambda p: space.cost(p)[0])
    curve = Curve(args, ctx, method, seed)
    curve.last_model = curve.measure(plan, space, 0, time.perf_counter() - t0, float("nan"), None)
    return curve


def nominal(results, evals: int) -> int:
    """The curve point an evaluation count belongs to: the default GA's count at the nearest of GENS (a search
    without duplicate rejection or with screening spends a few fewer), or the count itself for 0 or 1."""
    a = results["settings"]
    marks = [a["population"] + (a["population"] - a["elites"]) * g for g in GENS]
    return evals if evals <= 1 else min(marks, key=lambda m: abs(m - evals))


def at(results, row, evals):
    """``row``'s point at the nominal count ``evals``, or its only point (a one-plan method), or None."""
    if len(row["points"]) == 1:
        return row["points"][0]
    return next((p for p in row["points"] if nominal(results, p["evals"]) == evals), None)


def paired(a_rows, b_rows, pick_a, pick_b):
    """Mean a - b in pp over common seeds and images, bootstrap 95 % CI, verdict; or None."""
    b_by = {r["seed"]: r for r in b_rows}
    pairs = [(pick_a(r), pick_b(b_by[r["seed"]])) for r in a_rows if r["seed"] in b_by]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    if not pairs:
        return None
    mean, lo, hi = bootstrap_diff(np.stack([unbits(x["correct"]) for x, _ in pairs]),
                                  np.stack([unbits(y["correct"]) for _, y in pairs]))
    verdict = "better" if lo > 0 else ("worse" if hi < 0 else "no difference shown")
    return f"{100 * mean:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]", verdict, len(pairs)


def render(results) -> str:
    rows = results["rows"]
    lines = [f"Teacher top-1 on val-report: {results['teacher']['top1_report']:.4f}. Budget: {results['budget']}.", ""]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    marks = sorted({nominal(results, p["evals"]) for r in rows for p in r["points"] if p["evals"] > 1})
    lines += ["### val-report top-1 of the plan chosen so far (mean ± sd over seeds), by evaluations", "",
              "Columns are the default GA's evaluation counts (30 + 25 per generation); a search without duplicate "
              "rejection or with screening spends a few fewer (the JSON has the exact counts). One-plan methods "
              "(knapsack: 1 evaluation, the L1 allocations: none) fill the first column.", "",
              "| method | seeds | one plan | " + " | ".join(f"{e} evals" for e in marks) + " | s per eval |",
              "|---|---|---|" + "---|" * (len(marks) + 1)]

    def cell(vals):
        if not vals:
            return "-"
        return f"{100 * statistics.mean(vals):.2f}" + (f" ± {100 * statistics.stdev(vals):.2f}" if len(vals) > 1
                                                        else "")
    for m in methods:
        sub = [r for r in rows if r["method"] == m]
        one = [r["points"][0]["top1_report"] for r in sub if len(r["points"]) == 1]
        cells = [cell([p["top1_report"] for r in sub if len(r["points"]) > 1 for p in r["points"]
                       if nominal(results, p["evals"]) == e]) for e in marks]
        rates = [r["points"][-1]["seconds"] / r["points"][-1]["evals"] for r in sub if r["points"][-1]["evals"] > 1]
        rate = f"{statistics.mean(rates):.2f}" if rates else "-"
        lines.append(f"| {m} | {len(sub)} | {cell(one)} | " + " | ".join(cells) + f" | {rate} |")
    lines += ["", "### The last point of each method: search score, choice, recovery and the units its plans cut", "",
              "| method | evals | search score | val-choose top-1 (after recovery) | val-report top-1 | seconds | "
              "units cut (per seed) |", "|---|---|---|---|---|---|---|"]
    for m in methods:
        last = [r["points"][-1] for r in rows if r["method"] == m]

        def ms(key, scale=100.0):
            v = [scale * p[key] for p in last if p[key] is not None and p[key] == p[key]]
            return "-" if not v else f"{statistics.mean(v):.2f}" + (f" ± {statistics.stdev(v):.2f}" if len(v) > 1
                                                                     else "")
        cuts = "; ".join(", ".join(p["cut"]) or "none" for p in last)
        lines.append(f"| {m} | {last[0]['evals']} | {ms('search_score')} | {ms('top1_choose')} | "
                     f"{ms('top1_report')} | {ms('seconds', 1.0)} | {cuts} |")
    base = [r for r in rows if r["method"] == "ga"]
    lines += ["", "### ga minus each method at equal evaluations (pp, paired by seed and image, bootstrap 95 % CI)",
              "", "One-plan methods are compared at their one plan. 'better'/'worse' only where the CI excludes 0.", "",
              "| method | at | seeds | ga minus method | verdict |", "|---|---|---|---|---|"]
    for m in methods:
        sub = [r for r in rows if r["method"] == m]
        if m == "ga":
            continue
        for e in (130, max(marks)) if marks else ():
            res = paired(base, sub, lambda r: at(results, r, e), lambda r: at(results, r, e))
            if res:
                lines.append(f"| {m} | {e} evals | {res[2]} | {res[0]} | ga {res[1]} |")
    lines += ["", "### Longer runs: the last curve point minus the 130-evaluation point, same runs", "",
              "| method | seeds | last minus 130 evals | verdict |", "|---|---|---|---|"]
    for m in methods:
        sub = [r for r in rows if r["method"] == m and len(r["points"]) > 1 and
               nominal(results, r["points"][-1]["evals"]) > 130]
        res = paired(sub, sub, lambda r: r["points"][-1], lambda r: at(results, r, 130))
        if res:
            lines.append(f"| {m} (to {sub[0]['points'][-1]['evals']} evals) | {res[2]} | {res[0]} | {res[1]} |")
    ft = [r for r in rows if "top1_ft" in r]
    if ft:
        lines += ["", "### After the KD fine-tune (last point)", "", "| method | seeds | top-1 (mean ± sd) |",
                  "|---|---|---|"]
        for m in methods:
            v = [r["top1_ft"] for r in ft if r["method"] == m]
            if v:
                lines.append(f"| {m} | {len(v)} | {cell(v)} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        sub = [r for r in rows if r["method"] == m]
        for ax, key in zip(axes, ("evals", "seconds")):
            xs = sorted({nominal(results, p["evals"]) for r in sub for p in r["points"]})
            pts = [[p for r in sub for p in r["points"] if nominal(results, p["evals"]) == e] for e in xs]
            mx = [statistics.mean(p[key] for p in ps) for ps in pts]
            my = [100 * statistics.mean(p["top1_report"] for p in ps) for ps in pts]
            ax.plot(mx, my, marker="o" if len(xs) > 1 else "s",
                    label=m + (f" ({len(sub)} seed)" if len(sub) == 1 else ""))
    for ax, label in zip(axes, ("fitness evaluations", "seconds (search; recovery excluded)")):
        ax.set_xlabel(label)
        ax.set_ylabel("val-report top-1 of the plan chosen so far (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"B7 {results['settings']['arch']}, {results['budget']} (mean of seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=("resnet18_tv", "vgg16_bn"), default="resnet18_tv")
    p.add_argument("--quick", action="store_true", help="1 seed, a tiny search: a smoke test only")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg-trainval.tar.gz"))
    p.add_argument("--target", type=float, default=0.25, help="MACs budget as a fraction of the teacher's")
    p.add_argument("--latency", default=None, help="a latency budget instead: ms, or 'a' (B5's budget a)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(DEFAULT))
    p.add_argument("--mult", type=int, default=4, help="the curves of --long run to this multiple of the default "
                   "evaluations; the other searches to 1x")
    p.add_argument("--long", default="ga,random", help="methods whose curves run to --mult (default: %(default)s)")
    p.add_argument("--population", type=int, default=30)
    p.add_argument("--elites", type=int, default=5)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--score-samples", type=int, default=1000)
    p.add_argument("--recal-batches", type=int, default=16)
    p.add_argument("--ft-epochs", type=float, default=0.0)
    p.add_argument("--ft-lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--render", action="store_true", help="only re-render --out's tables and plot")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.population, args.elites, args.generations, args.mult = "0", 6, 2, 1, 2
        args.score_samples, args.recal_batches = 200, 4
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*calibration samples for")  # lsq's bias fallback on a few layers
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(ALL))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL)}")
    tag = f"lat{args.latency}" if args.latency else f"m{int(round(100 * args.target))}"
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"b7_curves_{args.arch}_{tag}{'_quick' if args.quick else ''}.json")

    if args.render:
        results = json.loads(out.read_text())
        write_text(out.with_suffix(".md"), render(results))
        plot(results, out.with_suffix(".png"))
        return
    data, report_set, sx, sy, recal_x, teacher = setup(args)
    search_set, _ = data.val.stratified_split(0.5, seed=0)
    choose_set = search_set.stratified_split(args.score_samples, seed=0)[1]  # the rest of val-search
    x = sx[:1]
    ctx = types.SimpleNamespace(teacher=teacher, x=x, sx=sx, sy=sy, recal_x=recal_x, report_set=report_set,
                                choose_set=choose_set, cx=normalize(choose_set.images), cy=choose_set.labels,
                                calib=recal_x)
    if args.latency:
        b5 = json.loads((ROOT / "benchmarks" / "results" / f"b5_latency_{args.arch}.json").read_text())
        budget_ms = b5["budgets"][args.latency]["ms"] if args.latency in b5.get("budgets", {}) else \
            float(args.latency)
        budget_kw, budget_name = {"target_kind": "latency", "target": budget_ms}, f"{budget_ms:.3f} ms (onnxruntime)"
    else:
        budget_kw, budget_name = {"target": args.target}, f"{args.target:.0%} MACs"
    teacher_correct = correctness(teacher, report_set)
    results = {"settings": vars(args), "budget": budget_name,
               "teacher": {"top1_report": float(teacher_correct.mean())}, "rows": []}
    if out.exists():
        old = json.loads(out.read_text())
        free = ("methods", "seeds", "render")  # settings that do not change a row
        same = {k: v for k, v in old["settings"].items() if k not in free} == \
            {k: v for k, v in vars(args).items() if k not in free}
        results["rows"] = old["rows"] if same else []
    done = {(r["method"], r["seed"]) for r in results["rows"]}
    log(f"{args.arch} at {budget_name}: teacher {teacher_correct.mean():.4f}; {len(done)} rows already measured")

    def save():
        write_json(out, results)
        write_text(out.with_suffix(".md"), render(results))
        try:
            plot(results, out.with_suffix(".png"))
        except ImportError:
            pass

    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in methods:
            if (method, seed) in done:
                continue
            t0 = time.perf_counter()
            if method in PLANS:
                if args.latency and method == "l1-global":
                    continue  # a global threshold has no latency form
                curve = plan_method(args, ctx, method, seed, budget_kw)
            else:
                curve = run_search(args, ctx, method, seed, budget_kw)
            row = {"method": method, "seed": seed, "points": curve.points, "time_s": time.perf_counter() - t0,
                   "logbook": getattr(curve, "logbook", None)}
            if args.ft_epochs > 0:
                model = curve.last_model
                epochs = max(1, int(np.ceil(args.ft_epochs)))
                steps = None if args.ft_epochs >= 1 else max(1, int(args.ft_epochs * len(data.train) / 64))
                t1 = time.perf_counter()
                finetune(model, data.train, epochs, teacher=teacher, lr=args.ft_lr, batch_size=64, seed=seed,
                         max_batches=steps, progress=False)
                ft = correctness(model.cpu().eval(), report_set)
                row.update(top1_ft=float(ft.mean()), correct_ft=bits(ft), ft_time_s=time.perf_counter() - t1)
                log(f"  {method} seed {seed}: after {args.ft_epochs} epoch(s) KD: {ft.mean():.4f}")
            results["rows"].append(row)
            save()
    save()
    log(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
