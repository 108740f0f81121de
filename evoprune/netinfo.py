"""Facts about a model and the checks every model passes before evoprune uses it: it holds no NaN, it runs on the
example inputs and returns one tensor, how many classes it predicts, its layer widths and bytes, and a context for
forward hooks. Plain ``torch.nn`` code, with no torch-pruning or search inside: every layer of the pipeline (the
space, the surgery, the export, the CLI) asks these questions, so they live below all of them.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import ModelError


def check_finite(model: nn.Module) -> None:
    """A :class:`ModelError` naming the first parameter or buffer that holds NaN or inf."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelError(f"{name} contains NaN or inf: the model cannot be scored or pruned meaningfully")


def check_forward(model: nn.Module, x: torch.Tensor, hint: str = "") -> torch.Tensor:
    """``model(x)`` without gradients, or a :class:`ModelError` that says the inputs do not fit (plus ``hint``)."""
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ModelError(f"{type(model).__name__} cannot run on inputs of shape {tuple(x.shape)}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}{hint}") from None
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"{type(model).__name__} returns {type(out).__name__}; evoprune needs a model whose "
                         "forward returns one tensor (wrap it to select the logits)")
    return out


def output_classes(model: nn.Module, example_inputs: torch.Tensor, labels=None) -> int:
    """Classes of the task: the model's output width (the largest label + 1 as a fallback)."""
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(example_inputs)
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return int(out.shape[1])
    return int(torch.as_tensor(labels).max()) + 1


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels of every Conv and Linear layer, in network order."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            widths[name] = m.out_features
    return widths


def model_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers (what the weights take in memory and, about, on disk)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@contextlib.contextmanager
def forward_hooks(modules, hook, *, with_kwargs: bool = False):
    """Register ``hook`` as a forward hook on every module for the duration of the block (``with_kwargs``: it is
    called as ``hook(module, args, kwargs, output)``)."""
    handles = [m.register_forward_hook(hook, with_kwargs=with_kwargs) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
