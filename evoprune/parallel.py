"""Where fitness calls run: the ``map`` a toolbox uses, and whether this program runs under SCOOP.

``toolbox.map`` is SCOOP's ``futures.map`` when the program was launched with ``python -m scoop`` and the builtin
``map`` otherwise. Fitness state (:class:`evoprune.fitness.Evaluator`) is published to SCOOP workers through
``scoop.shared``; :func:`forget_shared` drops a published payload from this process's copy once it is loaded or
released, so that workers do not keep one model per round.
"""
from __future__ import annotations

from typing import Callable


def under_scoop() -> bool:
    """True when this program was launched with ``python -m scoop``."""
    import scoop
    return bool(getattr(scoop, "IS_RUNNING", False))


def scoop_origin() -> bool:
    """True in the main program of a SCOOP run (the process that calls ``futures.map``), False in its workers and
    outside SCOOP."""
    import scoop
    return under_scoop() and bool(getattr(scoop, "IS_ORIGIN", False))


def parallel_map() -> Callable:
    """``scoop.futures.map`` under ``python -m scoop``, the builtin ``map`` otherwise (no SCOOP warnings)."""
    if under_scoop():
        from scoop import futures
        return futures.map
    return map


def publish(name: str, payload) -> None:
    """Share ``payload`` with every SCOOP worker under ``name`` (no-op outside SCOOP)."""
    if under_scoop():
        from scoop import shared
        shared.setConst(**{name: payload})


def fetch(name: str, timeout: float = 300.0):
    """The payload published under ``name``, or None (outside SCOOP, or not published within ``timeout`` s)."""
    if not under_scoop():
        return None
    from scoop import shared
    return shared.getConst(name, timeout=timeout)


def forget_shared(name: str) -> None:
    """Drop this process's copy of the payload published under ``name`` (SCOOP keeps every constant forever)."""
    if not under_scoop():
        return
    from scoop import shared
    for values in (shared.elements or {}).values():
        values.pop(name, None)
