"""The evoprune exception hierarchy.

Every public entry point validates its inputs before doing any work and raises one of these. Each message says what
was wrong and what to do about it.
"""


class EvoPruneError(Exception):
    """Base class of every error evoprune raises on purpose."""


class PlanError(EvoPruneError, ValueError):
    """A pruning plan or individual does not fit its pruning space (length, group, index, min_keep, connection)."""


class ConfigError(EvoPruneError, ValueError):
    """A search or operator parameter is out of range (p_c, p_mut, population, elites, rounds, target...)."""


class DataError(EvoPruneError):
    """Data are missing, empty, unreadable or do not match the expected layout."""


class ModelError(EvoPruneError):
    """A model cannot be traced, pruned or evaluated (nothing prunable, wrong input shape, NaN weights...)."""


class CheckpointError(EvoPruneError):
    """A checkpoint or saved file is truncated, from another version, for another model, or untrusted."""
