"""SearchResult: what a search returns, one row per round in the columns of the paper's Tables 2, 3 and 5, and the
hypervolume of its (score, cost) fronts."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch.nn as nn
from deap import tools


@dataclass
class SearchResult:
    """One row per round in the columns of the paper's Tables 2 and 3, per-layer widths per round (Table 5),
    the chosen plans, every evaluated (score, MACs) point, the Pareto fronts and the DEAP logbook."""

    rows: list[dict]
    widths: list[dict[str, int]]  # index 0: the original model; index k: after round k
    plans: list[dict]
    evaluated: list[list[tuple[float, float]]]
    pareto: list[list[tuple[float, float]]]
    logbook: tools.Logbook
    model: nn.Module | None = None
    baseline: dict = field(default_factory=dict)
    cost: str = "macs"  # what the second objective (``evaluated``, ``pareto``) is: "macs", or "ms" (latency)

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "rows": self.rows, "widths": self.widths, "plans": self.plans,
                "pareto": self.pareto, "logbook": list(self.logbook), "cost": self.cost}

    def table(self) -> str:
        """Tables 2 and 3 of the paper for this run, as markdown."""
        b = self.baseline
        lat = "latency_ms" in b
        two = lat and b["latency_batch"] != 1
        head = "| round | params (M) | size (MB) | top-1 | reduction (%) | MMACs | time (s) |"
        if lat:
            head += " latency (ms, batch 1) |" + (f" latency (ms, batch {b['latency_batch']}) |" if two else "")
        lines = [head, "|---" * head.count(" | ") + "|---|"]

        def latency(r):
            return (f" {r['latency_ms']:.3f} |" + (f" {r['latency_batch_ms']:.3f} |" if two else "")) if lat else ""
        if b:
            lines.append(f"| 0 | {b['params'] / 1e6:.3f} | {b['size_mb']:.3f} | {_fmt(b.get('top1'))} | 0 | "
                         f"{b['macs'] / 1e6:.1f} | - |" + latency(b))
        for r in self.rows:
            lines.append(f"| {r['round']} | {r['params'] / 1e6:.3f} | {r['size_mb']:.3f} | {_fmt(r['top1'])} | "
                         f"{r['reduction_pct']:.1f} | {r['macs'] / 1e6:.1f} | {r['time_s']:.1f} |" + latency(r))
        return "\n".join(lines)

    def widths_table(self) -> str:
        """Table 5 of the paper: output channels of every conv/linear layer after each round."""
        layers = list(self.widths[0])
        head = "| layer | " + " | ".join(["r0"] + [f"r{k}" for k in range(1, len(self.widths))]) + " |"
        lines = [head, "|" + "---|" * (len(self.widths) + 1)]
        for name in layers:
            lines.append(f"| {name} | " + " | ".join(str(w.get(name, 0)) for w in self.widths) + " |")
        return "\n".join(lines)


def latency_over(row: dict) -> float | None:
    """How many ms a round's measured latency (at the latency batch) is over its budget, or None if it is within
    it or the run had no latency target. The search keeps the *predicted* latency within the budget; a machine
    under load measures slower."""
    if "latency_ms" not in row or row.get("budget") is None or row.get("budget_kind", "latency") != "latency":
        return None
    measured = row.get("latency_batch_ms", row["latency_ms"])
    return measured - row["budget"] if measured > row["budget"] else None


def _fmt(x):
    return "-" if x is None else f"{x:.4f}"


def hypervolume(population, base_macs, ref_score: float = 0.0) -> float:
    """Hypervolume of (score up, cost fraction down) against the reference point (``ref_score``, cost fraction 1);
    ``base_macs`` is the unpruned model's cost (MACs, or ms for a latency objective).

    ``ref_score`` is :func:`evoprune.evolve.fitness.reference_score`: top-1 0, or minus the chance-level loss
    ``-ln(classes)`` under ``metric="loss"`` (scores there are minus a loss, so a reference of 0 would leave every
    point outside). Points no better than the reference, or not cheaper than the base model, add nothing."""
    import moocore
    pts = np.array([(-ind.fitness.values[0], ind.fitness.values[1] / base_macs) for ind in population
                    if ind.fitness.values[0] > ref_score and ind.fitness.values[1] < base_macs])
    return float(moocore.hypervolume(pts, ref=[-ref_score, 1.0])) if len(pts) else 0.0
