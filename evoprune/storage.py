"""Atomic file writes and safe loading.

Every file evoprune writes goes to a temporary file in the same directory, is fsynced, then renamed over the final
name, so a crash never leaves a truncated file behind. The file gets the permissions a plain ``open(path, "w")``
would give it: those of the file it replaces, or ``0o666`` less the umask for a new one. Loading never unpickles
arbitrary objects unless the caller says the file is trusted, and a file that is not what was expected (not a
PyTorch file, truncated, a TorchScript module, a pickled model...) is named as such in the error.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import CheckpointError, ConfigError

#: Kinds of file :func:`sniff` tells apart.
FILE_KINDS = ("missing", "empty", "not-torch", "corrupt", "torchscript", "exported", "torch")


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else set and restored at once."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _target_mode(path: Path) -> int:
    """The permission bits a normal write of ``path`` ends up with: the existing file's, or 0o666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary file beside ``path``; on success fsync and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. The file ends up with the
    permission bits of the file it replaces, or ``0o666`` less the umask when it is new (as ``open(path, "w")``
    gives); ownership is the writer's.
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
        os.chmod(tmp, _target_mode(path))  # mkstemp makes it 0o600
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


def check_out_dir(out: str | os.PathLike, flag: str = "--out") -> Path:
    """Check that ``out`` is, or can become, a directory this process can write to, before any work: a
    :class:`ConfigError` naming ``flag`` if it is a file, or if its nearest existing folder cannot be written (a
    read-only file system, no permission). The probe file is removed again, and nothing is created."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {out} is a file, not a directory; give a directory (it is created if missing)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {out}: {existing} is a file, so the directory cannot be made; give another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".evoprune-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{flag} {out}: cannot write in {existing} ({exc.strerror or exc}); give a directory you "
                          "can write to") from None
    return path


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


def sniff(path: str | os.PathLike) -> str:
    """What kind of file ``path`` is, from its first bytes and (for zip archives) its table of contents, without
    unpickling anything: one of :data:`FILE_KINDS`. ``"torch"`` is a ``torch.save`` file (zip or legacy pickle);
    ``"corrupt"`` a zip archive whose directory cannot be read (typically cut off by an interrupted copy)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        return "empty"
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return "corrupt"
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("/archive_format") for n in names) and any(n.endswith("models/model.json") for n in names):
            return "exported"  # torch.export.save: an ExportedProgram (.pt2)
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        return "not-torch"
    if head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle (protocol 2-5): torch.save's legacy format
        return "torch"
    return "not-torch"


def _first_bytes(path: Path, n: int = 16) -> str:
    with open(path, "rb") as fh:
        return repr(fh.read(n))


def _check_readable(path: Path, expected: str) -> str:
    """:func:`sniff` ``path``; raise :class:`CheckpointError` (with its ``reason``) if it is missing, empty, not a
    PyTorch file or cut off. ``expected`` says what the caller wanted, for the message. Returns the kind."""
    kind = sniff(path)
    if kind == "missing":
        raise CheckpointError(f"{path}: no such file", reason="missing")
    if kind == "empty":
        raise CheckpointError(f"{path}: is empty (0 bytes), not {expected}; write or copy it again", reason="empty")
    if kind == "not-torch":
        raise CheckpointError(f"{path}: is not a PyTorch file (it starts with {_first_bytes(path)}); expected "
                              f"{expected}", reason="not-torch")
    if kind == "corrupt":
        raise CheckpointError(f"{path}: is truncated or corrupt (its zip directory cannot be read; was the copy or "
                              "download cut off?); write or copy it again", reason="corrupt")
    return kind


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    detail = str(exc).splitlines()[0] if str(exc).strip() else "unexpected end of data"
    return CheckpointError(f"{path}: is truncated or corrupt ({type(exc).__name__}: {detail}); write or copy it "
                           "again", reason="corrupt")


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def load_state_dict(path: str | os.PathLike) -> dict:
    """Load tensors only (``weights_only=True``): a pickle that carries code is refused.

    Raises :class:`CheckpointError` whose ``reason`` says what the file is instead: missing, empty, not-torch
    (not a PyTorch file), corrupt (truncated), torchscript, pickle (Python objects besides tensors, e.g. a whole
    model saved with ``torch.save(model)``) or not-state-dict.
    """
    path = Path(path)
    expected = "a state_dict saved with torch.save(model.state_dict(), path)"
    kind = _check_readable(path, expected)
    if kind == "torchscript":
        raise CheckpointError(f"{path}: is a TorchScript module, not a state_dict; load it with "
                              "load_module(path), or save model.state_dict() where it was made", reason="torchscript")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # the weights-only unpickler met a class it will not run
        raise CheckpointError(
            f"{path}: cannot be loaded as tensors only: it holds pickled Python objects (a whole model saved with "
            f"torch.save(model)?), and unpickling them could run code ({str(exc).splitlines()[0][:120]}...). Save "
            "model.state_dict() instead, or load a whole model you trust with load_module(path, trust=True).",
            reason="pickle") from None
    except Exception as exc:  # torch raises RuntimeError, OSError, EOFError... for cut-off files
        raise _corrupt(path, exc) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state_dict (a dict of tensors), found {type(obj).__name__}",
                              reason="not-state-dict")
    return obj


