"""Shared by the CIFAR-10 examples: the flags and the job of ``evoprune prune --arch`` (the parser of
:mod:`evoprune.cli.parser`, the job of :func:`evoprune.cli.job.prune_job`), and turning evoprune errors into one
``error:`` line and an exit code (:func:`evoprune.cli.commands.guarded`)."""
from __future__ import annotations

import argparse
import os
import sys

from evoprune.cli.commands import guarded
from evoprune.cli.parser import HelpFormatter, Parser, add_prune_arguments
from evoprune.cli.job import prune_job


def parser(description: str, default_weights: str | None) -> argparse.ArgumentParser:
    p = Parser(description=description, formatter_class=HelpFormatter)
    add_prune_arguments(p, default_weights=default_weights,
                        default_data=os.environ.get("EVOPRUNE_DATA", "data/cifar10"))
    return p


def main(build_model, description: str, default_weights: str | None = None, argv=None) -> int:
    """Parse the flags and run the prune job; return the exit code (0 ok, 2 usage/config error, 1 failure)."""
    try:
        args = parser(description, default_weights).parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    return guarded(lambda: prune_job(build_model, args, title=description))


def exit_code(code: int) -> None:
    """Exit with ``code``. Under ``python -m scoop`` a plain non-zero exit still makes scoop return 0, so the
    failure is also announced on stderr with a marker line that wrappers can check. A successful run just returns
    (SCOOP reports an explicit ``sys.exit(0)`` with a traceback)."""
    if code:
        print(f"evoprune: FAILED (exit {code})", file=sys.stderr)
        sys.exit(code)
