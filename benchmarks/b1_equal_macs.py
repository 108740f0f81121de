"""B1, the headline: quality at equal MACs, evoprune's GA against torch-pruning's one-line magnitude pruning.

    python benchmarks/b1_equal_macs.py --quick            # minutes-to-an-hour on 2 CPU cores
    python benchmarks/b1_equal_macs.py                    # the full protocol (paper's N=30, K=5)

Teacher: ../shared/models/vgg16_bn_cifar10.pt. Data: ../shared/data/cifar10-jpeg-trainval.tar.gz; val is split into a
fixed stratified val-search half (GA fitness) and a val-report half (every accuracy printed here). Budgets: 50 %,
25 % and 10 % of the teacher's MACs. Methods:
  ga-neuron      evoprune GA, budget mode, neuron chromosome only
  ga-conn        evoprune GA, neuron + connection chromosomes
  tp-uniform     torch_pruning.MetaPruner, GroupMagnitudeImportance(p=1), one ratio for every layer
  tp-global      the same with global_pruning=True
  random         random plans at the budget (mean of --random-plans)
  paper-table5   the paper's per-layer widths (its Table 5, rounds 2-5), L1 channel choice, at their own MACs
For each: MACs, params, top-1 right after pruning, after BN re-calibration, and after the SAME fine-tune budget
(KD from the teacher on; the GA rows also without KD). Writes benchmarks/results/b1_equal_macs[_quick].json.
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

from evoprune import PruningPlan, PruningSpace, apply_plan  # noqa: E402
from evoprune.evolve import operators as ops  # noqa: E402
from evoprune.data import load_images, normalize  # noqa: E402
from evoprune.evolve.fitness import FitnessConfig, recalibrate_bn  # noqa: E402
from evoprune.space.importance import channel_importance, ranks as to_ranks  # noqa: E402
from evoprune.models import load_weights, vgg16_bn_cifar  # noqa: E402
from evoprune.evolve import search  # noqa: E402
from evoprune.storage import write_json  # noqa: E402
from evoprune.evolve.toolbox import creator_types  # noqa: E402
from evoprune.train import evaluate, finetune  # noqa: E402

SHARED = ROOT.parent / "shared"
PAPER_TABLE5 = {  # VGG16 conv widths after rounds 2..5 (Table 5); conv 8-13 share one width
    2: [39, 52, 116, 122, 231, 128, 128] + [205] * 6,
    3: [24, 42, 105, 116, 208, 64, 64] + [82] * 6,
    4: [15, 34, 95, 111, 188, 32, 32] + [33] * 6,
    5: [9, 28, 86, 106, 170, 16, 16] + [14] * 6,
}


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def macs_of(model, x):
    return tp.utils.count_ops_and_params(model, x)


def tp_prune(teacher, x, target_macs, global_pruning):
    """torch-pruning's one-liner, with the ratio found by bisection so that MACs hit the target."""
    def prune(ratio):
        model = copy.deepcopy(teacher)
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=ratio, global_pruning=global_pruning,
                                      ignored_layers=[model.classifier])
        pruner.step()
        return model
    lo, hi = 0.0, 0.99
    best = None
    for _ in range(14):
        mid = (lo + hi) / 2
        model = prune(mid)
        macs = macs_of(model, x)[0]
        if macs > target_macs:
            lo = mid
        else:
            hi, best = mid, model
        if best is not None and abs(macs_of(best, x)[0] / target_macs - 1) < 0.01:
            break
    return best if best is not None else prune(hi)


def widths_plan(space, importance, widths):
    """A plan keeping the top-``w`` channels (by L1) of each conv group, in network order."""
    groups = {}
    for g, w in zip(space.groups, widths):
        order = np.argsort(-importance[g.name])[:w]
        groups[g.name] = sorted(int(i) for i in order)
    return PruningPlan(groups, {}, fingerprint=space.fingerprint)


