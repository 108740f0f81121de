"""The module paths of evoprune 0.1's flat layout, kept importable for one release with a ``DeprecationWarning``.

``import evoprune.toolbox`` or ``from evoprune.fitness import Evaluator`` still work: each old path is a stand-in
module in ``sys.modules`` (put there when ``evoprune`` is imported) that forwards every attribute to the module's
new home and warns, naming it. Stand-ins rather than an import hook, because an import hook would bind the module
over the package attribute of the same name (``evoprune.export``, the function). Three old paths need none:
``evoprune.space``, ``evoprune.evolve`` and ``evoprune.cli`` are now the packages, and export the same public names.
"""
from __future__ import annotations

import importlib
import sys
import types
import warnings

#: old path -> new path (the 0.2 layout: space, prune, deploy, evolve, cli)
MOVED = {
    **{f"evoprune.{m}": f"evoprune.space.{m}" for m in ("plan", "genome", "cost", "importance")},
    "evoprune.discover": "evoprune.space.discovery", "evoprune.trace": "evoprune.space.graph",
    **{f"evoprune.{m}": f"evoprune.prune.{m}" for m in ("surgery", "slicing", "refit", "lsq", "grams", "bn")},
    "evoprune.export": "evoprune.deploy.exporter",
    **{f"evoprune.{m}": f"evoprune.deploy.{m}" for m in ("runtime", "latency")},
    **{f"evoprune.{m}": f"evoprune.evolve.{m}" for m in ("operators", "toolbox", "fitness", "engines", "config",
                                                         "population", "round", "knapsack", "result", "checkpoint",
                                                         "report")},
    "evoprune.cli_parser": "evoprune.cli.parser",
    **{f"evoprune.{m}": f"evoprune.cli.{m}" for m in ("options", "job", "resume", "sources", "inspect_model",
                                                      "demo")},
}


class Moved(types.ModuleType):
    """A stand-in for a module that moved: every attribute comes from the new module, with a warning."""

    def __init__(self, old: str, new: str):
        super().__init__(old, f"moved to {new}")
        self.__dict__["_new"] = new

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        new = self.__dict__["_new"]
        warnings.warn(f"{self.__name__} is deprecated and goes in evoprune 0.3: import {name} from {new}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)

    def __dir__(self):
        return dir(importlib.import_module(self.__dict__["_new"]))


def install() -> None:
    """Put the stand-ins in ``sys.modules`` (where a real module of that name is loaded already, leave it)."""
    for old, new in MOVED.items():
        sys.modules.setdefault(old, Moved(old, new))


def stand_in(name: str):
    """The stand-in for ``evoprune.<name>`` (``from evoprune import toolbox``), or None."""
    return sys.modules.get(f"evoprune.{name}") if f"evoprune.{name}" in MOVED else None
