"""Where a command's model and data come from: ``--data`` (a path, or the demo's generated data), ``--weights``
state_dicts and ``--model`` files, read with errors that name the flags that fit.

``--data demo`` (also ``demo:quick``, ``demo:SEED``, ``demo:quick:SEED``) means the demo's generated data, so the
demo's outputs can be evaluated: see :func:`demo_data_spec`.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

from ..data import load_images, normalize, synthetic
from ..errors import CheckpointError, ConfigError, DataError, ModelError
from ..models import build
from ..netinfo import check_forward
from ..storage import ExportedModule, load_module, load_state_dict

#: The input shape (channels, height, width) when neither --input-shape nor a model card gives one.
DEFAULT_INPUT_SHAPE = (3, 32, 32)
#: The demo's generated images, ``(train, val)``, for ``quick`` off and on.
DEMO_SIZES = {False: (2000, 1000), True: (800, 400)}


def demo_data_spec(text: str) -> tuple[bool, int] | None:
    """``(quick, seed)`` when ``--data`` names the demo's generated data, else None (a path).

    ``demo`` is the data of ``evoprune demo`` with its defaults, ``demo:quick`` those of ``demo --quick``, and
    ``demo:SEED`` / ``demo:quick:SEED`` those of ``--seed SEED``: the same train and val images, image for image.
    A file or folder that exists under that name wins (write ``./demo`` to be explicit). A malformed spec
    (``demo:fast``) raises :class:`~evoprune.errors.ConfigError` (``setting="data"``).
    """
    if not isinstance(text, str) or (text != "demo" and not text.startswith("demo:")) or Path(text).exists():
        return None
    quick, seed = False, None
    for part in text.split(":")[1:]:
        if part == "quick" and not quick and seed is None:
            quick = True
        elif seed is None and part.lstrip("-").isdigit():
            seed = int(part)
        else:
            raise ConfigError(f"{text!r}: the demo's data are 'demo', 'demo:quick', 'demo:SEED' or "
                              "'demo:quick:SEED' (SEED: the demo's --seed)", setting="data")
    return quick, seed or 0


def demo_data_name(quick: bool, seed: int) -> str:
    """The ``--data`` value that reproduces the data of ``evoprune demo`` run with ``quick`` and ``seed``."""
    return "demo" + (":quick" if quick else "") + (f":{seed}" if seed else "")


def demo_data(quick: bool, seed: int):
    """The demo's generated data (4 classes, 16x16): the same images for the same ``quick`` and ``seed``."""
    n_train, n_val = DEMO_SIZES[bool(quick)]
    return synthetic(n_train, n_val, classes=4, size=16, seed=seed)


def load_data(args):
    """The data ``--data`` names (with ``--download``): the demo's generated data, or images loaded from a path."""
    demo = demo_data_spec(args.data)
    if demo is not None:
        data = demo_data(*demo)
        print(f"evoprune: --data {args.data}: the demo's generated data ({len(data.train)} train / {len(data.val)} "
              "val images, 16x16, 4 classes)", file=sys.stderr)
        return data
    return load_images(args.data, download=args.download)


def data_source(args) -> str:
    """``--data`` as recorded for resuming: the demo spec in its canonical form, or the absolute path."""
    demo = demo_data_spec(args.data)
    if demo is not None:
        return demo_data_name(*demo)
    return str(Path(args.data).expanduser().resolve())


def abspath(path: str | None) -> str | None:
    """``path`` made absolute (None stays None), as recorded for resuming."""
    return None if path is None else str(Path(path).expanduser().resolve())


def read_weights(path: str) -> dict:
    """The state_dict given as ``--weights`` (tensors only). Errors say what the file is and which flags fit it:
    a whole pickled model belongs in ``--model FILE --trust-pickle``, a TorchScript file in ``--model FILE``."""
    try:
        return load_state_dict(path)
    except CheckpointError as exc:
        if exc.reason == "pickle":
            raise CheckpointError(
                f"{path}: holds pickled Python objects, not only tensors (a whole model saved with torch.save(model)?"
                "), so it is not loaded as --weights (unpickling could run code from the file). --weights takes a "
                "state_dict: torch.save(model.state_dict(), path). If it is a whole model you trust, pass it as "
                f"--model {path} --trust-pickle instead of --arch and --weights.", reason="pickle") from None
        if exc.reason == "torchscript":
            raise CheckpointError(
                f"{path}: is a TorchScript module, not a state_dict; evaluate and inspect take it as --model {path} "
                "(instead of --arch and --weights).", reason="torchscript") from None
        raise


