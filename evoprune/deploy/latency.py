"""A latency table: the predicted end-to-end latency of any plan of a pruning space on a deployment runtime.

:meth:`LatencyTable.measure` times every conv/linear call of the space's model on its own, in its real context
(the same kernel, stride, padding, groups and input size as in the model, at the latency batch), at a grid of
input/output widths (multiples of the channel block CPU kernels step at, :func:`kernel_step`, plus the full
width). A plan's latency is the sum of its live layers' times, interpolated at the widths the plan leaves, mapped
to end-to-end milliseconds by a monotone piecewise-linear curve through a few physically pruned models (full,
uniform 75/50/30 %, and every connection unit cut, all measured end to end with :func:`measure`): the curve absorbs
what the layers alone miss (pooling, residual adds, per-op overheads, fusion, cache effects). Tables are cached on
disk, keyed by runtime and version, threads, batch, CPU model and the space's fingerprint; a cache measured
elsewhere is not used, and the warning says why.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import ConfigError, ModelError
from ..space.plan import PruningPlan
from ..space.pruning_space import PruningSpace
from ..storage import write_json
from .layer_timing import layer_spec, spec_key, time_layer
from .runtime import (RUNTIMES, LatencyWarning, Timing, check_batch, check_runtime, check_threads, cpu_model,
                      kernel_step, measure, time_call, torch_threads)

FORMAT = 2  # bump when the table's contents or meaning change: older caches are then re-measured
_MULTIPLES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def width_grid(size: int, varies: bool, step: int) -> list[int]:
    """The widths a layer is timed at: multiples of ``step`` below ``size`` (denser where small), and ``size``."""
    if not varies:
        return [size]
    return sorted({step * m for m in _MULTIPLES if step * m < size} | {size})


def _snap(width: int, divisor: int) -> int:
    return max(divisor, (width // divisor) * divisor)


# ---------------------------------------------------------------------------------------------------- the table
@dataclass
class _Layer:
    call: int  # index into the space's cost-model calls
    module: str
    in_row: int
    out_row: int
    grid_in: list[int]
    grid_out: list[int]
    ms: list[list[float]]  # ms[i][j]: time at grid_in[i] -> grid_out[j]

    @functools.cached_property
    def _arrays(self):  # the grids as arrays, made once (predict runs inside every repair step)
        return np.asarray(self.grid_in, float), np.asarray(self.grid_out, float), np.asarray(self.ms, float)

    def predict(self, cin: int, cout: int) -> float:
        gin, gout, ms = self._arrays
        row = [np.interp(cout, gout, r) for r in ms]
        return float(np.interp(cin, gin, row))


class LatencyTable:
    """Predicted end-to-end latency (ms) of any plan of one pruning space on one runtime. Build it with
    :meth:`measure` (which loads a cached one when it can); ``predict(plan)`` and ``predict_genes(individual)`` answer
    without running a model."""

    def __init__(self, space: PruningSpace, layers: list[_Layer], fit: list[list[float]], key: dict,
                 calibration: list[dict], build_s: float = 0.0):
        self.space = space
        self.layers = layers
        self.fit = [list(map(float, fit[0])), list(map(float, fit[1]))]
        self.key = dict(key)
        self.calibration = calibration
        self.build_s = build_s

    # --------------------------------------------------------------- facts
    @property
    def runtime(self) -> str:
        return self.key["runtime"]

    @property
    def batch(self) -> int:
        return self.key["batch"]

    @property
    def threads(self) -> int:
        return self.key["threads"]

    @property
    def step(self) -> int:
        """The channel multiple the table was measured at (:func:`kernel_step`); plans should keep multiples of it
        (``PruningSpace.from_model(..., round_to=table.step)``), the widths the runtime runs fastest."""
        return self.key["step"]

    @property
    def base_ms(self) -> float:
        """The measured end-to-end latency of the unpruned model."""
        return float(self.calibration[0]["measured_ms"])

    def __repr__(self):
        return (f"LatencyTable({self.space.model_name} on {self.runtime} {self.key['version']}, batch {self.batch}, "
                f"{self.threads} thread(s): {len(self.layers)} layers, base {self.base_ms:.3f} ms)")

    # --------------------------------------------------------------- prediction
    def _layer_sum(self, counts: Sequence[int], active: Sequence[bool]) -> float:
        removed, cut = self.space.removed_and_cut(counts, active)
        cost = self.space.cost_model
        d, alive = cost.dims(removed), cost.alive_calls(cut)
        return sum(layer.predict(int(d[layer.in_row]), int(d[layer.out_row]))
                   for layer in self.layers if alive[layer.call])

    def predict_counts(self, counts: Sequence[int], active: Sequence[bool]) -> float:
        """Predicted ms for kept channel ``counts`` per group and ``active`` flags per connection unit."""
        xs, ys = self.fit
        x = self._layer_sum(counts, active)
        if x <= xs[-1] or len(xs) < 2:
            return float(np.interp(x, xs, ys))
        return float(ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))

    def predict_genes(self, individual: Sequence[int]) -> float:
        """Predicted ms of an individual of this table's space."""
        layout = self.space.layout
        self.space.check_genes(individual)
        return self.predict_counts(layout.kept_counts(individual), layout.active_connections(individual))

    def predict(self, plan: PruningPlan) -> float:
        """Predicted ms of the model ``plan`` prunes (raises :class:`PlanError` for a plan of another space)."""
        self.space.validate(plan)
        counts = [len(plan.groups.get(g.name, range(g.size))) for g in self.space.groups]
        return self.predict_counts(counts, [plan.connections.get(u.name, True) for u in self.space.units])

    def min_ms(self) -> float:
        """The prediction for the smallest legal plan (every group at ``min_keep``, or ``round_to`` when the space
        has one, and every unit cut)."""
        least = max(self.space.min_keep, self.space.round_to or 1)
        counts = [min(least, g.size) for g in self.space.groups]
        return self.predict_counts(counts, [False] * len(self.space.units))

    def check_space(self, space: PruningSpace) -> None:
        """Raise :class:`ConfigError` unless this table was measured for ``space`` (same fingerprint)."""
        if self.space.fingerprint != space.fingerprint:
            raise ConfigError("the latency table was measured for another pruning space; measure it for this one")

    def check_budget(self, budget_ms: float, *, setting: str = "target_latency_ms") -> None:
        """Raise :class:`ConfigError` if no legal plan can reach ``budget_ms``, giving the minimum."""
        low = self.min_ms()
        if not budget_ms >= low:
            raise ConfigError(f"{budget_ms:.4g} ms is below what the smallest legal plan reaches on {self.runtime} "
                              f"at batch {self.batch} ({low:.4g} ms predicted; the unpruned model measures "
                              f"{self.base_ms:.4g} ms): ask for at least {low:.4g} ms", setting=setting)

    # --------------------------------------------------------------- build
    @classmethod
    def measure(cls, model: nn.Module, space: PruningSpace, example_inputs: torch.Tensor, *,
                runtime: str = "onnxruntime", batch: int = 1, threads: int = 1, repeats: int = 10,
                step: int | None = None,
                cache_dir: str | os.PathLike | None = None, cache: bool = True) -> "LatencyTable":
        """Time ``model``'s conv/linear layers at a grid of widths (multiples of ``step``, default
        :func:`kernel_step`) and fit the end-to-end curve (see the module docstring). With ``cache`` (default) a table
        cached in ``cache_dir`` (default ``$EVOPRUNE_CACHE`` or ``~/.cache/evoprune``) for this runtime, version,
        threads, batch, CPU and space is loaded instead, and a new one is saved there."""
        version = check_runtime(runtime)
        check_batch(batch)
        check_threads(threads)
        if not isinstance(space, PruningSpace):
            raise ConfigError(f"space must be a PruningSpace, got {type(space).__name__}")
        step = kernel_step() if step is None else step
        key = {"format": FORMAT, "runtime": runtime, "version": version, "threads": threads, "batch": batch,
               "cpu": cpu_model(), "space": space.fingerprint, "step": step}
        path = cache_path(key, cache_dir) if cache else None
        if path is not None and path.exists():
            table = cls._load(path, space, key)
            if table is not None:
                return table
        t0 = time.perf_counter()
        shapes = _ShapeCache(key, cache_dir, persist=cache)
        cost = space.cost_model
        layers = []
        with torch_threads(threads):
            for i, call in enumerate(cost.calls):
                spec = layer_spec(model, call, cost.base, batch)
                if spec is None:
                    continue
                in_row = call.in_dims[1 if call.kind == "conv" else -1]
                out_row = call.out_dims[1 if call.kind == "conv" else -1]
                divisor = 1 if spec["kind"] == "linear" or spec["depthwise"] else spec["groups"]
                gin = width_grid(int(cost.base[in_row]), bool(cost.coeff[in_row].any()), step)
                gout = width_grid(int(cost.base[out_row]), bool(cost.coeff[out_row].any()), step)
                gin = sorted({_snap(w, divisor) for w in gin})
                gout = sorted({_snap(w, divisor) for w in gout})
                if spec["kind"] == "conv" and spec["depthwise"]:  # in == out: time the diagonal only
                    diag = [shapes.get(spec, w, w, runtime, threads, repeats) for w in gin]
                    ms = [[diag[a] for _ in gout] for a in range(len(gin))]
                else:
                    ms = [[shapes.get(spec, a, o, runtime, threads, repeats) for o in gout] for a in gin]
                layers.append(_Layer(i, call.module, in_row, out_row, gin, gout, ms))
        shapes.save()
        if not layers:
            raise ModelError(f"{space.model_name} has no conv or linear layer to time")
        table = cls(space, layers, [[0.0, 1.0], [0.0, 1.0]], key, [])
        table.calibration = _calibrate(table, model, example_inputs, runtime, batch, threads)
        table.fit = _fit_line(table.calibration)
        table.build_s = time.perf_counter() - t0
        if path is not None:
            table.save(path)
        return table

    # --------------------------------------------------------------- cache
    def to_dict(self) -> dict:
        return {"key": self.key, "fit": list(self.fit), "calibration": self.calibration, "build_s": self.build_s,
                "layers": [dataclasses.asdict(layer) for layer in self.layers]}

    def save(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, self.to_dict())

    @classmethod
    def _from_dict(cls, data: dict, space: PruningSpace) -> "LatencyTable":
        layers = [_Layer(**layer) for layer in data["layers"]]
        return cls(space, layers, data["fit"], data["key"], data["calibration"], data.get("build_s", 0.0))

    @classmethod
    def _load(cls, path: Path, space: PruningSpace, key: dict) -> "LatencyTable | None":
        try:
            data = json.loads(path.read_text())
            stored = data["key"]
            table = cls._from_dict(data, space)
            for layer in table.layers:
                if not (len(layer.ms) == len(layer.grid_in) and all(len(r) == len(layer.grid_out) for r in layer.ms)
                        and all(math.isfinite(v) and v >= 0 for r in layer.ms for v in r)):
                    raise ValueError("layer timings do not match their grid")
        except Exception as exc:
            warnings.warn(f"latency cache {path} is unreadable ({type(exc).__name__}: {exc}); re-measuring",
                          LatencyWarning, stacklevel=3)
            return None
        differs = [f"{k} {stored.get(k)!r} (here {v!r})" for k, v in key.items() if stored.get(k) != v]
        if differs:
            warnings.warn(f"latency cache {path} is not used: it was measured with " + ", ".join(differs)
                          + "; re-measuring", LatencyWarning, stacklevel=3)
            return None
        return table