def random_plan_model(teacher, space, x, target_macs, seed):
    _, ind_cls = creator_types()
    random.seed(seed)
    rng = np.random.default_rng(seed)
    ranks = [to_ranks({"g": rng.random(g.size)})["g"] for g in space.groups]
    ind = ops.init_random(ind_cls, space.layout, (0.2, 1.0), conn_keep=1.0)
    ops.repair(ind, space, ranks, macs_budget=target_macs, fill=0.99)  # random channels, MACs matched
    return apply_plan(teacher, space.decode(ind), x, space=space)


def stages(name, model, teacher, data, report_set, recal_x, x, args, kd=True, extra=None):
    """top-1 after pruning, after BN re-calibration, after fine-tuning (same budget for every method)."""
    t0 = time.perf_counter()
    macs, params = macs_of(model, x)
    row = {"method": name, "macs": macs, "params": params, **(extra or {})}
    row["top1_pruned"] = evaluate(model, report_set)
    recalibrate_bn(model, recal_x)
    row["top1_recal"] = evaluate(model, report_set)
    finetune(model, data.train, 1, teacher=teacher if kd else None, lr=args.ft_lr, batch_size=64,
             max_batches=args.ft_batches, progress=False, seed=args.seed)
    model.eval()
    row["top1_finetuned"] = evaluate(model, report_set)
    row["kd"] = kd
    row["eval_time_s"] = time.perf_counter() - t0
    log(f"{name:14s} MACs {macs / 1e6:7.1f}M params {params / 1e6:6.3f}M  pruned {row['top1_pruned']:.4f}  "
        f"recal {row['top1_recal']:.4f}  finetuned {row['top1_finetuned']:.4f}")
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller GA and fine-tune budget")
    p.add_argument("--data", default=str(SHARED / "data" / "cifar10-jpeg-trainval.tar.gz"))
    p.add_argument("--weights", default=str(SHARED / "models" / "vgg16_bn_cifar10.pt"))
    p.add_argument("--budgets", default="0.5,0.25,0.1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--metric", choices=("top1", "loss"), default="top1", help="GA fitness metric")
    p.add_argument("--recal-batches", type=int, default=None, help="BN re-calibration batches (64 images)")
    p.add_argument("--fitness-steps", type=int, default=0,
                   help="short KD fine-tune steps inside each fitness call (FitnessConfig.finetune_steps)")
    p.add_argument("--methods", default="ga-neuron,ga-conn,tp-uniform,tp-global,random,paper-table5",
                   help="comma-separated subset; rows of other methods already in --out are kept")
    args = p.parse_args()
    methods = set(args.methods.split(","))
    torch.set_num_threads(args.threads)
    quick = args.quick
    args.population, args.elites, args.generations = (12, 4, 3) if quick else (30, 5, 6)
    args.score_samples = 500 if quick else 1000
    args.recal_batches = args.recal_batches or (5 if quick else 20)
    args.ft_batches = 60 if quick else 300  # 64-image batches of train: the same for every method
    args.ft_lr = 0.01
    args.random_plans = 2 if quick else 5
    args.paper_rounds = (3, 5) if quick else (2, 3, 4, 5)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"b1_equal_macs{'_quick' if quick else ''}.json")

    t_start = time.perf_counter()
    data = load_images(args.data)
    search_set, report_set = data.val.stratified_split(0.5, seed=args.seed)
    score_set = search_set.stratified_sample(args.score_samples, seed=args.seed)
    sx, sy = normalize(score_set.images), score_set.labels
    recal_sample = data.train.stratified_sample(args.recal_batches * 64, seed=args.seed + 1)
    recal_x = [normalize(recal_sample.images[i:i + 64]) for i in range(0, len(recal_sample), 64)]
    teacher = load_weights(vgg16_bn_cifar(), args.weights).eval()
    x = sx[:1]
    base_macs, base_params = macs_of(teacher, x)
    results = {"settings": {k: v for k, v in vars(args).items()}, "teacher": {
        "macs": base_macs, "params": base_params, "top1_report": evaluate(teacher, report_set)}, "rows": []}
    if out.exists() and methods != set(p.get_default("methods").split(",")):  # rerun a subset: keep the others
        kept = json.loads(out.read_text())["rows"]
        results["rows"] = [r for r in kept if r["method"].split("#")[0].rsplit("-r", 1)[0] not in methods]
    log(f"teacher: {base_macs / 1e6:.1f} MMACs, top-1 on val-report {results['teacher']['top1_report']:.4f}")
    space_n = PruningSpace.from_model(teacher, x, connections=False)
    imp = channel_importance(teacher, space_n, x, "l1")

    def save():
        results["wall_time_s"] = time.perf_counter() - t_start
        write_json(out, results)

    for frac in [float(b) for b in args.budgets.split(",")]:
        target = frac * base_macs
        log(f"=== budget {frac:.0%} of MACs: {target / 1e6:.1f} M")
        for method, connections in (("ga-neuron", False), ("ga-conn", True)):
            if method not in methods:
                continue
            t0 = time.perf_counter()
            res = search(teacher, x, sx, sy, recal_x=recal_x, rounds=1, generations=args.generations,
                         population=args.population, elites=args.elites, target=frac, seed=args.seed,
                         connections=connections, verbose=True, progress=False,
                         fitness=FitnessConfig(metric=args.metric, finetune_steps=args.fitness_steps))
            ga_time = time.perf_counter() - t0
            plan = PruningPlan.from_dict(res.plans[0])
            for kd in (True, False):
                model = _replan(teacher, plan, x, connections)  # the raw pruned model: no BN re-calibration yet
                results["rows"].append(stages(method, model, teacher, data, report_set, recal_x, x, args, kd=kd,
                                              extra={"budget": frac, "search_time_s": ga_time,
                                                     "search_score": res.rows[0]["search_score"],
                                                     "evaluations": res.rows[0]["evaluations"],
                                                     "cut": res.rows[0]["cut"]}))
                save()
        for method, glob in (("tp-uniform", False), ("tp-global", True)):
            if method not in methods:
                continue
            t0 = time.perf_counter()
            model = tp_prune(teacher, x, target, glob)
            results["rows"].append(stages(method, model, teacher, data, report_set, recal_x, x, args,
                                          extra={"budget": frac, "search_time_s": time.perf_counter() - t0}))
            save()
        if "random" not in methods:
            continue
        rand_rows = []
        for s in range(args.random_plans):
            model = random_plan_model(teacher, space_n, x, target, seed=100 + s)
            rand_rows.append(stages(f"random#{s}", model, teacher, data, report_set, recal_x, x, args,
                                    extra={"budget": frac}))
        agg = {"method": "random", "budget": frac, "n": len(rand_rows), "kd": True}
        for key in ("macs", "params", "top1_pruned", "top1_recal", "top1_finetuned"):
            vals = [r[key] for r in rand_rows]
            agg[key] = statistics.mean(vals)
            agg[key + "_sd"] = statistics.pstdev(vals)
        results["rows"].append(agg)
        save()
    for rnd in (args.paper_rounds if "paper-table5" in methods else ()):
        widths = PAPER_TABLE5[rnd]
        model = apply_plan(teacher, widths_plan(space_n, imp, widths), x, space=space_n)
        results["rows"].append(stages(f"paper-table5-r{rnd}", model, teacher, data, report_set, recal_x, x, args,
                                      extra={"budget": None}))
        save()
    log(f"done in {time.perf_counter() - t_start:.0f} s -> {out}")


def _replan(teacher, plan, x, connections):
    space = PruningSpace.from_model(teacher, x, connections=connections)
    model = apply_plan(teacher, plan, x, space=space)
    return model


if __name__ == "__main__":
    main()
