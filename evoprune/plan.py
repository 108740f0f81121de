"""PruningPlan: what to keep, by group name and connection name. It round-trips through JSON."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping

from .errors import PlanError


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
