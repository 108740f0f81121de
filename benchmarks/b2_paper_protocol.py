"""B2, the paper's protocol end to end: T=5 rounds of N=30, K=5, p_c=0.6, p_mut=0.6, with today's defaults between
rounds (lsq reconstruction from the round's unpruned model, then a KD fine-tune from the original teacher), down to
the paper's parameter counts, beside the paper's Tables 2, 3 and 5 and a torch-pruning control.

    python benchmarks/b2_paper_protocol.py --arch resnet18_tv --seed 0          # ends at <= 0.1 M params
    python benchmarks/b2_paper_protocol.py --arch vgg16_bn --seed 0             # ends at <= 0.3 M params
    python benchmarks/b2_paper_protocol.py --arch resnet18_tv --quick           # smoke test (tiny search, no FT)
    python benchmarks/b2_paper_protocol.py --render                             # tables + plot from the JSONs
    python benchmarks/b2_paper_protocol.py --arch resnet18_tv --ft-epochs 3 --methods ga   # a sensitivity run (_ft3)

Per network and seed it runs two methods, each resumable (kill it and rerun the same command):
- ``ga``: the prune job (``evoprune.cli.job.run``, as ``examples/*_cifar.py --target-params`` runs it) with a params
  budget falling geometrically from the teacher's count to ``--target-params`` over the 5 rounds. Its files and
  checkpoint are in ``benchmarks/results/b2_<arch>_s<seed>/``.
- ``l1-uniform``: the control. Each round, torch-pruning's uniform L1 allocation (one width ratio for every layer,
  bisected to the GA's parameter count of that round, no block cut) of the previous round's control model, then
  the same recovery and fine-tune (same calibration images, same BN re-calibration rule, same KD teacher, epochs,
  learning rate and seed).

Per round it records params, size, MACs, ONNX Runtime latency at batch 1 (1 thread, measured after the run, on each
method's model side by side), top-1 on val-report after the reconstruction and after the fine-tune, the search's
wall time and the per-layer widths. Results: ``benchmarks/results/b2_<arch>.json`` (a ``runs`` entry per method
and seed), rendered to ``b2_<arch>.md`` and ``b2_paper_protocol.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from b1_seeds import bootstrap_diff  # noqa: E402  (the paired bootstrap B1s, B5 and B7 use)
from b6_reconstruct import uniform_plan  # noqa: E402  (torch-pruning's uniform L1 allocation)
from evoprune import PruningSpace, apply_plan, reconstruct  # noqa: E402
from evoprune.cli import job  # noqa: E402
from evoprune.prune.bn import recalibrate_bn  # noqa: E402
from evoprune.data import load_images, normalize, normalized  # noqa: E402
from evoprune.netinfo import layer_widths, model_bytes  # noqa: E402
from evoprune.prune.lsq import calibration_subset  # noqa: E402
from evoprune.models import load_weights, resnet18_tv, vgg16_bn_cifar  # noqa: E402
from evoprune.cli.options import JobOptions  # noqa: E402
from evoprune.deploy.runtime import measure  # noqa: E402
from evoprune.storage import torch_save, write_json, write_text  # noqa: E402
from evoprune.train import evaluate, finetune  # noqa: E402

SHARED = ROOT.parent / "shared"
RESULTS = Path(os.environ.get("B2_RESULTS", ROOT / "benchmarks" / "results"))  # B2_RESULTS: run from a copy
NETS = {"resnet18_tv": (resnet18_tv, "resnet18_tv_cifar10.pt", 0.1e6),
        "vgg16_bn": (vgg16_bn_cifar, "vgg16_bn_cifar10.pt", 0.3e6)}
# The paper's Table 2 (round, params M, size MB, top-1, reduction %, FLOPS as printed) and Table 3 (search s).
PAPER = {
    "vgg16_bn": {"baseline": 0.8571, "rows": [(1, 13.2, 53.438, 0.8571, 7, 60.1), (2, 3.1, 11.882, 0.8597, 21, 48.5),
                                              (3, 0.9, 3.578, 0.8551, 29, 40.8), (4, 0.5, 1.787, 0.8473, 55, 29.5),
                                              (5, 0.3, 1.243, 0.8374, 60, 11.2)],
                 "search_s": [543.81, 491.52, 488.79, 246.66, 219.34]},
    "resnet18_tv": {"baseline": 0.7223, "rows": [(1, 11.2, 42.707, 0.7223, 5, 1.800),
                                                 (2, 3.0, 11.529, 0.7213, 26, 1.080),
                                                 (3, 0.9, 3.591, 0.7223, 30, 0.736),
                                                 (4, 0.3, 1.218, 0.7234, 33, 0.590),
                                                 (5, 0.1, 0.460, 0.6558, 33, 0.502)],
                    "search_s": [367.83, 332.46, 330.61, 166.83, 148.36]},
}
# The paper's Table 5, ResNet18: widths after rounds 1..5 by the paper's conv index (its numbering; how it maps
# onto torchvision's 20 convs is not stated, so it is quoted beside ours, not paired with them).
PAPER_TABLE5_RESNET18 = {
    **{i: [64, 53, 44, 36, 30] for i in (1, 3, 5)}, **{i: [64, 58, 53, 48, 44] for i in (2, 4)},
    **{i: [128, 103, 83, 67, 54] for i in (6, 9)}, **{i: [128, 83, 54, 36, 24] for i in (7, 8, 10)},
    **{i: [256, 205, 164, 132, 106] for i in (11, 14)}, **{i: [256, 164, 106, 68, 44] for i in (12, 13, 15)},
    16: [512, 359, 252, 177, 124], **{i: [512, 252, 124, 61, 31] for i in (17, 18)}}
# The paper's Table 5: VGG16 conv widths after rounds 1..5 (conv index, 1-based).
PAPER_TABLE5_VGG16 = {
    1: [64, 39, 24, 15, 9], 2: [64, 52, 42, 34, 28], 3: [128, 116, 105, 95, 86], 4: [128, 122, 116, 111, 106],
    5: [256, 231, 208, 188, 170], 6: [256, 128, 64, 32, 16], 7: [256, 128, 64, 32, 16],
    **{i: [512, 205, 82, 33, 14] for i in range(8, 14)}}


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def options(args, target_fraction: float) -> JobOptions:
    """The paper's GA settings, the project's defaults otherwise, a params budget."""
    opts = JobOptions(rounds=5, population=30, elites=5, p_c=0.6, p_mut=0.6, target=target_fraction,
                      target_kind="params", finetune_epochs=args.ft_epochs, seed=args.seed)
    if args.quick:
        opts.population, opts.elites, opts.generations, opts.score_samples, opts.recal_batches = 6, 2, 1, 200, 4
        opts.final_pool = 2
    return opts


# ------------------------------------------------------------------------------------------------ the GA (the job)
def run_ga(args, data, teacher, out_dir: Path, opts: JobOptions) -> dict:
    t0 = time.perf_counter()
    result = job.run(teacher, data, out_dir, opts, title=f"B2: the paper's protocol on {args.arch}",
                     verbose=True, source={"arch": args.arch, "weights": args.weights})
    rows = []
    for row, widths in zip(result.rows, result.widths[1:]):
        rows.append({"round": row["round"], "params": row["params"], "size_mb": row["size_mb"], "macs": row["macs"],
                     "top1_reconstructed": row["top1_pruned"], "top1": row["top1"], "search_s": row["search_s"],
                     "round_s": row["time_s"], "cut": row["cut"], "widths": widths,
                     "bn_recalibrated": row["bn_recalibrated"], "budget_params": row["budget"]})
    return {"baseline": result.baseline, "rows": rows, "wall_s": time.perf_counter() - t0,
            "files": sorted(Path(f).name for f in result.files)}


# ------------------------------------------------------------------------------- the control (torch-pruning L1)
def run_control(args, data, teacher, out_dir: Path, opts: JobOptions, ga_rows: list[dict]) -> dict:
    """Round by round from the teacher: uniform L1 at the GA's parameter count, the job's recovery and fine-tune.
    Resumes from ``out_dir/control_round<k>.pt`` (the model) and ``control.json`` (the rows)."""
    data = normalized(data, opts.normalize)
    search_set, report_set = job.val_splits(data.val, opts.seed)
    score_set, _ = job._score_and_choose(search_set, opts)
    sx, sy = normalize(score_set.images, *score_set.stats), score_set.labels
    recal_x = job._recal_batches(data.train, opts)
    calib = calibration_subset(recal_x, opts.calib_images)
    x = sx[:1]
    state_file = out_dir / "control.json"
    rows = json.loads(state_file.read_text())["rows"] if state_file.is_file() else []
    current = teacher
    if rows:
        current = torch.load(out_dir / f"control_round{len(rows)}.pt", weights_only=False).eval()
    kd = copy.deepcopy(teacher).eval()

    def top1_fit(m):
        with torch.inference_mode():
            return float((m.eval()(sx).argmax(1) == sy).float().mean())

    for k in range(len(rows) + 1, len(ga_rows) + 1):
        t0 = time.perf_counter()
        space = PruningSpace.from_model(current, x)
        plan = uniform_plan(current, space, x, ga_rows[k - 1]["params"], index=1, steps=24)
        pruned = reconstruct(current, apply_plan(current, plan, x, space=space), plan, space, calib, "lsq",
                             seed=opts.seed, inplace=True)
        alt = recalibrate_bn(copy.deepcopy(pruned), recal_x)
        recal = top1_fit(alt) > top1_fit(pruned)  # the job's rule: keep re-calibration where it scores higher
        pruned = alt if recal else pruned
        top1_rec = evaluate(pruned, report_set, progress=False)
        if opts.finetune_epochs > 0:
            epochs = max(1, int(opts.finetune_epochs + 0.999))
            steps = None if opts.finetune_epochs >= 1 else \
                max(1, int(opts.finetune_epochs * len(data.train) / opts.batch_size))
            finetune(pruned, data.train, epochs, teacher=kd, lr=opts.finetune_lr, batch_size=opts.batch_size,
                     seed=opts.seed + k, progress=False, max_batches=steps)
        pruned = pruned.cpu().eval()
        import torch_pruning as tp
        macs, params = tp.utils.count_ops_and_params(pruned, x)
        rows.append({"round": k, "params": int(params), "size_mb": model_bytes(pruned) / 2**20, "macs": float(macs),
                     "top1_reconstructed": top1_rec, "top1": evaluate(pruned, report_set, progress=False),
                     "search_s": 0.0, "round_s": time.perf_counter() - t0, "cut": [],
                     "widths": layer_widths(pruned), "bn_recalibrated": recal,
                     "budget_params": ga_rows[k - 1]["params"]})
        torch_save(pruned, out_dir / f"control_round{k}.pt")
        write_json(state_file, {"rows": rows})
        log(f"control round {k}: {params / 1e6:.3f} M params, top-1 {top1_rec:.4f} -> {rows[-1]['top1']:.4f}")
        current = pruned
    return {"rows": rows}


def latencies(out_dir: Path, x, runs: dict) -> None:
    """ONNX Runtime batch-1 latency of every round's model of every method, measured side by side (after the runs,
    so that no search shares the cores with the timing)."""
    for method, run in runs.items():
        for row in run["rows"]:
            if "onnx_ms" in row:
                continue
            name = f"round{row['round']}.pt" if method == "ga" else f"control_round{row['round']}.pt"
            model = torch.load(out_dir / name, weights_only=False).eval()
            row["onnx_ms"] = measure(model, x, runtime="onnxruntime", batch=1, threads=1, repeats=50).median_ms


def record_pauses(pause_log: Path) -> None:
    """Record in each GA row the seconds its search spent paused (``paused_s``): a log of ``pause EPOCH ...`` /
    ``resume EPOCH`` lines, written by whoever stopped the benchmark (SIGSTOP) to run something else. A round ends
    when its card ``round{k}.json`` is written; it started ``round_s`` before that and searched ``search_s``."""
    spans, start = [], None
    for line in pause_log.read_text().splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "pause":
            start = float(rest.split()[0])
        elif kind == "resume" and start is not None:
            spans.append((start, float(rest.split()[0])))
            start = None
    for path in (RESULTS / f"b2_{arch}.json" for arch in NETS):
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        for key, run in res["runs"].items():
            if not key.startswith("ga "):
                continue
            out_dir = RESULTS / f"{path.stem}_s{key.split(' s')[-1]}"
            for row in run["rows"]:
                card = out_dir / f"round{row['round']}.json"
                if not card.is_file() or "paused_s" in row:  # recorded once (a checkout resets the mtimes)
                    continue
                t0 = card.stat().st_mtime - row["round_s"]
                t1 = t0 + row["search_s"]
                row["paused_s"] = sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in spans)
        write_json(path, res)


# ------------------------------------------------------------------------------------------------ rendering
def render(archs=("resnet18_tv", "vgg16_bn"), tag: str = "") -> str:
    parts = []
    for arch in archs:
        path = RESULTS / f"b2_{arch}{tag}.json"
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        paper = PAPER[arch]
        md = [f"### {arch}", ""]
        for key, run in sorted(res["runs"].items()):
            base = run["baseline"]
            md += [f"**{key}** (teacher top-1 on val-report {base['top1']:.4f}, {base['params'] / 1e6:.2f} M params, "
                   f"{base['macs'] / 1e6:.1f} MMACs" + (f", {base['onnx_ms']:.3f} ms" if base.get("onnx_ms") else "")
                   + "):", "",
                   "| round | params (M) | size (MB) | MMACs | ONNX ms (b1) | top-1 reconstructed | top-1 after FT "
                   "| drop (pp) | search s | paper params (M) | paper top-1 | paper search s |",
                   "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r, p in zip(run["rows"], paper["rows"]):
                ps = paper["search_s"][r["round"] - 1] if paper["search_s"] else "–"
                search = f"{r['search_s'] - r.get('paused_s', 0.0):.0f}" + \
                    (f" ({r['paused_s']:.0f} paused)" if r.get("paused_s", 0) >= 1 else "")
                md.append(f"| {r['round']} | {r['params'] / 1e6:.3f} | {r['size_mb']:.3f} | {r['macs'] / 1e6:.2f} | "
                          f"{r.get('onnx_ms', float('nan')):.3f} | {r['top1_reconstructed']:.4f} | {r['top1']:.4f} | "
                          f"{100 * (base['top1'] - r['top1']):.2f} | {search} | {p[1]} | {p[3]:.4f} | "
                          f"{ps} |")
            within = [r["round"] for r in run["rows"] if base["top1"] - r["top1"] <= 0.01]
            last = (f"round {max(within)} ({run['rows'][max(within) - 1]['params'] / 1e6:.3f} M params)"
                    if within else "none")
            md += ["", f"Last round within 1 pp of the teacher: {last}.", ""]
        md += seed_summary(res["runs"], rounds=len(paper["rows"]))
        ga = by_method(res["runs"]).get("ga")
        if ga:  # the paper's Table 5 once, for the lowest seed (the others' widths are in the results file)
            md += widths_table(arch, f"ga s{min(ga)}", ga[min(ga)]) + [""]
        parts.append("\n".join(md))
    return "\n".join(parts)


def by_method(runs: dict) -> dict[str, dict[int, dict]]:
    """``{"ga": {seed: run}, "l1-uniform": {...}}`` from the results file's ``"<method> s<seed>"`` keys."""
    out: dict[str, dict[int, dict]] = {}
    for key, run in runs.items():
        method, _, seed = key.rpartition(" s")
        out.setdefault(method, {})[int(seed)] = run
    return out