class ExportedModule(torch.nn.Module):
    """An ``ExportedProgram`` (``torch.export.load``) as an inference-only ``nn.Module``. The program was exported
    in eval mode; ``eval()`` and ``train()`` only set the flag (the exported graph itself refuses them)."""

    def __init__(self, program):
        super().__init__()
        self.program = program
        object.__setattr__(self, "_graph", program.module())  # not a submodule: module.eval() would raise

    def forward(self, *args):
        return self._graph(*args)

    def train(self, mode: bool = True):
        self.training = mode
        return self


def load_module(path: str | os.PathLike, *, trust: bool = False) -> torch.nn.Module:
    """Load a whole pickled ``nn.Module`` (``torch.save(model)``), an ExportedProgram (``.pt2``, as
    :class:`ExportedModule`) or a TorchScript file.

    ExportedPrograms and TorchScript files carry no pickle of arbitrary classes and load without ``trust``. A
    pickled module can run arbitrary code when loaded, so it needs ``trust=True``. Raises :class:`CheckpointError`
    whose ``reason`` says what the file is instead: missing, empty, not-torch, corrupt, state_dict (weights only:
    load them into the model with :func:`evoprune.models.load_weights`), untrusted, or not-module.
    """
    path = Path(path)
    kind = _check_readable(path, "an ExportedProgram (torch.export.save, .pt2), a TorchScript file (torch.jit.save) "
                                 "or a whole model saved with torch.save(model)")
    if kind == "exported":
        try:
            return ExportedModule(torch.export.load(str(path)))
        except Exception as exc:
            raise _corrupt(path, exc) from None
    if kind == "torchscript":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch >= 2.9 marks torch.jit deprecated; TorchScript still loads
                return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise _corrupt(path, exc) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:  # only the weights-only unpickler refuses classes
        if trust:
            raise _corrupt(path, exc) from None
        raise CheckpointError(
            f"{path}: is a pickled Python object, and unpickling can run arbitrary code. Load it only if you "
            "trust its source: pass trust=True (CLI: --trust-pickle). For deployment prefer the TorchScript or "
            "ONNX export.", reason="untrusted") from None
    except (AttributeError, ImportError) as exc:  # the pickle names a class this Python cannot import
        if not trust:
            raise _corrupt(path, exc) from None
        raise CheckpointError(
            f"{path}: the pickled model needs a class that cannot be imported here ({type(exc).__name__}: {exc}); "
            "run where the model's code is importable (e.g. add its folder to PYTHONPATH), or export it as "
            "TorchScript where it was made", reason="unimportable") from None
    except Exception as exc:
        raise _corrupt(path, exc) from None
    if _is_tensor_dict(obj) or (isinstance(obj, dict) and _is_tensor_dict(obj.get("state_dict"))):
        raise CheckpointError(
            f"{path}: holds a state_dict (weights only), not a whole model; load it into the model it was saved "
            "from with evoprune.models.load_weights(model, path)", reason="state_dict")
    if not isinstance(obj, torch.nn.Module):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not an nn.Module", reason="not-module")
    return obj
