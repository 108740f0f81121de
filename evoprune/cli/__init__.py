"""The ``evoprune`` command-line application, on top of the library and never imported by it.

:func:`main` and one handler per subcommand (:mod:`.commands`), the argument parser (:mod:`.parser`), the prune
job's settings and their flags (:mod:`.options`), the job itself (:mod:`.job`: data and a model in, compact models
and a report out) with its resume record (:mod:`.resume`), where a command's model and data come from
(:mod:`.sources`), and the ``inspect`` and ``demo`` commands (:mod:`.inspect_model`, :mod:`.demo`). User mistakes
become one ``evoprune:`` line and exit status 2 here, never a traceback.
"""
from .commands import main

__all__ = ["main"]
