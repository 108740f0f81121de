"""B1s: the GA against torch-pruning's one-liners and random search at equal MACs, with seeds and paired CIs.

    python benchmarks/b1_seeds.py --arch resnet18_tv --budgets 0.25 --seeds 0,1,2     # about 1 h on 2 CPU cores
    python benchmarks/b1_seeds.py --quick                                              # smoke test, not evidence

Teacher: ../shared/models/<arch>. Data: ../shared/data/cifar10-jpeg-trainval.tar.gz; val is split once (seed 0)
into a stratified val-search half (fitness: --score-samples of it) and a val-report half (every top-1 here, 2,500
images). For every (budget, seed, method) the pruned model is MACs-matched to the budget and measured in two regimes:

  calib   top-1 on val-report after BN re-calibration on the same --recal-batches training batches (no training)
  ft      top-1 after --ft-epochs of fine-tuning with KD from the teacher (the same recipe and seed for every method)

Methods (searched ones get the same evaluation budget, population + generations x (population - elites), and
score the same fitness: top-1 on the val-search subset after BN re-calibration; neuron chromosome only):

  ga          evoprune's GA, importance-seeded init, paper crossover, guided mutation (the default before this study)
  ga-paper    the GA with the paper's bit-level operators (crossover at the p_c cut, bit-flip mutation)
  init        the GA's initial population alone (method="init")
  random      random search: random plans repaired into the budget (method="random")
  tp-uniform  torch_pruning.MetaPruner, GroupMagnitudeImportance(p=1), one ratio for every layer
  tp-global   the same with global_pruning=True
  ga-mixed, ga-width, ga-swap   (on request) the GA with mutation="mixed" (the default since this study),
              "width" or "swap"; ga-mixed-random-rank: mutation="mixed" with importance="random" (channels
              ranked at random instead of by L1: seeding, repair and guided moves no longer follow magnitude)

The seed is the search seed and the fine-tune seed. Differences between methods are paired by seed and by image:
a hierarchical paired bootstrap resamples seeds, then report images, and gives a 95 % CI for each difference
against ``ga``. Writes benchmarks/results/b1_seeds_<arch>[_quick].json (with per-image correctness) and a
markdown table beside it.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evoprune import PruningPlan, PruningSpace, apply_plan, search  # noqa: E402
from evoprune.data import batches, load_images, normalize  # noqa: E402
from evoprune.evolve.fitness import recalibrate_bn  # noqa: E402
from evoprune.models import MODELS, load_weights  # noqa: E402
from evoprune.storage import write_json, write_text  # noqa: E402
from evoprune.train import finetune  # noqa: E402

SHARED = ROOT.parent / "shared"
WEIGHTS = {"resnet18_tv": "resnet18_tv_cifar10.pt", "vgg16_bn": "vgg16_bn_cifar10.pt"}
SEARCHED = {  # method -> search() settings
    "ga": {"mutation": "guided"},
    "ga-paper": {"crossover": "paper", "mutation": "bitflip"},
    "init": {"method": "init"},
    "random": {"method": "random"},
    "ga-mixed": {"mutation": "mixed"},
    "ga-width": {"mutation": "width"},
    "ga-swap": {"mutation": "swap"},
    "ga-mixed-random-rank": {"mutation": "mixed", "importance": "random"},
}
ALL_METHODS = ("ga", "ga-paper", "init", "random", "tp-uniform", "tp-global", "ga-mixed", "ga-width", "ga-swap",
               "ga-mixed-random-rank")
DEFAULT_METHODS = ALL_METHODS[:6]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def classifier_of(model):
    return model.fc if hasattr(model, "fc") else model.classifier


def tp_prune(teacher, x, target_macs, global_pruning):
    """torch-pruning's one-liner, its ratio found by bisection so that MACs land just under the target."""
    def prune(ratio):
        model = copy.deepcopy(teacher)
        with torch.enable_grad():
            tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                 pruning_ratio=ratio, global_pruning=global_pruning,
                                 ignored_layers=[classifier_of(model)]).step()
        return model
    lo, hi, best = 0.0, 0.99, None
    for _ in range(16):
        mid = (lo + hi) / 2
        model = prune(mid)
        macs = tp.utils.count_ops_and_params(model, x)[0]
        if macs > target_macs:
            lo = mid
        else:
            hi, best = mid, model
            if macs >= 0.99 * target_macs:
                break
    return best if best is not None else prune(hi)


def correctness(model, imageset) -> np.ndarray:
    """Per-image 0/1 correctness on ``imageset`` (in order), for paired comparisons."""
    model.eval()
    out = []
    with torch.inference_mode():
        for images, labels in batches(imageset, 500):
            out.append((model(images).argmax(1) == labels).numpy())
    return np.concatenate(out).astype(np.uint8)