def seed_summary(runs: dict, rounds: int) -> list[str]:
    """Per round, over the seeds that finished all ``rounds``: mean ± sd of params, top-1 after the fine-tune and
    the drop from the teacher (each seed's val-report half is its own, so drops are per seed), and the GA minus the
    control with B1s's paired bootstrap CI, over the seeds only (the rows carry top-1, not each image's
    correctness, so each seed is one column and no image is resampled). Nothing when fewer than 2 seeds."""
    methods = by_method(runs)
    ga, ctl = methods.get("ga", {}), methods.get("l1-uniform", {})
    seeds = sorted(s for s in ga if len(ga[s]["rows"]) == rounds)
    if len(seeds) < 2:
        return []
    paired = [s for s in seeds if s in ctl and len(ctl[s]["rows"]) == rounds]

    def ms(values, scale=1.0, fmt=".2f"):
        v = np.asarray(values, dtype=float) * scale
        return f"{v.mean():{fmt}} ± {v.std(ddof=1) if len(v) > 1 else 0.0:{fmt}}"

    md = [f"**Over seeds {', '.join(map(str, seeds))}** (mean ± sd; GA − control paired by seed over seeds "
          f"{', '.join(map(str, paired)) or 'none'}, bootstrap 95 % CI over the seeds; 'beats' only where it "
          "excludes 0):", "",
          "| round | GA params (M) | GA top-1 after FT (%) | GA drop (pp) | control top-1 (%) | GA − control (pp) "
          "[95 % CI] | verdict |", "|---|---|---|---|---|---|---|"]
    for k in range(rounds):
        g = [ga[s]["rows"][k] for s in seeds]
        drops = [ga[s]["baseline"]["top1"] - ga[s]["rows"][k]["top1"] for s in seeds]
        cell, verdict, ctl_cell = "–", "–", "–"
        if paired:
            c = [ctl[s]["rows"][k]["top1"] for s in paired]
            mean, lo, hi = bootstrap_diff(np.array([[ga[s]["rows"][k]["top1"]] for s in paired]),
                                          np.array([[ctl[s]["rows"][k]["top1"]] for s in paired]), n=10000)
            cell = f"{100 * mean:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"
            verdict = "GA beats" if lo > 0 else ("control beats" if hi < 0 else "no difference shown")
            ctl_cell = ms(c, 100)
        md.append(f"| {k + 1} | {ms([r['params'] for r in g], 1e-6, '.3f')} | {ms([r['top1'] for r in g], 100)} | "
                  f"{ms(drops, 100)} | {ctl_cell} | {cell} | {verdict} |")
    return md + [""]