def cache_dir_default() -> Path:
    return Path(os.environ.get("EVOPRUNE_CACHE") or Path.home() / ".cache" / "evoprune")


def cache_path(key: dict, cache_dir=None) -> Path:
    """Where the table for ``key`` lives: one file per space, runtime, batch and threads (the machine and runtime
    version are checked inside, so a stale file is named, not silently used)."""
    tag = hashlib.sha256(json.dumps([key["space"], key["runtime"], key["batch"], key["threads"]]).encode())
    return Path(cache_dir or cache_dir_default()) / "latency" / f"{key['runtime']}-{tag.hexdigest()[:16]}.json"


class _ShapeCache:
    """Per-layer timings by exact shape for one machine/runtime/threads/batch, shared by every space measured there
    (a later round's smaller model re-uses most of them)."""

    def __init__(self, key: dict, cache_dir, persist: bool):
        machine = {k: key[k] for k in ("format", "runtime", "version", "threads", "batch", "cpu")}
        self.path = None
        self.data: dict[str, float] = {}
        if persist:
            tag = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:16]
            self.path = Path(cache_dir or cache_dir_default()) / "latency" / f"layers-{tag}.json"
            with contextlib.suppress(Exception):
                data = json.loads(self.path.read_text())
                if data.get("machine") == machine:
                    self.data = {k: float(v) for k, v in data["ms"].items() if math.isfinite(float(v))}
        self.machine = machine
        self.dirty = False

    def get(self, spec, cin, cout, runtime, threads, repeats) -> float:
        k = spec_key(spec, cin, cout)
        if k not in self.data:
            self.data[k] = time_layer(spec, cin, cout, runtime, threads, repeats)
            self.dirty = True
        return self.data[k]

    def save(self):
        if self.path is not None and self.dirty:
            with contextlib.suppress(OSError):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_json(self.path, {"machine": self.machine, "ms": self.data})


