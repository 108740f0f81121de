"""Deployment runtimes and their clocks: which runtime is installed, how to run a model on it, and how to time a call.

ONNX Runtime on the CPU (``pip install 'evoprune[onnx]'``) is the default deployment runtime; eager torch is the
other. :func:`measure` times a whole model end to end (warm-up, repeated samples, the median): the ground truth
that :class:`evoprune.deploy.latency.LatencyTable` predicts and is checked against.
"""
from __future__ import annotations

import contextlib
import importlib.util
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from ..errors import ConfigError, ModelError
from ..validators import check_int

RUNTIMES = ("onnxruntime", "torch")


class LatencyWarning(UserWarning):
    """Timings were unstable (a loaded machine?) even after more repeats, or a latency cache was not used."""


# ---------------------------------------------------------------------------------------------------- runtimes
def check_runtime(runtime: str) -> str:
    """Raise :class:`ConfigError` unless ``runtime`` is known and installed; return its version."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"must be one of {', '.join(RUNTIMES)}, got {runtime!r}", setting="runtime")
    if runtime == "torch":
        return torch.__version__
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"'onnxruntime' needs {' and '.join(missing)}: pip install 'evoprune[onnx]' "
                          "(or measure on runtime='torch')", setting="runtime")
    import onnxruntime
    return onnxruntime.__version__


def check_threads(threads) -> int:
    """``threads`` if it is an int >= 1 (else a :class:`ConfigError` naming the ``threads`` setting)."""
    return check_int("threads", threads)


def check_batch(batch) -> int:
    """``batch`` if it is an int >= 1 (else a :class:`ConfigError` naming the ``batch`` setting)."""
    return check_int("batch", batch)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), part of every cache key."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _ort_session(model: bytes, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with ``torch.set_num_threads(threads)``, restoring the old count after."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def runner(runtime: str, module: nn.Module | None, x: torch.Tensor, threads: int, onnx: bytes | None = None):
    """A no-argument callable that runs one inference of ``module`` (or the ONNX bytes) on ``x``."""
    if runtime == "onnxruntime":
        if onnx is None:
            from .exporter import onnx_bytes
            onnx = onnx_bytes(module, x)
        sess = _ort_session(onnx, threads)
        feed = {sess.get_inputs()[0].name: x.numpy()}
        return lambda: sess.run(None, feed)
    module = module.eval()

    def run():
        with torch.inference_mode():
            module(x)
    return run


# ---------------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """One measurement: the median over ``repeats`` samples, in milliseconds, and its relative spread
    (interquartile range over median)."""

    median_ms: float
    spread: float
    repeats: int


def time_call(run: Callable[[], object], *, warmup: int = 3, repeats: int = 15, max_repeats: int = 120,
              max_spread: float = 0.15, sample_ms: float = 2.0, warmup_s: float = 0.1,
              what: str = "a call") -> Timing:
    """Median time of ``run()`` in ms, after ``warmup`` calls and at least ``warmup_s`` seconds of them. Each sample
    times enough back-to-back calls to last ``sample_ms``; when the
    samples' spread (IQR / median) exceeds ``max_spread`` the repeats double, up to ``max_repeats``, and a
    :class:`LatencyWarning` says if it is still unstable."""
    t0 = time.perf_counter()
    n = 0
    while n < max(1, warmup) or time.perf_counter() - t0 < warmup_s:  # caches, thread pools, lazy allocations
        run()
        n += 1
    t0 = time.perf_counter()
    run()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(1000, int(sample_ms / 1e3 / once)))
    samples: list[float] = []
    want = repeats
    while True:
        while len(samples) < want:
            t0 = time.perf_counter()
            for _ in range(inner):
                run()
            samples.append((time.perf_counter() - t0) * 1e3 / inner)
        q1, med, q3 = np.percentile(samples, [25, 50, 75])
        spread = float((q3 - q1) / med) if med > 0 else 0.0
        if spread <= max_spread or want >= max_repeats:
            break
        want = min(max_repeats, want * 2)
    if spread > max_spread:
        warnings.warn(f"unstable timings for {what}: spread {spread:.0%} of the median after {len(samples)} "
                      "repeats (is the machine loaded?); the median is used", LatencyWarning, stacklevel=3)
    return Timing(float(med), spread, len(samples))


def _batched(example_inputs: torch.Tensor, batch: int) -> torch.Tensor:
    x = example_inputs[:1].detach().cpu().float()
    return x.expand(batch, *x.shape[1:]).contiguous()


def measure(model: nn.Module, example_inputs: torch.Tensor, *, runtime: str = "onnxruntime", batch: int = 1,
            threads: int = 1, warmup: int = 5, repeats: int = 20) -> Timing:
    """End-to-end latency of ``model`` on ``runtime`` at ``batch`` (inputs shaped like ``example_inputs``), with
    ``threads`` intra-op threads. ONNX Runtime gets the model as :func:`evoprune.deploy.exporter` writes it."""
    check_runtime(runtime)
    check_batch(batch)
    check_threads(threads)
    if not isinstance(model, nn.Module):
        raise ModelError(f"measure expects an nn.Module, got {type(model).__name__}")
    x = _batched(example_inputs, batch)
    was_training = model.training
    model.eval()
    try:
        with torch_threads(threads):
            try:
                run = runner(runtime, model, x, threads)
                run()
            except Exception as exc:
                raise ModelError(f"{type(model).__name__} cannot run on {runtime} with inputs of shape "
                                 f"{tuple(x.shape)}: {type(exc).__name__}: {exc}") from None
            return time_call(run, warmup=warmup, repeats=repeats, what=f"{type(model).__name__} on {runtime}")
    finally:
        model.train(was_training)


def kernel_step() -> int:
    """The channel block CPU kernels step at here: 16 with AVX-512, else 8 (ONNX Runtime's NCHWc and oneDNN
    layouts). Widths that are not multiples of it run on slower paths and force layout reorders between layers."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return 16 if "avx512f" in line.split() else 8
    return 8
