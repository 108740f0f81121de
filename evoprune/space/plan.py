"""PruningPlan: what to keep, by group name and connection name. It round-trips through JSON; :func:`validate`
checks one against a pruning space."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping

from ..errors import PlanError


@dataclass(frozen=True)
class PruningPlan:
    """The kept channel indices per channel group, and which connection units stay active.

    ``groups`` maps a group name to the sorted channel indices to KEEP. A group missing from the mapping is kept
    whole. ``connections`` maps a connection unit name to ``True`` (active) or ``False`` (cut: the unit is bypassed).
    A unit missing from the mapping stays active. ``fingerprint`` (optional) names the pruning space the plan was
    made for.
    """

    groups: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    connections: Mapping[str, bool] = field(default_factory=dict)
    fingerprint: str | None = None

    def __post_init__(self):
        if not isinstance(self.groups, Mapping) or not isinstance(self.connections, Mapping):
            raise PlanError("PruningPlan.groups and .connections must be mappings (name -> indices, name -> bool)")
        groups = {}
        for name, idxs in self.groups.items():
            if not isinstance(name, str):
                raise PlanError(f"group names must be strings, got {name!r}")
            if type(idxs) is tuple and all(type(i) is int for i in idxs):  # decode's output: already ints
                groups[name] = idxs
                continue
            try:
                groups[name] = tuple(_as_index(i, name) for i in idxs)
            except TypeError:
                raise PlanError(f"group {name!r}: kept indices must be a sequence of ints, got {idxs!r}") from None
        conns = {}
        for name, active in self.connections.items():
            if not isinstance(name, str) or not isinstance(active, (bool, int)) or active not in (0, 1):
                raise PlanError(f"connection {name!r}: state must be True/False, got {active!r}")
            conns[name] = bool(active)
        object.__setattr__(self, "groups", groups)
        object.__setattr__(self, "connections", conns)

    @property
    def cut(self) -> tuple[str, ...]:
        """Names of the connection units this plan cuts."""
        return tuple(name for name, active in self.connections.items() if not active)

    def widths(self) -> dict[str, int]:
        return {name: len(idxs) for name, idxs in self.groups.items()}

    def to_dict(self) -> dict:
        return {
            "groups": {name: list(idxs) for name, idxs in self.groups.items()},
            "connections": dict(self.connections),
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "PruningPlan":
        if not isinstance(data, Mapping) or "groups" not in data:
            raise PlanError("a plan must be a mapping with a 'groups' entry (and optional 'connections')")
        return cls(groups=data["groups"], connections=data.get("connections", {}) or {},
                   fingerprint=data.get("fingerprint"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan JSON does not parse: {exc}") from None
        return cls.from_dict(data)


def _as_index(value, group: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise PlanError(f"group {group!r}: index {value!r} is not an integer")
    return int(value.__index__())


def validate(space, plan: PruningPlan) -> None:
    """Raise :class:`PlanError` naming the group and the problem, before torch-pruning ever sees the plan."""
    if not isinstance(plan, PruningPlan):
        raise PlanError(f"expected a PruningPlan, got {type(plan).__name__}")
    if plan.fingerprint is not None and plan.fingerprint != space.fingerprint:
        raise PlanError(f"plan was made for another pruning space (fingerprint {plan.fingerprint}, this space "
                        f"is {space.fingerprint}): rebuild the plan for this model and input shape")
    for name, idxs in plan.groups.items():
        g = space.group(name)
        bad = [i for i in idxs if not 0 <= i < g.size]
        if bad:
            raise PlanError(f"group {name!r}: index {bad[0]} is out of range [0, {g.size})")
        if len(set(idxs)) != len(idxs):
            dup = next(i for i in idxs if idxs.count(i) > 1)
            raise PlanError(f"group {name!r}: index {dup} is listed twice")
        if len(idxs) < space.min_keep:
            raise PlanError(f"group {name!r} keeps {len(idxs)} of {g.size} channels, below "
                            f"min_keep={space.min_keep}")
    units = space.layout.connection_names
    for name in plan.connections:
        if name not in units:
            cuttable = ", ".join(units) or "none"
            raise PlanError(f"connection {name!r} is not a cuttable unit of this model; cuttable: {cuttable}")