def bits(correct: np.ndarray) -> str:
    """Per-image correctness as a compact string of 0/1 characters (in report-set order)."""
    return "".join("1" if c else "0" for c in correct)


def unbits(text) -> np.ndarray:
    """The inverse of :func:`bits` (also accepts the lists of 0/1 written by earlier versions)."""
    if isinstance(text, str):
        return np.frombuffer(text.encode(), dtype=np.uint8) - ord("0")
    return np.asarray(text, dtype=np.uint8)


def bootstrap_diff(a: np.ndarray, b: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` (seeds x images, paired) and a hierarchical bootstrap 95 % CI: seeds, then images."""
    d = a.astype(np.float32) - b.astype(np.float32)
    rng = np.random.default_rng(seed)
    s, m = d.shape
    sidx = rng.integers(0, s, (n, s))
    stats = np.empty(n)
    for i in range(n):
        rows = d[sidx[i]]
        cols = rng.integers(0, m, (s, m))
        stats[i] = np.take_along_axis(rows, cols, axis=1).mean()
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def setup(args):
    """The data, the val-report half, the fitness subset (inputs, labels), the BN re-calibration batches and the
    teacher, from ``--data``, ``--score-samples``, ``--recal-batches`` and ``--arch``."""
    data = load_images(args.data)
    search_set, report_set = data.val.stratified_split(0.5, seed=0)
    score_set = search_set.stratified_sample(args.score_samples, seed=0)
    recal_sample = data.train.stratified_sample(args.recal_batches * 64, seed=1)
    recal_x = [normalize(recal_sample.images[i:i + 64]) for i in range(0, len(recal_sample), 64)]
    teacher = load_weights(MODELS[args.arch](num_classes=10), SHARED / "models" / WEIGHTS[args.arch]).eval()
    return data, report_set, normalize(score_set.images), score_set.labels, recal_x, teacher


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(WEIGHTS), default="resnet18_tv")
    p.add_argument("--quick", action="store_true", help="1 seed, a tiny search, no fine-tune: a smoke test")
    p.add_argument("--data", default=str(SHARED / "data" / "cifar10-jpeg-trainval.tar.gz"))
    p.add_argument("--budgets", default="0.25")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {', '.join(ALL_METHODS)}; rows already in --out are kept")
    p.add_argument("--population", type=int, default=30)
    p.add_argument("--elites", type=int, default=5)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--score-samples", type=int, default=1000)
    p.add_argument("--recal-batches", type=int, default=20, help="64-image training batches for BN re-calibration")
    p.add_argument("--ft-epochs", type=float, default=1.0, help="fine-tune epochs (0: calibration-only)")
    p.add_argument("--ft-lr", type=float, default=0.01)
    p.add_argument("--base", default="ga", help="the method every other one is compared with (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.seeds, args.population, args.elites, args.generations = "0", 6, 2, 1
        args.score_samples, args.recal_batches, args.ft_epochs = 200, 4, 0.0
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    tag = "_quick" if args.quick else ""
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"b1_seeds_{args.arch}{tag}.json")

    t_start = time.perf_counter()
    data, report_set, sx, sy, recal_x, teacher = setup(args)
    x = sx[:1]
    base_macs, base_params = tp.utils.count_ops_and_params(teacher, x)
    teacher_correct = correctness(teacher, report_set)
    results = {"settings": vars(args), "teacher": {"macs": base_macs, "params": base_params,
                                                   "top1_report": float(teacher_correct.mean())},
               "rows": []}
    if out.exists():  # resume: keep the rows already measured with the same settings
        old = json.loads(out.read_text())
        if {k: v for k, v in old["settings"].items() if k not in ("methods", "base")} == \
                {k: v for k, v in vars(args).items() if k not in ("methods", "base")}:
            results["rows"] = old["rows"]
    done = {(r["budget"], r["seed"], r["method"]) for r in results["rows"]}
    log(f"{args.arch}: {base_macs / 1e6:.1f} MMACs, {base_params / 1e6:.2f} M params, teacher top-1 on val-report "
        f"{teacher_correct.mean():.4f}; {len(done)} rows already measured")

    def save():
        results["wall_time_s"] = time.perf_counter() - t_start
        write_json(out, results)

    for frac in [float(b) for b in args.budgets.split(",")]:
        target = frac * base_macs
        tp_models = {}
        for seed in seeds:
            for method in methods:
                if (frac, seed, method) in done:
                    continue
                t0 = time.perf_counter()
                row = {"budget": frac, "seed": seed, "method": method}
                if method in SEARCHED:
                    res = search(teacher, x, sx, sy, recal_x=recal_x, rounds=1, generations=args.generations,
                                 population=args.population, elites=args.elites, target=frac, seed=seed,
                                 connections=False, verbose=False, progress=False, **SEARCHED[method])
                    space = PruningSpace.from_model(teacher, x, connections=False, with_cost=False)
                    model = apply_plan(teacher, PruningPlan.from_dict(res.plans[0]), x, space=space)
                    row.update(search_score=res.rows[0]["search_score"], evaluations=res.rows[0]["evaluations"],
                               best_by_gen=[r["best"] for r in res.logbook])
                else:
                    if method not in tp_models:  # deterministic: prune once per budget
                        tp_models[method] = tp_prune(teacher, x, target, method == "tp-global")
                    model = copy.deepcopy(tp_models[method])
                row["search_time_s"] = time.perf_counter() - t0
                macs, params = tp.utils.count_ops_and_params(model, x)
                row.update(macs=macs, params=params, macs_pct=100 * macs / base_macs)
                recalibrate_bn(model, recal_x)
                calib = correctness(model, report_set)
                row["top1_calib"], row["correct_calib"] = float(calib.mean()), bits(calib)
                if args.ft_epochs > 0:
                    t1 = time.perf_counter()
                    epochs = max(1, int(np.ceil(args.ft_epochs)))
                    steps = None if args.ft_epochs >= 1 else max(1, int(args.ft_epochs * len(data.train) / 64))
                    finetune(model, data.train, epochs, teacher=teacher, lr=args.ft_lr, batch_size=64, seed=seed,
                             max_batches=steps, progress=False)
                    ft = correctness(model.cpu().eval(), report_set)
                    row["top1_ft"], row["correct_ft"] = float(ft.mean()), bits(ft)
                    row["ft_time_s"] = time.perf_counter() - t1
                results["rows"].append(row)
                save()
                log(f"{frac:.0%} seed {seed} {method:10s} MACs {row['macs_pct']:5.1f}% params {params / 1e6:5.2f}M "
                    f"calib {row['top1_calib']:.4f}" + (f" ft {row['top1_ft']:.4f}" if "top1_ft" in row else "")
                    + f"  ({row['search_time_s']:.0f} s search)")
    table = render(results, base=args.base)
    write_text(out.with_suffix(".md"), table)
    print(table)
    log(f"done in {time.perf_counter() - t_start:.0f} s -> {out}")


def paired_cell(base_rows, rows, regime: str, base: str) -> str:
    """``base`` minus the method of ``rows`` in pp, paired by seed and image, with its bootstrap 95 % CI and a
    verdict ("better"/"worse" only where the CI excludes 0); "-" without common seeds."""
    ref = {r["seed"]: unbits(r[f"correct_{regime}"]) for r in base_rows}
    common = [r for r in rows if r["seed"] in ref]
    if not common:
        return "-"
    a = np.stack([ref[r["seed"]] for r in common])
    b = np.stack([unbits(r[f"correct_{regime}"]) for r in common])
    mean, lo, hi = bootstrap_diff(a, b)
    verdict = f"{base} better" if lo > 0 else (f"{base} worse" if hi < 0 else "no difference shown")
    return f"{100 * mean:+.2f} pp [{100 * lo:+.2f}, {100 * hi:+.2f}] ({verdict})"


def render(results, base: str = "ga") -> str:
    """Mean +- sd per method and regime, and the paired bootstrap CI of ``base`` minus each other method."""
    rows = results["rows"]
    lines = [f"Teacher top-1 on val-report: {results['teacher']['top1_report']:.4f}", ""]
    for frac in sorted({r["budget"] for r in rows}, reverse=True):
        for regime in ("calib", "ft"):
            sub = [r for r in rows if r["budget"] == frac and f"top1_{regime}" in r]
            if not sub:
                continue
            methods = list(dict.fromkeys(r["method"] for r in sub))
            lines += [f"### {frac:.0%} MACs, {'BN re-calibration only' if regime == 'calib' else 'after fine-tuning'}",
                      "", "| method | seeds | MACs % | params (M) | top-1 (mean ± sd) "
                          f"| {base} minus method [95 % CI] |",
                      "|---|---|---|---|---|---|"]
            base_rows = [r for r in sub if r["method"] == base]
            for m in methods:
                mr = sorted((r for r in sub if r["method"] == m), key=lambda r: r["seed"])
                vals = [r[f"top1_{regime}"] for r in mr]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cell = "-" if m == base else paired_cell(base_rows, mr, regime, base)
                lines.append(f"| {m} | {len(vals)} | {statistics.mean(r['macs_pct'] for r in mr):.1f} | "
                             f"{statistics.mean(r['params'] for r in mr) / 1e6:.2f} | "
                             f"{100 * statistics.mean(vals):.2f} ± {100 * sd:.2f} | {cell} |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
