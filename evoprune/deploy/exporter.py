"""Export a (pruned) model for deployment: ``torch.export`` (an ExportedProgram, ``.pt2``), ONNX, the full-module
``.pt`` (a pickle, for Python), TorchScript on request (deprecated in torch >= 2.9), and a JSON model card.

Every file is written atomically, and every format is reloaded and checked against the in-memory model before
``export`` returns. The ``.pt2`` file loads with ``torch.export.load(path).module()`` and the ``.onnx`` file with
ONNX Runtime, neither needing evoprune nor the model's Python classes; both take any batch size.
"""
from __future__ import annotations

import datetime as _dt
import importlib.util
import io
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from .._version import __version__
from ..errors import ConfigError, ModelError
from ..netinfo import layer_widths, model_bytes
from ..space.plan import PruningPlan
from ..storage import atomic_write, torch_save, write_json

FORMATS = ("pt", "pt2", "onnx", "torchscript")
#: What :func:`export` writes by default: the deployment formats (``.pt2``, ONNX) and the Python ``.pt``.
DEFAULT_FORMATS = ("pt", "pt2", "onnx")


def model_card(model: nn.Module, example_inputs: torch.Tensor, *, plan: PruningPlan | None = None,
               widths: dict | None = None, extra: dict | None = None) -> dict:
    """Facts about a model: input/output shapes, per-layer widths, MACs, params, bytes, the plan and versions."""
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    with torch.no_grad():
        out = model.eval()(example_inputs)
    card = {
        "evoprune_version": __version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": type(model).__name__,
        "input_shape": list(example_inputs.shape),
        "output_shape": list(out.shape),
        "macs": macs,
        "params": params,
        "bytes": model_bytes(model),
        "group_widths": widths or {},
        "layer_widths": layer_widths(model),
        "plan": plan.to_dict() if plan is not None else None,
    }
    card.update(extra or {})
    return card


def export(model: nn.Module, path: str | os.PathLike, example_inputs: torch.Tensor,
           formats=DEFAULT_FORMATS, *, plan: PruningPlan | None = None, widths: dict | None = None,
           extra: dict | None = None, atol: float = 1e-4, optional=()) -> dict[str, str]:
    """Write ``model`` in ``formats`` and a model card; return ``{format: path}``.

    ``<stem>.pt`` (the whole module, pickled: loading it needs the model's classes and trust), ``<stem>.pt2``
    (``torch.export``; dynamic batch), ``<stem>.onnx`` (when the ``onnx`` extra is installed; dynamic batch) and,
    on request, ``<stem>.torchscript.pt`` (``torch.jit``, deprecated in torch >= 2.9), plus ``<stem>.json`` (the
    model card, which lists the files written and why any was not). ``path`` is the ``.pt`` path or the stem.
    A format in ``optional`` that cannot be written is skipped with a warning (the card says why) instead of
    raising :class:`ModelError`.
    """
    formats = tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ConfigError(f"unknown export format(s) {unknown or formats}; choose from {', '.join(FORMATS)}")
    if not isinstance(example_inputs, torch.Tensor):
        raise ModelError("example_inputs must be a tensor batch, e.g. torch.randn(1, 3, 32, 32)")
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError("export takes an nn.Module; this is already TorchScript (deploy it as is, or export the "
                         "full-module .pt it came from)")
    was_training = model.training
    try:
        return _export(model.eval(), Path(path), example_inputs, formats, plan, widths, extra, atol, tuple(optional))
    finally:
        model.train(was_training)


