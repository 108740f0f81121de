"""The argument checks that several settings share, written once: whole numbers, fractions, probabilities, choices,
switches and devices.

Every check returns the value (converted where that is meant: a probability becomes a float, a device a
``torch.device``) or raises one :class:`~evoprune.errors.ConfigError` whose ``setting`` is the name it was given,
so that the command line can put its flag in the message (``--population must be an int >= 2, got 1``). Used by
:class:`~evoprune.evolve.config.SearchConfig`, :class:`~evoprune.evolve.fitness.FitnessConfig`,
:class:`~evoprune.cli.options.JobOptions`, the runtime and training options and the command line.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from .errors import ConfigError


def is_int(value) -> bool:
    """An int and not a bool (``True`` is an int to Python, never a count to evoprune)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float, not a bool, not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_int(name: str, value, minimum: int = 1, *, maximum: int | None = None, optional: bool = False,
              what: str | None = None) -> int | None:
    """``value`` if it is an int in ``[minimum, maximum]`` (None too with ``optional``); ``what`` words the range."""
    if optional and value is None:
        return None
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        rng = what or (f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}")
        raise ConfigError(f"must be an int {rng}{' (or None)' if optional else ''}, got {value!r}", setting=name)
    return value


def check_fraction(name: str, value, *, what: str = "a fraction") -> float:
    """``value`` as a float if it is a number in (0, 1]."""
    if not is_number(value) or not 0 < value <= 1:
        raise ConfigError(f"must be {what} in (0, 1], got {value!r}", setting=name)
    return float(value)


def check_probability(name: str, value) -> float:
    """``value`` as a float if it is a number in [0, 1]."""
    if not is_number(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"must be a probability in [0, 1], got {value!r}", setting=name)
    return float(value)


def check_positive(name: str, value, *, zero: bool = False, what: str = "a number") -> float:
    """``value`` if it is a finite number > 0 (>= 0 with ``zero``)."""
    if not is_number(value) or math.isinf(value) or not (value >= 0 if zero else value > 0):
        raise ConfigError(f"must be {what} {'>= 0' if zero else '> 0'}, got {value!r}", setting=name)
    return value


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        quoted = [f"'{c}'" for c in choices]
        listed = (", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]) \
            if len(choices) <= 3 else f"one of {', '.join(choices)}"
        raise ConfigError(f"must be {listed}, got {value!r}", setting=name)
    return value


def check_bool(name: str, value) -> bool:
    """``value`` if it is True or False."""
    if not isinstance(value, bool):
        raise ConfigError(f"must be True or False, got {value!r}", setting=name)
    return value


def check_device(device, name: str = "device") -> torch.device:
    """``torch.device(device)`` if it is a device torch can use here: a malformed name, or CUDA on a machine without
    it, is a :class:`ConfigError` naming ``name``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"must be 'cpu', 'cuda' or 'cuda:N', got {device!r}", setting=name) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"is {str(dev)!r}, but torch sees no CUDA device here; use cpu", setting=name)
    return dev