# ---------------------------------------------------------------------------------------------------- calibration
def calibration_plans(space: PruningSpace, step: int = 1) -> list[tuple[str, list[int], list[bool]]]:
    """(name, kept counts, active units) of the plans the end-to-end line is fitted on; widths are multiples of
    ``step`` where the group allows."""
    full = [g.size for g in space.groups]
    units = [True] * len(space.units)
    plans = [("full", full, units)]
    for keep in (0.75, 0.5, 0.3):
        counts = [s if s % step else max(step, step * round(keep * s / step)) for s in full]
        plans.append((f"uniform {keep:.0%}", [max(space.min_keep, c) for c in counts], units))
    if space.units:
        plans.append(("every unit cut", full, [False] * len(space.units)))
    return plans


def _plan_from_counts(space: PruningSpace, counts, active) -> PruningPlan:
    return PruningPlan({g.name: tuple(range(c)) for g, c in zip(space.groups, counts)},
                       {u.name: bool(a) for u, a in zip(space.units, active)}, fingerprint=space.fingerprint)


def _calibrate(table: LatencyTable, model, example_inputs, runtime, batch, threads) -> list[dict]:
    from ..prune.surgery import apply_plan
    rows = []
    space = table.space
    for name, counts, active in calibration_plans(space, table.step):
        plan = _plan_from_counts(space, counts, active)
        net = model if name == "full" else apply_plan(model, plan, example_inputs, space=space)
        timing = measure(net, example_inputs, runtime=runtime, batch=batch, threads=threads)
        rows.append({"plan": name, "layers_ms": table._layer_sum(counts, active), "measured_ms": timing.median_ms,
                     "spread": timing.spread})
    return rows


def _fit_line(rows: list[dict]) -> list[list[float]]:
    """The map from summed layer times to end-to-end ms: a monotone piecewise-linear curve through the
    calibration points and the origin, extended past the largest point along its last segment."""
    pts = sorted((float(r["layers_ms"]), float(r["measured_ms"])) for r in rows)
    xs, ys = [0.0], [0.0]
    for x, y in pts:
        if x > xs[-1]:
            xs.append(x)
            ys.append(max(y, ys[-1]))  # never predict a smaller model as slower than a larger one
    return [xs, ys]


__all__ = ["LatencyTable", "calibration_plans", "width_grid", "cache_path",
           # re-exported from evoprune.deploy.runtime: evoprune.deploy.latency is the one import a user needs
           "LatencyWarning", "Timing", "measure", "time_call", "check_runtime", "cpu_model", "kernel_step", "RUNTIMES"]
