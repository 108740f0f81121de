"""The budget a search prunes to: :class:`Budget`, a kind (MACs, params or latency) and a limit in its unit.

One value object for what "the target" means, everywhere it is needed: the cost of an individual in the budget's
unit (:meth:`Budget.cost`), whether it fits (:meth:`Budget.feasible`), how budget selection ranks it
(:meth:`Budget.rank`), the geometric schedule of a T-round search (:meth:`Budget.schedule`: round k of T at
``base * (limit / base) ** (k / T)``), and the keywords of :func:`evoprune.evolve.operators.repair` and
:func:`evoprune.register` (:meth:`Budget.keywords`). The cost of MACs and latency budgets is the fitness's second
value (what the evaluator returns: MACs, or the latency table's predicted ms); a params budget's is counted from the
genes, since no evaluator returns params.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..validators import check_choice, is_number

TARGET_KINDS = ("macs", "params", "latency")
_UNITS = {"macs": "MACs", "params": "params", "latency": "ms"}


@dataclass(frozen=True)
class Budget:
    """``kind``: ``"macs"``, ``"params"`` or ``"latency"``; ``limit``: the most MACs, params or milliseconds a plan
    may cost (``inf``: no limit)."""

    kind: str
    limit: float

    def __post_init__(self):
        check_choice("target_kind", self.kind, TARGET_KINDS)
        if not is_number(self.limit) or self.limit <= 0:
            raise ConfigError(f"must be a number > 0 ({_UNITS[self.kind]}), got {self.limit!r}", setting="budget")

    # -------------------------------------------------------------------------------------------- making one
    @staticmethod
    def check_target(kind: str, target) -> None:
        """A search target by its kind: a fraction in (0, 1] of the original MACs or params, or a latency in ms > 0
        (:class:`ConfigError` naming the setting otherwise)."""
        check_choice("target_kind", kind, TARGET_KINDS)
        if kind == "latency":
            if not is_number(target) or not 0 < target < math.inf:
                raise ConfigError(f"must be a latency in ms > 0, got {target!r}", setting="target_latency_ms")
        elif not is_number(target) or not 0 < target <= 1:
            raise ConfigError(f"must be a fraction in (0, 1] of the original {kind.upper()}, got {target!r}",
                              setting="target" if kind == "macs" else "target_params")

    @classmethod
    def of_target(cls, kind: str, target: float, base: float) -> "Budget":
        """The final budget of a search's ``target`` for a model whose cost is ``base``: a fraction of it for MACs
        and params, milliseconds as they are for latency."""
        cls.check_target(kind, target)
        return cls(kind, float(target) if kind == "latency" else float(target) * base)

    @classmethod
    def from_keywords(cls, macs_budget=None, params_budget=None, latency_budget=None) -> "Budget | None":
        """The budget selection and feasibility work on, from :func:`evoprune.register`'s keywords: the latency
        budget, else the MACs budget, else the params budget (None without any). The repair keeps every one."""
        for kind, limit in (("latency", latency_budget), ("macs", macs_budget), ("params", params_budget)):
            if limit is not None:
                return cls(kind, limit)
        return None

    # ----------------------------------------------------------------------------------------------- using it
    def schedule(self, base: float, rounds: int) -> list["Budget"]:
        """The budgets of rounds 1..``rounds``: falling geometrically from ``base`` (the original model's cost) to
        this one, so that each round prunes further from the last and the final round ends here."""
        share = self.limit / base
        return [Budget(self.kind, base * share ** (k / rounds)) for k in range(1, rounds + 1)]

    def cost(self, individual, space) -> float:
        """The individual's cost in this budget's unit (it must have been evaluated, except for params)."""
        return space.cost_of(individual)[1] if self.kind == "params" else individual.fitness.values[1]

    def feasible(self, individual, space) -> bool:
        return self.cost(individual, space) <= self.limit

    def rank(self, individual, space) -> tuple:
        """The sort key of budget selection (higher first): feasible individuals by score, then lower cost; then
        the infeasible ones, least over the budget first."""
        score, cost = individual.fitness.values[0], self.cost(individual, space)
        ok = cost <= self.limit
        return (ok, score if ok else -cost, -cost)

    def keywords(self) -> dict:
        """``macs_budget=``, ``params_budget=`` and ``latency_budget=`` as :func:`evoprune.register` and the repair
        take them (the one of this kind set, the others None)."""
        return {f"{k}_budget": (self.limit if k == self.kind else None) for k in TARGET_KINDS}

    def __str__(self) -> str:
        if self.kind == "latency":
            return f"{self.limit:.3f} ms"
        return f"{self.limit / 1e6:.3f} M {_UNITS[self.kind]}"