def classes_in(state: dict, arch: str) -> int | None:
    """The number of classes a state_dict for ``arch`` was saved with: the width of the architecture's last
    Linear layer in ``state`` (None if it is not there)."""
    linear = [name for name, m in build(arch, num_classes=10).named_modules() if isinstance(m, torch.nn.Linear)]
    weight = state.get(f"{linear[-1]}.weight") if linear else None
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def load_model_file(path: str, *, trust: bool, purpose: str):
    """A whole model from ``path``: TorchScript, or a pickled ``nn.Module`` if ``trust``. ``purpose`` (prune,
    evaluate, export, inspect) says what it is for: errors then name the flags that fit that command."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 flags torch.jit.load as deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            model = load_module(path, trust=trust)
    except CheckpointError as exc:
        if exc.reason == "state_dict" and purpose == "export":
            raise ModelError(f"{path}: holds a state_dict (weights only), not a whole model; export needs the whole "
                             "model: save it with torch.save(model) where it was made and pass that file with "
                             "--trust-pickle.") from None
        if exc.reason == "state_dict":
            raise ModelError(f"{path}: holds a state_dict (weights only), not a whole model: pass it as --weights "
                             f"{path} with the --arch it was saved from.") from None
        if exc.reason == "untrusted":  # a flag is missing: a usage error (exit 2), like any other
            raise ConfigError(
                f"{path}: is a pickled Python object, and loading it would run code from the file. If you trust "
                "its source, pass --trust-pickle; otherwise export it where it was made (evoprune export writes "
                ".pt2 and .onnx, which load without trust).") from None
        raise
    if purpose in ("prune", "export", "inspect") and isinstance(model, ExportedModule):
        raise ModelError(f"{path}: is a torch.export program (.pt2), a deployment format; {purpose} needs the "
                         "Python model: pass the pickled .pt it was made from, with --trust-pickle.")
    if purpose == "prune" and isinstance(model, torch.jit.ScriptModule):
        raise ModelError(f"{path}: is a TorchScript module; pruning needs the Python model (its module classes) "
                         "to trace and rewrite it. Save it with torch.save(model) and pass --trust-pickle, or use "
                         "--arch with --weights.")
    if purpose == "export" and isinstance(model, torch.jit.ScriptModule):
        raise ModelError(f"{path}: is already TorchScript; export (and its model card's MACs count) needs the Python "
                         "model: pass the pickled .pt it was made from, with --trust-pickle.")
    return model.eval()


def example_inputs(shape) -> torch.Tensor:
    """One fixed random input of ``shape`` (channels, height, width), batch 1."""
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))


def source_card(path: str) -> dict:
    """The model card beside ``path`` (``stem.json`` for ``stem.pt``, ``stem.pt2``, ``stem.torchscript.pt``), or
    an empty dict if there is none or it is unreadable."""
    p = Path(path)
    stem = p.name[: -len(".pt")] if p.name.endswith(".pt") else p.stem
    stem = stem[: -len(".torchscript")] if stem.endswith(".torchscript") else stem
    try:
        card = json.loads(p.with_name(stem + ".json").read_text())
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


def card_input_shape(path: str) -> tuple[int, ...] | None:
    """The input shape recorded in the model card beside ``path`` (``stem.json``), if any."""
    try:
        dims = tuple(int(d) for d in source_card(path)["input_shape"][1:])
        return dims if len(dims) == 3 and min(dims) >= 1 else None
    except (ValueError, KeyError, TypeError, IndexError):
        return None


def check_outputs(model, data, where: str) -> None:
    """The model's output width must match the data's classes (:class:`DataError` otherwise)."""
    x = normalize(data.val.images[:2], *data.val.stats)
    out = check_forward(model.eval(), x, f" ({where} and the data's images do not fit)")
    classes = len(data.train.classes)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != classes:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"{where} outputs {got} for a batch of 2, but the data have {classes} classes: the model "
                        "must return one logit per class")
