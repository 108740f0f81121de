"""``evoprune inspect``: facts about a model and its pruning space, as plain data (``--json``) or text.

For a built-in architecture: its pruning space (channel groups and their sizes, connection units, base MACs and
params); with a state_dict loaded into it, or for a saved model file: per-layer widths, MACs, params and bytes,
plus the pruning space when it is a Python model.
"""
from __future__ import annotations

import torch
import torch_pruning as tp

from ..errors import ModelError
from ..models import build, fit_weights
from ..netinfo import check_forward, model_bytes
from ..space.pruning_space import PruningSpace
from .sources import DEFAULT_INPUT_SHAPE, card_input_shape, classes_in, example_inputs, load_model_file, read_weights


def arch_info(arch: str, *, weights: str | None = None, num_classes: int | None = None, shape=None) -> dict:
    """What ``inspect --arch`` shows: the pruning space of the built-in ``arch``; with ``weights`` (a state_dict,
    loaded strictly; its classifier gives the number of classes unless ``num_classes``), also its layers."""
    shape = shape or DEFAULT_INPUT_SHAPE
    if not weights:
        model = build(arch, num_classes=num_classes or 10).eval()
        return {"source": f"--arch {arch}", "space": space_info(model, shape)}
    state = read_weights(weights)
    classes = num_classes or classes_in(state, arch) or 10
    hint = "Pass the --arch it was saved from" + (" and its --num-classes." if num_classes else ".")
    model = fit_weights(build(arch, num_classes=classes), state, weights, hint=hint).eval()
    info = {"source": f"--arch {arch} --weights {weights}", **model_info(model, shape)}
    info["space"] = space_or_reason(model, shape)
    return info


def file_info(path: str, *, trust: bool, shape=None) -> dict:
    """What ``inspect --model`` shows: the layers of the model saved in ``path`` and its pruning space (the input
    shape defaults to the one in the model card beside it)."""
    model = load_model_file(path, trust=trust, purpose="inspect")
    shape = shape or card_input_shape(path) or DEFAULT_INPUT_SHAPE
    info = {"source": str(path), **model_info(model, shape)}
    info["space"] = space_or_reason(model, shape)
    return info


def space_info(model, shape) -> dict:
    """The pruning space of ``model`` for one input of ``shape``, as plain data."""
    space = PruningSpace.from_model(model, example_inputs(shape), with_cost=False)
    return {
        "model": space.model_name, "input_shape": list(space.input_shape),
        "base_macs": float(space.base_macs), "base_params": int(space.base_params),
        "fingerprint": space.fingerprint,
        "genes": {"neurons": space.layout.n_neurons, "connections": space.layout.n_connections,
                  "total": len(space.layout)},
        "groups": [{"name": g.name, "size": g.size, "members": list(g.members),
                    "consumers": [c.module for c in g.consumers]} for g in space.groups],
        "units": [{"name": u.name, "kind": u.kind, "modules": list(u.modules)} for u in space.units],
    }


def space_or_reason(model, shape) -> dict:
    """:func:`space_info`, or ``{"error": why}`` when the model has no pruning space (TorchScript, nothing
    prunable)."""
    if isinstance(model, torch.jit.ScriptModule):
        return {"error": "TorchScript module: the pruning space needs the Python model"}
    try:
        return space_info(model, shape)
    except ModelError as exc:
        return {"error": str(exc)}


_LAYER_TYPES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")


def model_info(model, shape) -> dict:
    """Per-layer widths, MACs, params and bytes of ``model`` (a Python or TorchScript module) for ``shape``."""
    x = example_inputs(shape)
    out = check_forward(model, x, "; pass the right --input-shape")
    scripted = isinstance(model, torch.jit.ScriptModule)
    layer_macs, total_macs = {}, None
    if not scripted:
        total_macs, _, flops, _ = tp.utils.count_ops_and_params(model, x, layer_wise=True)
        layer_macs = {m: v for m, v in flops.items()}
    layers = []
    for name, m in model.named_modules():
        kind = getattr(m, "original_name", None) if scripted else type(m).__name__
        if kind not in _LAYER_TYPES:
            continue
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        width = weight.shape[1] if kind.startswith("ConvTranspose") else weight.shape[0]
        own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        macs = layer_macs.get(m)
        layers.append({"name": name, "type": kind, "width": int(width),
                       "macs": None if macs is None else float(macs),
                       "params": int(sum(p.numel() for p in m.parameters(recurse=False))),
                       "bytes": int(sum(t.numel() * t.element_size() for t in own))})
    return {
        "model": getattr(model, "original_name", None) if scripted else type(model).__name__,
        "format": "torchscript" if scripted else "python",
        "input_shape": list(x.shape), "output_shape": list(out.shape) if isinstance(out, torch.Tensor) else None,
        "macs": None if total_macs is None else float(total_macs),
        "params": int(sum(p.numel() for p in model.parameters())),
        "bytes": int(model_bytes(model)),
        "layers": layers,
    }


def _mmacs(x) -> str:
    return "?" if x is None else f"{x / 1e6:,.3f}"


def format_info(info: dict) -> str:
    """The text ``evoprune inspect`` prints for ``info`` (:func:`arch_info` / :func:`file_info`)."""
    lines = []
    if "layers" in info:
        shape = "x".join(map(str, info["input_shape"]))
        lines += [f"{info['source']}: {info['model']} ({info['format']} module), input {shape}",
                  f"  MACs {_mmacs(info['macs'])} M   params {info['params']:,}   bytes {info['bytes']:,}", "",
                  f"  {'layer':<28} {'type':<8} {'width':>6} {'MMACs':>10} {'params':>10} {'bytes':>10}"]
        for layer in info["layers"]:
            lines.append(f"  {layer['name']:<28} {layer['type']:<8} {layer['width']:>6} {_mmacs(layer['macs']):>10} "
                         f"{layer['params']:>10,} {layer['bytes']:>10,}")
        if info["format"] == "torchscript":
            lines.append("  (TorchScript: per-layer MACs need the Python model)")
        lines.append("")
    space = info.get("space")
    if space is not None and "error" in space:
        lines.append(f"pruning space: none ({space['error']})")
    elif space is not None:
        shape = "x".join(map(str, space["input_shape"]))
        lines += [f"pruning space of {space['model']} for input {shape} (fingerprint {space['fingerprint']})",
                  f"  base MACs {_mmacs(space['base_macs'])} M, params {space['base_params']:,}",
                  f"  genes: {space['genes']['neurons']:,} neuron + {space['genes']['connections']} connection = "
                  f"{space['genes']['total']:,}", "",
                  f"  {len(space['groups'])} channel groups (name, channels, coupled layers):"]
        for g in space["groups"]:
            lines.append(f"    {g['name']:<28} {g['size']:>5}  {', '.join(g['members'])}")
        lines += ["", f"  {len(space['units'])} connection units (name, kind, bypassed modules):"]
        for u in space["units"]:
            lines.append(f"    {u['name']:<28} {u['kind']:<10} {', '.join(u['modules'])}")
        if not space["units"]:
            lines.append("    none")
    return "\n".join(lines).rstrip()
