"""Analytic MACs and parameter counts, equal to ``torch_pruning.utils.count_ops_and_params``.

The pruning space probes the model once: it removes one channel of each group in turn (physically, with
torch-pruning, on a private copy) and records how every parameter shape and every shape seen by torch-pruning's op
counter changes. Every such dimension is affine in the number of removed channels per group, so afterwards the cost
of any plan is ``base - A @ removed`` followed by torch-pruning's own per-layer formulas, without running a model.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.nn as nn
from torch_pruning.utils import op_counter

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
    """Affine shape table plus per-call formulas. Built by :class:`evoprune.space.PruningSpace`."""

    def __init__(self, base: np.ndarray, coeff: np.ndarray, calls: list[Call], params: list[Param], batch: int):
        self.base = base.astype(np.int64)
        self.coeff = coeff.astype(np.int64)  # (n_dims, n_groups)
        self.calls = calls
        self.params = params
        self.batch = batch
        for call in calls:
            rows = call.in_dims + call.out_dims
            if call.kind == "other" and rows and self.coeff[rows].any():
                raise ValueError(f"{call.module}: its shapes change with pruning, but its op count is not modelled")

    def dims(self, removed: np.ndarray) -> np.ndarray:
        return self.base - self.coeff @ np.asarray(removed, dtype=np.int64)

    def count(self, removed: np.ndarray, alive: "callable") -> tuple[float, int]:
        """MACs (per sample, as torch-pruning reports them) and params for ``removed`` channels per group.

        ``alive(module_name)`` says whether a module is still in the network (False inside a cut connection).
        """
        d = self.dims(removed)
        total = 0
        for call in self.calls:
            if alive(call.module):
                total += _flops(call, d)
        params = 0
        for p in self.params:
            if alive(p.name.rpartition(".")[0]):
                params += int(np.prod(d[p.dims], dtype=np.int64))
        macs = total / self.batch
        return (int(macs) if float(macs).is_integer() else macs), params


def _flops(call: Call, d: np.ndarray) -> int:
    kind = call.kind
    if kind == "other":
        return call.flops
    ins = [int(x) for x in d[call.in_dims]]
    outs = [int(x) for x in d[call.out_dims]]
    a = call.attrs
    if kind == "conv":
        in_ch, out_ch = ins[1], outs[1]
        groups = in_ch if a["depthwise"] else a["groups"]
        active = ins[0] * int(np.prod(outs[2:], dtype=np.int64))
        flops = a["kernel"] * in_ch * (out_ch // groups) * active
        return flops + (out_ch * active if a["bias"] else 0)
    if kind == "relu":
        return int(np.prod(outs, dtype=np.int64))
    if kind == "pool":
        return int(np.prod(ins, dtype=np.int64))
    if kind in ("bn", "ln"):
        return int(np.prod(ins, dtype=np.int64)) * (2 if a["affine"] else 1)
    if kind == "linear":
        return int(np.prod(ins, dtype=np.int64)) * outs[-1] + (outs[-1] if a["bias"] else 0)
    if kind == "upsample":
        return int(np.prod(outs[1:], dtype=np.int64))
    raise AssertionError(kind)


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
