"""Search checkpoints: one file, written atomically after every generation, loaded without unpickling code.

A checkpoint holds only tensors and plain Python values (``torch.load(weights_only=True)`` reads it): the population
and fitnesses, Pareto fronts, the logbook, finished rounds (plans and weights), and the RNG states of ``random``,
numpy and torch. It records the evoprune version, the search settings and the fingerprint of the model's pruning
space, so resuming with another version, model or settings is refused with a clear message.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..errors import CheckpointError
from ..storage import torch_save

FILENAME = "checkpoint.pt"
FORMAT = 1


def rng_state() -> dict:
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def save(directory: str | Path, state: dict) -> Path:
    path = Path(directory) / FILENAME
    torch_save({"format": FORMAT, "evoprune_version": __version__, **state}, path)
    return path


def load(directory: str | Path, *, fingerprint: str, settings: dict) -> dict | None:
    """The checkpoint in ``directory``, or None if there is none. Refuses one that is unreadable, from another
    evoprune version, for another model (space fingerprint) or made with other search settings."""
    path = Path(directory) / FILENAME
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is unreadable or truncated ({type(exc).__name__}); delete it to start over "
                              "(CLI: --no-resume)", reason="corrupt") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an evoprune checkpoint (format {FORMAT}); delete it to start over "
                              "(CLI: --no-resume)", reason="corrupt")
    if state.get("evoprune_version") != __version__:
        raise CheckpointError(f"{path} was written by evoprune {state.get('evoprune_version')}, this is "
                              f"{__version__}; resume with that version or delete the checkpoint (CLI: --no-resume)")
    if state.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{path} belongs to another model or input shape (space fingerprint "
                              f"{state.get('fingerprint')}, this one is {fingerprint}); use another checkpoint dir")
    theirs = state.get("settings", {})
    diff = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
    if diff:
        raise CheckpointError(f"{path} was made with other search settings ({', '.join(diff)} differ: "
                              f"{ {k: theirs.get(k) for k in diff} } vs { {k: settings.get(k) for k in diff} }); "
                              "use the same settings to resume, or another checkpoint dir (CLI: --no-resume starts "
                              "over, or a new --out)")
    return state


def restore_population(saved, individual_cls):
    """Individuals (of ``individual_cls``) with their fitnesses, from :func:`pack`."""
    pop = []
    for genes, values in saved:
        ind = individual_cls(int(g) for g in genes)
        ind.fitness.values = tuple(values)
        pop.append(ind)
    return pop


def pack(individuals):
    """Genes as uint8 tensors and fitness values: a population as a checkpoint holds it."""
    if individuals is None:
        return None
    return [(torch.tensor(list(ind), dtype=torch.uint8), list(ind.fitness.values)) for ind in individuals]


def save_search(directory, space0, settings, result, k, gen, pop, front, current, original):
    """The search state after round ``k``, generation ``gen`` (None: the round is finished), into ``directory``."""
    if not directory:
        return
    save(directory, {
        "fingerprint": space0.fingerprint, "settings": settings, "round": k, "generation": gen,
        "population": pack(pop), "front": pack(front),
        "rows": result.rows, "plans": result.plans, "widths": result.widths, "evaluated": result.evaluated,
        "pareto": result.pareto, "logbook": list(result.logbook),
        "weights": None if current is original else current.state_dict(),
        "rng": rng_state(),
    })
