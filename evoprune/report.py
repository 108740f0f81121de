"""The report files of a search: report.json, report.md (the paper's Tables 2, 3 and 5 for this run), logbook.csv
and pareto.png (score vs MACs over every evaluated plan, Pareto front highlighted, chosen plans marked)."""
from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

from .evolve import SearchResult
from .storage import atomic_write, write_json, write_text


def write_report(result: SearchResult, out_dir: str | Path, *, title: str = "evoprune run",
                 settings: dict | None = None) -> dict[str, str]:
    """Write every report file into ``out_dir`` (atomically) and return their paths."""
    out = Path(out_dir)
    paths = {"json": out / "report.json", "md": out / "report.md", "logbook": out / "logbook.csv"}
    write_json(paths["json"], {"title": title, "settings": settings or {}, **result.to_dict()})
    write_text(paths["md"], markdown(result, title=title, settings=settings))
    write_text(paths["logbook"], logbook_csv(result))
    if importlib.util.find_spec("matplotlib") is not None:
        paths["pareto"] = out / "pareto.png"
        plot_pareto(result, paths["pareto"])
    return {k: str(v) for k, v in paths.items()}


def markdown(result: SearchResult, *, title: str, settings: dict | None = None) -> str:
    lines = [f"# {title}", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()), ""]
    lines += ["## Per round (the paper's Tables 2 and 3)", "",
              "MMACs are multiply-accumulates counted by torch-pruning (the paper's 'FLOPS' column). top-1 is on the "
              "report split, never on the images the GA scored. Reduction is the parameter reduction vs round 0.", "",
              result.table(), ""]
    if result.rows:
        lines += ["| round | search score | top-1 pruned (before fine-tune) | MACs % of original | cut connections "
                  "| evaluations |", "|---|---|---|---|---|---|"]
        for r in result.rows:
            pre = "-" if r.get("top1_pruned") is None else f"{r['top1_pruned']:.4f}"
            lines.append(f"| {r['round']} | {r['search_score']:.4f} | {pre} | {r['macs_pct']:.1f} | "
                         f"{', '.join(r['cut']) or 'none'} | {r['evaluations']} |")
        lines.append("")
    lines += ["## Per-layer widths (the paper's Table 5)", "", result.widths_table(), ""]
    return "\n".join(lines)


def logbook_csv(result: SearchResult) -> str:
    buf = io.StringIO()
    fields = list(result.logbook.header or (result.logbook[0].keys() if result.logbook else []))
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for rec in result.logbook:
        writer.writerow(rec)
    return buf.getvalue()


def plot_pareto(result: SearchResult, path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for k, points in enumerate(result.evaluated, start=1):
        pts = [(m / 1e6, s) for s, m in points if s >= 0]
        if pts:
            ax.scatter(*zip(*pts), s=8, alpha=0.35, label=f"round {k}: evaluated")
    for k, front in enumerate(result.pareto, start=1):
        pts = sorted((m / 1e6, s) for s, m in front if s >= 0)
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, label=f"round {k}: Pareto front")
    for r in result.rows:
        ax.scatter([r["macs"] / 1e6], [r["search_score"]], marker="*", s=160, edgecolor="k", zorder=5)
        ax.annotate(f"r{r['round']}", (r["macs"] / 1e6, r["search_score"]), textcoords="offset points",
                    xytext=(5, 5))
    ax.set_xlabel("MMACs (torch-pruning counter)")
    ax.set_ylabel("fitness score (search split)")
    ax.set_title("evoprune: evaluated plans, Pareto fronts, chosen plans (*)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png")
    plt.close(fig)