def widths_table(arch: str, key: str, run: dict) -> list[str]:
    """The paper's Table 5 for a GA run: each conv's output channels after every round (the final classifier left
    out), with the paper's widths beside VGG16's (conv i is the i-th conv) and after ResNet-18's table."""
    rows = run["rows"]
    layers = [n for n in rows[0]["widths"] if not n.startswith(("classifier", "fc"))]
    vgg = arch == "vgg16_bn"
    head = "| layer | " + " | ".join(f"r{r['round']}" + (" ours / paper" if vgg else "") for r in rows) + " |"
    md = [f"Per-layer widths, **{key}** (the paper's Table 5):", "", head, "|---" * (len(rows) + 1) + "|"]
    for i, name in enumerate(layers, 1):
        ours = [r["widths"].get(name, 0) for r in rows]
        if vgg:
            paper = PAPER_TABLE5_VGG16.get(i, ["–"] * len(rows))
            md.append(f"| conv{i} ({name}) | " + " | ".join(f"{a} / {b}" for a, b in zip(ours, paper)) + " |")
        else:
            md.append(f"| {name} | " + " | ".join(map(str, ours)) + " |")
    cuts = [f"round {r['round']}: {', '.join(r['cut'])}" for r in rows if r["cut"]]
    md += ["", "Connection units cut (their layers are gone from then on): " + ("; ".join(cuts) or "none") + "."]
    if not vgg:
        md += ["", "The paper's ResNet18 widths by its conv index (r1..r5): " + "; ".join(
            f"{i}: {'/'.join(map(str, w))}" for i, w in sorted(PAPER_TABLE5_RESNET18.items())) + "."]
    return md


