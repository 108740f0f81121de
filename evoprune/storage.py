"""Atomic file writes and safe loading.

Every file evoprune writes goes to a temporary file in the same directory, is fsynced, then renamed over the final
name, so a crash never leaves a truncated file behind. Loading never unpickles arbitrary objects unless the caller
says the file is trusted.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import CheckpointError


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary file beside ``path``; on success fsync and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports modes 'w' and 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def load_state_dict(path: str | os.PathLike) -> dict:
    """Load tensors only (``weights_only=True``): a pickle that carries code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(
            f"{path}: cannot be loaded as tensors only ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "If it is a whole pickled model you trust, load it with trust=True (CLI: --trust-pickle)."
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors), found {type(obj).__name__}")
    return obj


def load_module(path: str | os.PathLike, *, trust: bool = False) -> torch.nn.Module:
    """Load a whole pickled ``nn.Module`` (``torch.save(model)``) or a TorchScript file.

    TorchScript files carry no Python pickle of arbitrary classes and load without ``trust``. A pickled module can run
    arbitrary code when loaded, so it needs ``trust=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch >= 2.9 marks torch.jit deprecated; TorchScript files still load
            return torch.jit.load(str(path), map_location="cpu")
    except Exception:
        pass
    if not trust:
        raise CheckpointError(
            f"{path}: is a pickled Python object, and unpickling can run arbitrary code. Load it only if you trust "
            "its source: pass trust=True (CLI: --trust-pickle). For deployment prefer the TorchScript or ONNX export."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be loaded ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, torch.nn.Module):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not an nn.Module")
    return obj
