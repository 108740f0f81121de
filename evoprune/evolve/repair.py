"""Pending repair: every individual a toolbox makes is repaired (min_keep, round_to, the budget) exactly once, before
it is scored.

:func:`evoprune.evolve.operators.repair` fixes an individual in place. A :class:`PendingRepair` wires it into a DEAP
toolbox with one rule: ``individual`` and ``mutate`` repair what they return at once; ``mate`` only marks its
children (``child.repair_pending = True``), because the mutation that usually follows would repair them again.
The one step that finishes the job is :meth:`PendingRepair.settle` (``toolbox.settle(children)``): it repairs the
children still marked. ``toolbox.map`` and ``toolbox.evaluate`` settle what they are given before scoring it, in
this process, so the genes scored are the genes kept, whatever the loop around them does.
"""
from __future__ import annotations

import functools
from typing import Callable

PENDING = "repair_pending"  # the attribute ``mate`` sets on children whose repair is pending


class PendingRepair:
    """``fix`` (``fix(individual)``, in place) applied once per individual: now (:meth:`now`), or after ``mate``
    when the individual is settled (:meth:`later`, :meth:`settle`)."""

    def __init__(self, fix: Callable):
        self._fix = fix

    def __call__(self, ind):
        """Repair ``ind`` now and clear its mark; returns it."""
        self._fix(ind)
        if hasattr(ind, "__dict__"):
            vars(ind).pop(PENDING, None)
        return ind

    def now(self, *, single: bool = False):
        """A DEAP decorator: repair every individual an operator returns (a tuple of them, or one with ``single``)."""
        def decorator(op):
            @functools.wraps(op)
            def wrapper(*args, **kwargs):
                out = op(*args, **kwargs)
                for ind in ((out,) if single else out):
                    self(ind)
                return out
            return wrapper
        return decorator

    def later(self):
        """A DEAP decorator for ``mate``: mark the children pending instead of repairing them (a container without
        attributes, a plain list, is repaired at once)."""
        def decorator(op):
            @functools.wraps(op)
            def wrapper(*args, **kwargs):
                out = op(*args, **kwargs)
                for ind in out:
                    if hasattr(ind, "__dict__"):
                        setattr(ind, PENDING, True)
                    else:
                        self(ind)
                return out
            return wrapper
        return decorator

    def settle(self, individuals) -> list:
        """``individuals`` as a list, the pending ones repaired."""
        individuals = list(individuals)
        for ind in individuals:
            if getattr(ind, PENDING, False):
                self(ind)
        return individuals

    def mapping(self, mapper: Callable) -> Callable:
        """``mapper`` (``map``, SCOOP's ``futures.map``...) that settles its inputs here before they are shipped."""
        @functools.wraps(mapper)
        def settled_map(fn, *iterables):
            return mapper(fn, *(self.settle(it) for it in iterables))
        return settled_map

    def evaluating(self, evaluate: Callable) -> "SettledEvaluate":
        """``evaluate`` that first repairs a pending individual (a direct call on a crossed child)."""
        return SettledEvaluate(evaluate, self)


class SettledEvaluate:
    """``evaluate`` that settles a pending individual first. It pickles as ``evaluate`` alone: what ``map`` ships to
    worker processes was settled before it left. (Slots: DEAP copies a registered function's ``__dict__`` onto its
    partial, which would ship the repair too.)"""

    __slots__ = ("evaluate", "repair")

    def __init__(self, evaluate: Callable, repair: PendingRepair | None):
        self.evaluate, self.repair = evaluate, repair

    def __call__(self, ind, *args, **kwargs):
        if self.repair is not None and getattr(ind, PENDING, False):
            self.repair(ind)
        return self.evaluate(ind, *args, **kwargs)

    def __reduce__(self):
        return SettledEvaluate, (self.evaluate, None)
