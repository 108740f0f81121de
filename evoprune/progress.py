"""Progress output on stderr: tqdm bars for long steps, and status lines that never carry terminal escapes.

Bars are drawn only when stderr is a terminal. When it is a log file or a pipe (no ``\\r`` redraws there), a step
that runs longer than :data:`FIRST_LINE_S` prints plain lines instead, at most one per ``EVOPRUNE_PROGRESS_INTERVAL``
seconds (default 30): the step's name, the work done out of the total, the elapsed time and an ETA, e.g.
``evoprune: round 1/5 gen 2/4: 12/25 plan (48 %), 31 s, ETA 34 s``. The caller can turn progress off
(``enabled=False``), and so can ``EVOPRUNE_PROGRESS=0`` for the whole process; ``EVOPRUNE_PROGRESS=1`` forces bars on
(for a terminal that is not detected as one).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
FIRST_LINE_S = 2.0  # a step shorter than this prints no plain progress line


def _switch() -> str:
    return os.environ.get("EVOPRUNE_PROGRESS", "").strip().lower()


def interactive() -> bool:
    """Whether progress bars should be drawn: stderr is a terminal, unless ``EVOPRUNE_PROGRESS`` says otherwise."""
    forced = _switch()
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
    if enabled and not interactive() and _switch() not in ("0", "false", "no", "off") and sys.stderr is not None:
        return PlainProgress(iterable, total=total, desc=desc, unit=unit)  # tqdm's display kwargs do not apply
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=leave, dynamic_ncols=True,
                disable=not (enabled and interactive()), **kwargs)


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("EVOPRUNE_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


class PlainProgress:
    """What :func:`bar` gives when stderr is no terminal: the tqdm calls a step makes (iterate, ``update``,
    ``set_postfix_str``, ``close``, ``with``), printed as plain lines at a bounded rate (see the module doc)."""

    disable = False  # tqdm's attribute: this one shows

    def __init__(self, iterable=None, *, total=None, desc=None, unit="it"):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc or "working", unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            self.total = len(iterable)
        self.n, self.postfix = 0, ""
        self.t0 = time.monotonic()
        self.interval = _interval()
        self.printed_at: float | None = None

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = text

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        due = now - self.t0 >= FIRST_LINE_S if self.printed_at is None else now - self.printed_at >= self.interval
        if due:
            self._line(now)

    def close(self) -> None:
        if self.printed_at is not None:  # a step that printed progress says when it is done
            self._line(time.monotonic(), done=True)
        self.printed_at = float("inf")  # nothing more after close

    def _line(self, now: float, done: bool = False) -> None:
        if self.printed_at == float("inf"):
            return
        self.printed_at = now
        elapsed = now - self.t0
        n, total, unit = (self.n / 2**20, (self.total or 0) / 2**20, "MiB") if self.unit == "B" else \
            (self.n, self.total, self.unit)
        count = f"{n:.0f}/{total:.0f} {unit}" if self.total else f"{n:.0f} {unit}"
        if self.total:
            count += f" ({100 * self.n / self.total:.0f} %)"
        eta = ""
        if not done and self.total and 0 < self.n < self.total:
            eta = f", ETA {_duration(elapsed / self.n * (self.total - self.n))}"
        tail = f" [{self.postfix}]" if self.postfix else ""
        print(f"evoprune: {self.desc}: {count}, {_duration(elapsed)}{eta}{' (done)' if done else ''}{tail}",
              file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def status(message: str) -> None:
    """One status line on stderr that does not break a bar being drawn (tqdm.write), plain text otherwise."""
    if sys.stderr is None:  # pythonw: print(file=None) would write to stdout
        return
    if interactive():
        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)
