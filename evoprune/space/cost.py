"""Analytic MACs and parameter counts, equal to ``torch_pruning.utils.count_ops_and_params``, and the probe that
builds them.

:func:`probe` runs once per pruning space: it removes one channel of each group in turn (physically, with
torch-pruning, on a private copy) and records how every parameter shape and every shape seen by torch-pruning's op
counter changes. Every such dimension is affine in the number of removed channels per group, so afterwards the cost
of any plan is ``base - A @ removed`` followed by torch-pruning's own per-layer formulas, evaluated for all layers at
once with numpy (no model runs, no Python loop over layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.utils import op_counter

from ..errors import ModelError
from ..netinfo import forward_hooks

# torch-pruning's op-counter hook -> the formula we mirror (see torch_pruning/utils/op_counter.py)
_KINDS = {
    op_counter.conv_flops_counter_hook: "conv",
    op_counter.relu_flops_counter_hook: "relu",
    op_counter.pool_flops_counter_hook: "pool",
    op_counter.bn_flops_counter_hook: "bn",
    op_counter.ln_flops_counter_hook: "ln",
    op_counter.linear_flops_counter_hook: "linear",
    op_counter.upsample_flops_counter_hook: "upsample",
}


def counter_kind(module: nn.Module) -> str | None:
    """The op-counter formula torch-pruning applies to ``module``, 'other' if unmodelled, None if not counted."""
    hook = op_counter.MODULES_MAPPING.get(type(module))
    if hook is None:
        return None
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "other"
    return _KINDS.get(hook, "other")


@dataclass
class Call:
    """One counted forward call of a module, as the op counter sees it."""

    module: str
    kind: str
    in_dims: list[int]  # rows of the dimension table
    out_dims: list[int]
    attrs: dict
    flops: int  # measured on the unpruned model (used for kinds whose shapes never change)


@dataclass
class Param:
    name: str
    dims: list[int]


class CostModel:
    """Affine shape table plus per-call formulas, compiled to index arrays. Built by :func:`probe`.

    ``units``: which calls and parameters sit inside each connection unit (``call_units[i, u]``), so that a cut unit
    takes its layers out of the count."""

    def __init__(self, base: np.ndarray, coeff: np.ndarray, calls: list[Call], params: list[Param], batch: int,
                 call_units: np.ndarray | None = None, param_units: np.ndarray | None = None):
        self.base = base.astype(np.int64)
        self.coeff = coeff.astype(np.int64)  # (n_dims, n_groups)
        self.calls = calls
        self.params = params
        self.batch = batch
        for call in calls:
            rows = call.in_dims + call.out_dims
            if call.kind == "other" and rows and self.coeff[rows].any():
                raise ValueError(f"{call.module}: its shapes change with pruning, but its op count is not modelled")
        self.call_units = np.zeros((len(calls), 0), bool) if call_units is None else call_units
        self.param_units = np.zeros((len(params), 0), bool) if param_units is None else param_units
        self._compile()

    def dims(self, removed: np.ndarray) -> np.ndarray:
        return self.base - self.coeff @ np.asarray(removed, dtype=np.int64)

    def alive_calls(self, cut: np.ndarray | None) -> np.ndarray:
        """Which calls are still in the network when the units flagged in ``cut`` are bypassed."""
        if cut is None or not self.call_units.shape[1] or not np.any(cut):
            return np.ones(len(self.calls), bool)
        return ~self.call_units[:, np.asarray(cut, bool)].any(axis=1)

    def count(self, removed: np.ndarray, cut: np.ndarray | None = None) -> tuple[float, int]:
        """MACs (per sample, as torch-pruning reports them) and params for ``removed`` channels per group, with
        the connection units flagged in ``cut`` bypassed."""
        d = np.append(self.dims(removed), 1)  # index -1: the constant 1 that pads ragged rows
        flops = self._const.copy()
        c = self._conv
        if len(c["kernel"]):
            cin, cout = d[c["cin"]], d[c["cout"]]
            active = d[c["active"]].prod(axis=1)
            groups = np.where(c["depthwise"], cin, c["groups"])
            flops[c["at"]] = c["kernel"] * cin * (cout // groups) * active + c["bias"] * cout * active
        g = self._generic
        if len(g["at"]):
            flops[g["at"]] = g["coef"] * d[g["rows"]].prod(axis=1) + g["bias"] * d[g["brow"]]
        if cut is not None and self.call_units.shape[1] and np.any(cut):
            cut = np.asarray(cut, bool)
            flops = flops[~self.call_units[:, cut].any(axis=1)]
            sizes = d[self._param_rows].prod(axis=1)[~self.param_units[:, cut].any(axis=1)]
        else:
            sizes = d[self._param_rows].prod(axis=1)
        macs = int(flops.sum()) / self.batch
        return (int(macs) if float(macs).is_integer() else macs), int(sizes.sum())

    def _compile(self):
        """Index arrays for :meth:`count`: convs (``kernel * in * (out // groups) * active + bias * out * active``),
        every other counted kind as ``coef * prod(rows) + bias * d[brow]``, and the op counter's own count for the
        kinds whose shapes never change."""
        conv = {k: [] for k in ("at", "kernel", "cin", "cout", "active", "depthwise", "groups", "bias")}
        gen = {k: [] for k in ("at", "coef", "rows", "bias", "brow")}
        self._const = np.zeros(len(self.calls), dtype=np.int64)
        for i, call in enumerate(self.calls):
            ins, outs, a = call.in_dims, call.out_dims, call.attrs
            if call.kind == "other":
                self._const[i] = call.flops
            elif call.kind == "conv":
                for key, v in (("at", i), ("kernel", a["kernel"]), ("cin", ins[1]), ("cout", outs[1]),
                               ("active", [ins[0], *outs[2:]]), ("depthwise", a["depthwise"]),
                               ("groups", a["groups"]), ("bias", int(a["bias"]))):
                    conv[key].append(v)
            else:
                coef, rows, bias, brow = {
                    "relu": (1, outs, 0, -1), "pool": (1, ins, 0, -1), "upsample": (1, outs[1:], 0, -1),
                    "bn": (2 if a.get("affine") else 1, ins, 0, -1), "ln": (2 if a.get("affine") else 1, ins, 0, -1),
                    "linear": (1, [*ins, outs[-1]], int(a.get("bias", False)), outs[-1]),
                }[call.kind]
                for key, v in (("at", i), ("coef", coef), ("rows", rows), ("bias", bias), ("brow", brow)):
                    gen[key].append(v)
        self._conv = {k: (_padded(v) if k == "active" else np.asarray(v, dtype=bool if k == "depthwise"
                                                                      else np.int64)) for k, v in conv.items()}
        self._generic = {k: (_padded(v) if k == "rows" else np.asarray(v, dtype=np.int64)) for k, v in gen.items()}
        self._param_rows = _padded([p.dims for p in self.params])


def _padded(rows: Sequence[Sequence[int]]) -> np.ndarray:
    """Ragged lists of row indices as one matrix, padded with -1 (the constant 1 that :meth:`CostModel.count`
    appends to the dimensions), so that a row-wise product ignores the padding."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def call_attrs(module: nn.Module, kind: str) -> dict:
    if kind == "conv":
        return {
            "kernel": int(np.prod(module.kernel_size)),
            "groups": module.groups,
            "depthwise": module.groups > 1 and module.groups == module.in_channels == module.out_channels,
            "bias": module.bias is not None,
        }
    if kind == "bn":
        return {"affine": bool(getattr(module, "affine", False))}
    if kind == "ln":
        return {"affine": bool(module.elementwise_affine)}
    if kind == "linear":
        return {"bias": module.bias is not None}
    return {}


# ====================================================================== the probe
def _record(model, x):
    """Every parameter shape and every op-counter call (module, kind, input shape, output shape)."""
    calls = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module, args, out):
        kind = counter_kind(module)
        inp = args[0] if args else None
        if isinstance(out, (tuple, list)):
            out = out[0]
        calls.append((names[module], kind, tuple(inp.shape) if isinstance(inp, torch.Tensor) else (),
                      tuple(out.shape) if isinstance(out, torch.Tensor) else (), module))

    with forward_hooks((m for m in model.modules() if counter_kind(m) is not None), hook), torch.no_grad():
        model(x)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return calls, params


def _flatten_shapes(calls, params):
    dims = []
    for _, _, ins, outs, _ in calls:
        dims.extend(ins)
        dims.extend(outs)
    for _, shape in params:
        dims.extend(shape)
    return np.array(dims, dtype=np.int64)


def probe(work: nn.Module, dg, roots: Sequence[nn.Module], x: torch.Tensor, units=()) -> CostModel:
    """The cost model of ``work`` (a private copy, pruned here): remove one channel of each group (its root module
    in ``roots``) in turn and read off the shape changes. ``units``: the connection units, whose layers a cut
    removes."""
    calls, params = _record(work, x)
    base = _flatten_shapes(calls, params)
    flops_by_module = tp.utils.count_ops_and_params(work, x, layer_wise=True)[2]
    names = {m: n for n, m in work.named_modules()}
    flops = {names[m]: v for m, v in flops_by_module.items() if m in names}
    coeff = np.zeros((len(base), len(roots)), dtype=np.int64)
    prev = base
    for j, root in enumerate(roots):
        pruner = dg.get_pruner_of_module(root)
        group = dg.get_pruning_group(root, pruner.prune_out_channels, [0])
        group.prune()
        now_calls, now_params = _record(work, x)
        now = _flatten_shapes(now_calls, now_params)
        if len(now) != len(prev):
            raise ModelError(f"pruning group {names[root]!r} changed the model's call structure; cannot cost it")
        coeff[:, j] = prev - now
        prev = now
    k = 0
    call_objs = []
    for name, kind, ins, outs, module in calls:
        in_rows = list(range(k, k + len(ins)))
        k += len(ins)
        out_rows = list(range(k, k + len(outs)))
        k += len(outs)
        n_calls = sum(1 for c in calls if c[0] == name)
        call_objs.append(Call(name, kind, in_rows, out_rows, call_attrs(module, kind),
                              int(flops.get(name) or 0) // max(n_calls, 1)))
    param_objs = []
    for name, shape in params:
        param_objs.append(Param(name, list(range(k, k + len(shape)))))
        k += len(shape)
    call_units = np.array([[u.contains(c.module) for u in units] for c in call_objs], bool).reshape(len(call_objs),
                                                                                                  len(units))
    param_units = np.array([[u.contains(p.name.rpartition(".")[0]) for u in units] for p in param_objs],
                           bool).reshape(len(param_objs), len(units))
    try:
        return CostModel(base, coeff, call_objs, param_objs, batch=int(x.shape[0]), call_units=call_units,
                         param_units=param_units)
    except ValueError as exc:
        raise ModelError(str(exc)) from None

