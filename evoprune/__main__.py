"""``python -m evoprune``: the :mod:`evoprune.cli.commands` command line.

Written with an absolute import so that the file also runs as a script, e.g. with the fitness on SCOOP workers:
``python -m scoop -n 4 path/to/evoprune/__main__.py prune ...``.
"""
import sys

from evoprune.cli.commands import main

if __name__ == "__main__":
    code = main()
    if code:
        # SCOOP returns 0 whatever its program does: leave a marker line that wrappers can check
        if getattr(sys.modules.get("scoop"), "IS_RUNNING", False):
            print(f"evoprune: FAILED (exit {code})", file=sys.stderr)
        sys.exit(code)
    # no sys.exit(0): under SCOOP an explicit exit is reported with a traceback
