"""Render the benchmark results (benchmarks/results/*.json) as the markdown tables quoted in BENCHMARKS.md.

    python benchmarks/render.py [--quick]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name):
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def pct(x):
    return "-" if x is None else f"{100 * x:.2f}"


def b1(res):
    t = res["teacher"]
    lines = [f"Teacher: {t['macs'] / 1e6:.1f} MMACs, {t['params'] / 1e6:.2f} M params, top-1 {pct(t['top1_report'])} % "
             "on val-report.", "",
             "| budget | method | KD | MMACs (% of teacher) | params (M) | top-1 pruned | + BN recal | + fine-tune | "
             "search (s) |", "|---|---|---|---|---|---|---|---|---|"]
    order = ["ga-neuron", "ga-conn", "tp-uniform", "tp-global", "random"]
    rows = sorted((r for r in res["rows"] if not r["method"].startswith("random#")),
                  key=lambda r: (-(r.get("budget") or 0), order.index(r["method"]) if r["method"] in order else 9,
                                 r["method"], not r.get("kd", True)))
    for r in rows:
        budget = "-" if r.get("budget") is None else f"{100 * r['budget']:.0f} %"
        sd = lambda k: f" ± {100 * r[k + '_sd']:.2f}" if k + "_sd" in r else ""  # noqa: E731
        lines.append(
            f"| {budget} | {r['method']}{' (mean of ' + str(r['n']) + ')' if 'n' in r else ''} | "
            f"{'on' if r.get('kd', True) else 'off'} | {r['macs'] / 1e6:.1f} ({100 * r['macs'] / t['macs']:.1f} %) | "
            f"{r['params'] / 1e6:.3f} | {pct(r['top1_pruned'])}{sd('top1_pruned')} | "
            f"{pct(r['top1_recal'])}{sd('top1_recal')} | {pct(r['top1_finetuned'])}{sd('top1_finetuned')} | "
            f"{r.get('search_time_s', 0):.0f} |")
    return "\n".join(lines)


def b2(res):
    lines = ["| round | params M (ours / paper) | MB (ours / paper) | top-1 (ours / paper) | "
             "reduction % (ours / paper) | MMACs ours / paper 'FLOPS·1e6' | time s (ours / paper) |",
             "|---|---|---|---|---|---|---|"]
    for r, p, ps in zip(res["rows"], res["paper_table2_vgg16"], res["paper_table3_vgg16_s"]):
        lines.append(f"| {r['round']} | {r['params'] / 1e6:.3f} / {p[1]} | {r['size_mb']:.3f} / {p[2]} | "
                     f"{r['top1']:.4f} / {p[3]} | {r['reduction_pct']:.1f} / {p[4]} | {r['macs'] / 1e6:.1f} / {p[5]} | "
                     f"{r['time_s']:.0f} / {ps} |")
    lines += ["", "| conv | " + " | ".join(f"r{k} ours / paper" for k in range(1, 6)) + " |",
              "|---|" + "---|" * 5]
    for name, w in res["widths"].items():
        lines.append(f"| {name} | " + " | ".join(f"{a} / {b}" for a, b in zip(w["ours"], w["paper"])) + " |")
    return "\n".join(lines)


def b3(res):
    lines = ["| keep | MACs ratio | mode | fitness calls/s | median s (min-max) |", "|---|---|---|---|---|"]
    for r in res["fitness"]:
        s = r["seconds"]
        lines.append(f"| {r['keep']} | {r['macs_ratio']:.2f} | {r['mode']} | {r['calls_per_s']:.2f} | "
                     f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}) |")
    o = res["overhead"]
    lines += ["", "| step | median ms (min-max) |", "|---|---|"]
    for k in ("vary_per_child", "repair_to_budget", "decode", "analytic_cost", "surgery_apply_plan",
              "bare_forward_pruned"):
        lines.append(f"| {k} | {1e3 * o[k]['median']:.2f} ({1e3 * o[k]['min']:.2f}-{1e3 * o[k]['max']:.2f}) |")
    masked_pct = 100 * o["ga_overhead_fraction_masked"]
    lines += ["", f"GA overhead per evaluation / bare forward: masked path {masked_pct:.1f} "
              f"%, physical path (with surgery) {100 * o['ga_overhead_fraction_physical']:.1f} %.", "",
              "| keep | MACs ratio | batch | eager ms | TorchScript ms | ONNX Runtime ms | eager speed-up |",
              "|---|---|---|---|---|---|---|"]
    base = {r["batch"]: r["eager"]["median"] for r in res["latency"] if r["keep"] == 1.0}
    for r in res["latency"]:
        ort = f"{1e3 * r['onnxruntime']['median']:.2f}" if "onnxruntime" in r else "-"
        lines.append(f"| {r['keep']} | {r['macs_ratio']:.2f} | {r['batch']} | {1e3 * r['eager']['median']:.2f} | "
                     f"{1e3 * r['torchscript']['median']:.2f} | {ort} | "
                     f"x{base[r['batch']] / r['eager']['median']:.2f} |")
    s = res["scoop"]
    lines += ["", f"SCOOP (tiny search job, whole-job wall time, median of {s['serial_1_process']['n']}): serial "
              f"{s['serial_1_process']['median']:.1f} s, `-n 2` {s['scoop_2_workers']['median']:.1f} s, speed-up "
              f"x{s['speedup']:.2f}.", ""]
    if "scoop_fitness_map" in res:
        m = res["scoop_fitness_map"]
        lines += [f"SCOOP, one map of 14 VGG16 fitness calls (median of 2): serial with 2 torch threads "
                  f"{m['serial_2_threads']['median']:.1f} s, serial with 1 thread {m['serial_1_thread']['median']:.1f}"
                  f" s, `python -m scoop -n 2` (1 thread per worker) {m['scoop_2_workers']['median']:.1f} s: x"
                  f"{m['speedup_vs_serial_2_threads']:.2f} vs 2 threads, x{m['speedup_vs_serial_1_thread']:.2f} vs 1.",
                  ""]
    lines += [
              f"Peak RSS: tiny search job {res['peak_rss']['tiny_search_job_MiB']:.0f} MiB; this benchmark (VGG16 "
              f"and its copies) {res['peak_rss']['this_benchmark_MiB']:.0f} MiB."]
    return "\n".join(lines)


def b4(res):
    lines = ["| plan | MMACs | quick score, no BN recal | quick score, BN recal | top-1 after fine-tune |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['plan']} | {r['macs'] / 1e6:.1f} | {r['quick_plain']:.3f} | {r['quick_recal']:.3f} | "
                     f"{r['finetuned']:.4f} |")
    lines += ["", f"Spearman rank correlation with the fine-tuned accuracy: without BN re-calibration "
              f"{res['spearman_plain_vs_finetuned']:.3f}, with it {res['spearman_recal_vs_finetuned']:.3f}."]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    tag = "_quick" if args.quick else ""
    for title, name, fn in (("B1", f"b1_equal_macs{tag}.json", b1), ("B2", f"b2_paper_protocol{tag}.json", b2),
                            ("B3", f"b3_speed{tag}.json", b3), ("B4", f"b4_fidelity{tag}_b50.json", b4),
                            ("B4", f"b4_fidelity{tag}_b25.json", b4)):
        res = load(name)
        print(f"## {title} ({name})\n")
        print(fn(res) if res else "(no results yet)")
        print()


if __name__ == "__main__":
    main()