def plot(path: Path, archs=("resnet18_tv", "vgg16_bn"), tag: str = "") -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = [a for a in archs if (RESULTS / f"b2_{a}{tag}.json").is_file()]
    if not shown:
        return False
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], shown):
        res = json.loads((RESULTS / f"b2_{arch}{tag}.json").read_text())
        paper = PAPER[arch]
        ax.plot([r[1] for r in paper["rows"]], [r[3] for r in paper["rows"]], "k--o", label="paper (its teacher)")
        for method, seeds in sorted(by_method(res["runs"]).items()):
            done = [run["rows"] for run in seeds.values() if len(run["rows"]) == len(paper["rows"])]
            if not done:
                continue
            params = np.array([[r["params"] / 1e6 for r in rows] for rows in done]).mean(0)
            top1 = np.array([[r["top1"] for r in rows] for rows in done])
            label = f"{method} ({len(done)} seeds, mean ± sd)" if len(done) > 1 else f"{method} (1 seed)"
            ax.errorbar(params, top1.mean(0), yerr=top1.std(0, ddof=1) if len(done) > 1 else None, fmt="-o",
                        capsize=3, label=label)
            for run in seeds.values():
                ax.axhline(run["baseline"]["top1"], color="grey", lw=0.6)
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("params (M), per round")
        ax.set_ylabel("top-1 after fine-tune (val-report; paper: its test set)")
        ax.set_title(arch)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_tag(args) -> str:
    """The file-name tag of a run that is not the protocol itself: ``_quick``, or ``_ft<E>`` for a fine-tune of other
    than 1 epoch (a sensitivity run, kept apart from the protocol's results)."""
    if args.quick:
        return "_quick"
    return "" if args.ft_epochs == 1 else f"_ft{args.ft_epochs:g}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=sorted(NETS), default="resnet18_tv")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="ga,l1-uniform",
                   help="'l1-uniform' alone runs the control against a GA run already in the results file")
    p.add_argument("--target-params", type=float, default=None,
                   help="final parameter count (default: the paper's: 0.1e6 for ResNet-18, 0.3e6 for VGG16)")
    p.add_argument("--ft-epochs", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="tiny search, 0.05-epoch fine-tunes: a smoke test")
    p.add_argument("--data", default=str(SHARED / "data" / "cifar10-jpeg-trainval.tar.gz"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--render", action="store_true", help="only render the tables and the plot from the JSONs")
    p.add_argument("--pauses", type=Path, default=None,
                   help="with --render: a log of the benchmark's pauses (see record_pauses); search times less them")
    args = p.parse_args()
    tag = run_tag(args)
    if args.render:
        if args.pauses:
            record_pauses(args.pauses)
        write_text(RESULTS / f"b2_paper_protocol{tag}.md", render(tag=tag) + "\n")
        plot(RESULTS / f"b2_paper_protocol{tag}.png", tag=tag)
        print(render(tag=tag))
        return
    torch.set_num_threads(args.threads)
    build, weights, default_target = NETS[args.arch]
    args.weights = str(SHARED / "models" / weights)
    if args.quick:
        args.ft_epochs = 0.05
    out_dir = RESULTS / f"b2_{args.arch}_s{args.seed}{tag}"
    res_path = RESULTS / f"b2_{args.arch}{tag}.json"
    res = json.loads(res_path.read_text()) if res_path.is_file() else {"runs": {}}
    data = load_images(args.data)
    teacher = load_weights(build(), args.weights).eval()
    n_params = sum(p.numel() for p in teacher.parameters())
    target = args.target_params or default_target
    opts = options(args, target / n_params)
    methods = args.methods.split(",")
    x = torch.zeros(1, 3, 32, 32)
    done = res["runs"].get(f"ga s{args.seed}")
    if "ga" not in methods and done and len(done["rows"]) == opts.rounds:
        # The GA finished in an earlier run whose model files and checkpoint are gone (they are not kept in git):
        # its recorded rows (with their latencies) give the control its parameter counts.
        log(f"ga s{args.seed}: reusing the finished run on file ({res_path.name})")
        runs = {"ga": {k: v for k, v in done.items() if k != "settings"}}
    else:
        runs = {"ga": run_ga(args, data, teacher, out_dir, opts)}
    base = {**runs["ga"]["baseline"]}
    if base.get("onnx_ms") is None:
        base["onnx_ms"] = measure(teacher, x, runtime="onnxruntime", batch=1, threads=1, repeats=20).median_ms

    def save():  # after each method, so that a long run's finished part is on file
        latencies(out_dir, x, runs)
        for method, run in runs.items():
            res["runs"][f"{method} s{args.seed}"] = {**run, "baseline": base,  # the teacher, with its latency
                                                     "settings": {**asdict(opts), "target_params": target}}
        write_json(res_path, res)
        if not args.quick:
            write_text(RESULTS / f"b2_paper_protocol{tag}.md", render(tag=tag) + "\n")
            plot(RESULTS / f"b2_paper_protocol{tag}.png", tag=tag)
    save()
    if "l1-uniform" in methods:
        runs["l1-uniform"] = run_control(args, data, teacher, out_dir, opts, runs["ga"]["rows"])
        save()
    print(render() if not args.quick else json.dumps({k: [r["top1"] for r in v["rows"]] for k, v in runs.items()}))

if __name__ == "__main__":
    main()
