"""The evoprune exception hierarchy (the argument checks that raise them are in :mod:`evoprune.validators`).

Every public entry point validates its inputs before doing any work and raises one of these. Each message says what
was wrong and what to do about it.
"""
from __future__ import annotations

import functools


class EvoPruneError(Exception):
    """Base class of every error evoprune raises on purpose."""


class PlanError(EvoPruneError, ValueError):
    """A pruning plan or individual does not fit its pruning space (length, group, index, min_keep, connection)."""


class ConfigError(EvoPruneError, ValueError):
    """A search or operator parameter is out of range (p_c, p_mut, population, elites, rounds, target...).

    ``ConfigError(detail, setting="p_c")`` names the setting that is wrong: the message is then
    ``"p_c " + detail`` and :meth:`named` rewrites it with another name for the same setting (the command line
    puts its flag there, ``--p-c``). Without ``setting`` it is a plain message, as before.
    """

    def __init__(self, message: str = "", *, setting: str | None = None):
        self.setting = setting
        self.detail = message
        super().__init__(f"{setting} {message}" if setting else message)

    def named(self, name: str | None) -> str:
        """The message with the setting called ``name`` (e.g. a flag); the plain message when there is none."""
        if self.setting is None or not name:
            return str(self)
        return f"{name} {self.detail}"

    def __reduce__(self):  # keep ``setting`` across pickling (SCOOP workers)
        return functools.partial(type(self), setting=self.setting), (self.detail,)


class DataError(EvoPruneError):
    """Data are missing, empty, unreadable or do not match the expected layout."""


class ModelError(EvoPruneError):
    """A model cannot be traced, pruned or evaluated (nothing prunable, wrong input shape, NaN weights...)."""


class EvaluationError(EvoPruneError):
    """A fitness call failed (or gave NaN). The message names the plan, the process and the traceback."""


class EngineError(EvoPruneError):
    """A parallel engine cannot run fitness calls: its scheduler cannot be reached, or its workers run another
    evoprune version."""


class CheckpointError(EvoPruneError):
    """A checkpoint or saved file is truncated, from another version, for another model, or untrusted.

    ``reason`` (optional) says which of these it is, for callers that word their own advice (the command line
    names its flags): ``"missing"``, ``"empty"``, ``"not-torch"`` (not a file PyTorch wrote), ``"corrupt"``
    (truncated or damaged), ``"torchscript"`` (TorchScript where a state_dict was expected), ``"pickle"`` (pickled
    Python objects where tensors only were expected), ``"untrusted"`` (a pickled model loaded without trust),
    ``"state_dict"`` (a state_dict where a whole model was expected), ``"unimportable"`` (a pickled model whose
    classes cannot be imported), ``"not-module"``, ``"not-state-dict"``.
    """

    def __init__(self, message: str = "", *, reason: str | None = None):
        self.reason = reason
        super().__init__(message)

    def __reduce__(self):
        return functools.partial(type(self), reason=self.reason), tuple(self.args)


class UntraceableWarning(UserWarning):
    """torch-pruning cannot map part of a model (e.g. a channel shuffle): the layers coupled to it are left out of
    the pruning space, and the rest is pruned. Filter it with ``warnings.filterwarnings``."""