def _export(model, path, example_inputs, formats, plan, widths, extra, atol, optional):
    try:
        with torch.no_grad():
            reference = model(example_inputs)
    except Exception as exc:
        raise ModelError(f"the model cannot run on inputs of shape {tuple(example_inputs.shape)}: {exc}") from None
    stem = path.with_suffix("") if path.suffix == ".pt" else path
    written = {}
    if "pt" in formats:
        written["pt"] = str(stem.with_name(stem.name + ".pt"))
        torch_save(model, written["pt"])
    skipped = {}
    if "pt2" in formats:
        program, why = _attempt("pt2", optional, lambda: _export_program(
            model, example_inputs, stem.with_name(stem.name + ".pt2"), reference, atol))
        if why:
            skipped["pt2"] = why
        else:
            written["pt2"] = program
    if "torchscript" in formats:
        written["torchscript"] = str(stem.with_name(stem.name + ".torchscript.pt"))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch >= 2.9 flags torch.jit as deprecated; it still is the portable path
            traced = torch.jit.trace(model, example_inputs, check_trace=False)
            with atomic_write(written["torchscript"], "wb") as fh:
                torch.jit.save(traced, fh)
            reloaded = torch.jit.load(written["torchscript"])(example_inputs)
        _check_close("torchscript", reloaded, reference, atol)
    onnx_status = "not requested"
    if "onnx" in formats:
        if importlib.util.find_spec("onnx") is None:
            onnx_status = "skipped: install the onnx extra (pip install evoprune[onnx])"
            warnings.warn(f"ONNX export {onnx_status}", stacklevel=2)
        else:
            onnx_path = stem.with_name(stem.name + ".onnx")
            status, why = _attempt("onnx", optional, lambda: _export_onnx(
                model, example_inputs, onnx_path, reference, atol))
            if why:
                skipped["onnx"] = onnx_status = f"skipped: {why}"
            else:
                onnx_status, written["onnx"] = status, str(onnx_path)
    card = model_card(model, example_inputs, plan=plan, widths=widths, extra=extra)
    card["files"] = {fmt: {"path": Path(p).name, "bytes": os.path.getsize(p)} for fmt, p in written.items()}
    card["onnx"] = onnx_status
    if skipped:
        card["skipped"] = skipped
    written["card"] = str(stem.with_name(stem.name + ".json"))
    write_json(written["card"], card)
    return written


def _attempt(fmt: str, optional, write):
    """``(write(), None)``; for a format in ``optional`` whose ``write`` raises :class:`ModelError`, ``(None, the
    error's message)`` with a warning instead (the file is skipped)."""
    try:
        return write(), None
    except ModelError as exc:
        if fmt not in optional:
            raise
        warnings.warn(f"{exc}; the .{fmt} file is not written", stacklevel=4)
        return None, str(exc)


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (third-party errors can run to pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _export_program(model, example_inputs, path: Path, reference, atol) -> str:
    """``model`` as a ``torch.export`` ExportedProgram in ``path`` (batch dimension dynamic), reloaded and checked."""
    x = example_inputs if example_inputs.shape[0] > 1 else example_inputs.expand(2, *example_inputs.shape[1:])
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (x.contiguous(),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
            with atomic_write(path, "wb") as fh:
                torch.export.save(program, fh)
            got = torch.export.load(str(path)).module()(example_inputs)
    except ModelError:
        raise
    except Exception as exc:  # torch.export's own errors (data-dependent control flow, unsupported ops)
        raise ModelError(f"the model cannot be exported with torch.export ({type(exc).__name__}: "
                         f"{_first_line(exc)})") from None
    _check_close("pt2", got, reference, atol)
    return str(path)


def _export_onnx(model, example_inputs, path: Path, reference, atol) -> str:
    """``model`` as ONNX in ``path``, checked with ONNX Runtime where it is installed; returns the card's status."""
    try:
        data = onnx_bytes(model, example_inputs)
    except Exception as exc:  # the exporter's own errors (unsupported ops)
        raise ModelError(f"the model cannot be exported to ONNX ({type(exc).__name__}: {_first_line(exc)})") from None
    got = None
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: example_inputs.numpy()})[0]
        _check_close("onnx", torch.from_numpy(got), reference, atol)
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    return "written" if got is None else "written, checked with onnxruntime"


def onnx_bytes(model: nn.Module, example_inputs: torch.Tensor) -> bytes:
    """``model`` as an in-memory ONNX file (input ``input`` and output ``logits``, dynamic batch)."""
    buf = io.BytesIO()
    kwargs = dict(input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"},
                                                                             "logits": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example_inputs,), buf, dynamo=False, **kwargs)
        except TypeError:  # older torch without the dynamo switch
            torch.onnx.export(model, (example_inputs,), buf, **kwargs)
    return buf.getvalue()


def _check_close(fmt, got, reference, atol):
    if got.shape != reference.shape or not torch.allclose(got, reference, atol=atol, rtol=1e-4):
        diff = (got - reference).abs().max().item() if got.shape == reference.shape else "shape"
        raise ModelError(f"the exported {fmt} model disagrees with the in-memory model (max diff {diff})")
