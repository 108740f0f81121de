"""The report files of a search: report.json, report.md (the paper's Tables 2, 3 and 5 for this run), logbook.csv
and pareto.png (score vs MACs over every evaluated plan, Pareto front highlighted, chosen plans marked).

pareto.png needs matplotlib (``pip install 'evoprune[plot]'``); without it the other files are written and
:func:`write_report` leaves pareto.png out of the paths it returns (:data:`PARETO_SKIPPED` says why).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ..errors import ConfigError
from ..storage import atomic_write, write_json, write_text
from .result import SearchResult, latency_over

METRICS = ("top1", "loss", "kl")
#: What to tell the user when pareto.png was not written because matplotlib is missing.
PARETO_SKIPPED = "pareto.png skipped: pip install 'evoprune[plot]'"
#: The y axis of pareto.png for each fitness metric.
AXIS_LABELS = {"top1": "top-1 on the search split", "loss": "loss on the search split (lower is better)",
               "kl": "KL to the unpruned model on the search split (lower is better)"}


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (it is the optional ``plot`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def report_metric(settings: dict | None, metric: str | None = None) -> str:
    """The fitness metric of a run: ``metric`` if given, else the settings' ``fitness.metric`` (as
    :func:`evoprune.evolve.loop.search` records it) or ``metric``, else ``"top1"``."""
    settings = settings or {}
    metric = metric or settings.get("fitness.metric") or settings.get("metric") or "top1"
    if metric not in METRICS:
        raise ConfigError(f"must be 'top1', 'loss' or 'kl', got {metric!r}", setting="metric")
    return metric


def write_report(result: SearchResult, out_dir: str | Path, *, title: str = "evoprune run",
                 settings: dict | None = None, metric: str | None = None) -> dict[str, str]:
    """Write every report file into ``out_dir`` (atomically) and return the paths actually written, by kind:
    ``json``, ``md``, ``logbook`` and, when matplotlib is installed, ``pareto``.

    ``metric`` is the fitness metric of the search scores (``"top1"`` or ``"loss"``, where a score is minus the
    loss); by default it is read from ``settings["fitness.metric"]``, else top-1. It sets pareto.png's y axis.
    """
    metric = report_metric(settings, metric)
    out = Path(out_dir)
    paths = {"json": out / "report.json", "md": out / "report.md", "logbook": out / "logbook.csv"}
    write_json(paths["json"], {"title": title, "settings": settings or {}, **result.to_dict()})
    write_text(paths["md"], markdown(result, title=title, settings=settings))
    write_text(paths["logbook"], logbook_csv(result))
    if have_matplotlib():
        paths["pareto"] = out / "pareto.png"
        plot_pareto(result, paths["pareto"], metric=metric)
    return {k: str(v) for k, v in paths.items()}


def markdown(result: SearchResult, *, title: str, settings: dict | None = None) -> str:
    lines = [f"# {title}", ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"`{k}={v}`" for k, v in settings.items()), ""]
    lines += ["## Per round (the paper's Tables 2 and 3)", "",
              "MMACs are multiply-accumulates counted by torch-pruning (the paper's 'FLOPS' column). top-1 is on the "
              "report split, never on the images the GA scored. Reduction is the parameter reduction vs round 0.", "",
              result.table(), ""]
    for r in result.rows:
        over = latency_over(r)
        if over is not None:
            lines += [f"**Round {r['round']} is over its latency budget:** measured "
                      f"{r.get('latency_batch_ms', r['latency_ms']):.3f} ms against {r['budget']:.3f} ms "
                      f"(+{over:.3f} ms, {100 * over / r['budget']:.0f} %); the latency table predicted "
                      f"{r.get('predicted_ms', float('nan')):.3f} ms. Timings on a loaded machine run slow: measure "
                      "again on an idle one, or lower --target-latency-ms.", ""]
    if result.rows:
        lines += ["The choice score is the chosen plan's score on the rest of the search split (images the fitness "
                  "never saw; '-' when the best fitness score decided alone). The winner's curse is its search score "
                  "minus its report-split top-1 under the same recovery (BN re-calibration): how much the search "
                  "flattered it.", "",
                  "| round | search score | choice score | winner's curse (pp) | recovery | top-1 pruned (after "
                  "recovery, before fine-tune) | MACs % of original | cut connections | evaluations |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result.rows:
            pre = "-" if r.get("top1_pruned") is None else f"{r['top1_pruned']:.4f}"
            recovery = {"lsq": "lsq refit", "bias": "bias + BN re-cal.", "none": "BN re-cal."}.get(
                r.get("reconstruct", "none"), r.get("reconstruct"))
            choice = "-" if r.get("choice_score") is None else f"{r['choice_score']:.4f}"
            curse = "-" if r.get("curse_pp") is None else f"{r['curse_pp']:+.2f}"
            lines.append(f"| {r['round']} | {r['search_score']:.4f} | {choice} | {curse} | {recovery} | {pre} | "
                         f"{r['macs_pct']:.1f} | {', '.join(r['cut']) or 'none'} | {r['evaluations']} |")
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


def _y(score: float, metric: str) -> float:
    """The plotted value of a fitness score: top-1 as is, loss as minus the score (the loss itself)."""
    return -score if metric in ("loss", "kl") else score


def _plottable(score: float, metric: str) -> bool:
    """Failed evaluations are scored as the worst (-inf, NaN, or below 0 for top-1); they are left out."""
    return math.isfinite(score) and (metric in ("loss", "kl") or score >= 0)


def pareto_axes(result: SearchResult, *, metric: str = "top1", ax=None):
    """Draw the evaluated plans, the Pareto fronts and the chosen plans (*) of ``result`` on ``ax`` (a new figure
    if None) and return the Axes. x: MMACs; y: top-1 on the search split, or for ``metric="loss"`` the loss
    (minus the fitness score; lower is better), unclipped. With a latency objective x is the predicted latency in ms."""
    metric = report_metric(None, metric)
    import matplotlib
    if ax is None:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        _, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ms = getattr(result, "cost", "macs") == "ms"
    scale = 1.0 if ms else 1e6
    for k, points in enumerate(result.evaluated, start=1):
        pts = [(m / scale, _y(s, metric)) for s, m in points if _plottable(s, metric)]
        if pts:
            ax.scatter(*zip(*pts), s=8, alpha=0.35, label=f"round {k}: evaluated")
    for k, front in enumerate(result.pareto, start=1):
        pts = sorted((m / scale, _y(s, metric)) for s, m in front if _plottable(s, metric))
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, label=f"round {k}: Pareto front")
    for r in result.rows:
        if not _plottable(r["search_score"], metric):
            continue
        xy = (r["predicted_ms"] if ms else r["macs"] / 1e6, _y(r["search_score"], metric))
        ax.scatter([xy[0]], [xy[1]], marker="*", s=160, edgecolor="k", zorder=5)
        ax.annotate(f"r{r['round']}", xy, textcoords="offset points", xytext=(5, -12), annotation_clip=False)
        if r.get("budget") is not None and r.get("budget_kind", "latency" if ms else "macs") in ("macs", "latency"):
            ax.axvline(r["budget"] / scale, color="grey", ls="--", lw=0.8, zorder=1)
            ax.annotate(f"r{r['round']} budget", (r["budget"] / scale, 1), xycoords=("data", "axes fraction"),
                        textcoords="offset points", xytext=(2, -10), fontsize=7, color="grey", rotation=90,
                        va="top", annotation_clip=False)
    ax.margins(y=0.12)  # room above the highest point for its label
    ax.set_xlabel("predicted latency (ms, latency table)" if ms else "MMACs (torch-pruning counter)")
    ax.set_ylabel(AXIS_LABELS[metric])
    ax.set_title("evoprune: evaluated plans, Pareto fronts, chosen plans (*)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right" if metric in ("loss", "kl") else "lower right")
    return ax


def plot_pareto(result: SearchResult, path: str | Path, *, metric: str = "top1") -> None:
    """Write :func:`pareto_axes` as a PNG, atomically (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = pareto_axes(result, metric=metric)
    fig = ax.figure
    try:
        fig.tight_layout()
        with atomic_write(path, "wb") as fh:
            fig.savefig(fh, format="png")
    finally:
        plt.close(fig)
