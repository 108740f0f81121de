"""Progress output on stderr: tqdm bars for long steps, and status lines that never carry terminal escapes.

Bars are on only when stderr is a terminal (a log file or a pipe gets no ``\\r`` redraws), and can be turned off by
the caller (``enabled=False``) or for the whole process with ``EVOPRUNE_PROGRESS=0``; ``EVOPRUNE_PROGRESS=1``
forces them on (for a terminal that is not detected as one).
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def interactive() -> bool:
    """Whether progress bars should be drawn: stderr is a terminal, unless ``EVOPRUNE_PROGRESS`` says otherwise."""
    forced = os.environ.get("EVOPRUNE_PROGRESS", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False


def bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str | None = None,
        unit: str = "it", enabled: bool = True, leave: bool = False, **kwargs) -> tqdm:
    """A tqdm bar on stderr, drawn only when :func:`interactive` and ``enabled``. Use it as tqdm: iterate over it,
    or ``update(n)`` / ``set_postfix_str(...)`` and ``close()`` (or a ``with`` block)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=leave, dynamic_ncols=True,
                disable=not (enabled and interactive()), **kwargs)


def status(message: str) -> None:
    """One status line on stderr that does not break a bar being drawn (tqdm.write), plain text otherwise."""
    if sys.stderr is None:  # pythonw: print(file=None) would write to stdout
        return
    if interactive():
        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)
