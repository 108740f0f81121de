"""Copying and patching module trees, shared by the surgery and the slicing.

:func:`structure_copy` is ``copy.deepcopy(model)`` with every parameter and buffer SHARED, several times faster
than ``deepcopy`` itself: the surgery prunes the copy (torch-pruning replaces every tensor it prunes with a new
one) and the slicing cuts new tensors out of the shared ones, so copying the tensors first would be wasted.
:func:`own_tensors` then clones the tensors the copy still shares with the original, and :func:`swap` replaces a
submodule (a cut connection unit becomes ``nn.Identity``).
"""
from __future__ import annotations

import copy
import types
from collections import OrderedDict

import torch
import torch.nn as nn


def swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` is; returns the module it replaced."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent._modules[attr]
    parent._modules[attr] = new
    return old


def tensors(model: nn.Module) -> list:
    """Every parameter and buffer of ``model``."""
    return list(model.parameters()) + list(model.buffers())


def own_tensors(pruned: nn.Module, original: nn.Module) -> None:
    """Replace every tensor of ``pruned`` that still shares memory with ``original`` by a copy."""
    shared = {t.untyped_storage().data_ptr() for t in tensors(original) if t.numel()}
    for module in pruned.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.numel() and p.untyped_storage().data_ptr() in shared:
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None and b.numel() and b.untyped_storage().data_ptr() in shared:
                module._buffers[name] = b.clone()



_ATOMIC = frozenset({type(None), bool, int, float, complex, str, bytes, type, range, types.FunctionType,
                     types.BuiltinFunctionType, torch.dtype, torch.device, torch.layout, torch.memory_format})


def _plain(cls) -> bool:
    """Whether ``copy.deepcopy`` copies instances of this module class by the default protocol (new object,
    ``__getstate__`` of nn.Module, state deep-copied, ``__setstate__``), which :func:`structure_copy` replays."""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and cls.__getstate__ is nn.Module.__getstate__
            and cls.__setstate__ in (nn.Module.__setstate__, nn.modules.conv._ConvNd.__setstate__)
            and not issubclass(cls, (list, dict)))


def structure_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` except that parameters and buffers are SHARED ,
    several times faster: a module's state is mostly ints, tuples and empty hook dicts, which ``deepcopy`` walks one
    reduce at a time. Atomic values and flat containers of them are copied directly, modules of plain classes
    recursively, anything else (and modules with their own copy protocol) by ``copy.deepcopy`` with the same memo,
    so shared objects stay shared exactly as ``deepcopy`` would leave them."""
    memo = {id(t): t for t in tensors(model)}

    def value(v):
        t = type(v)
        if t in _ATOMIC:
            return v
        hit = memo.get(id(v))
        if hit is not None:
            return hit
        if isinstance(v, nn.Module):
            return module(v) if _plain(t) else copy.deepcopy(v, memo)
        if t is tuple and all(type(e) in _ATOMIC for e in v):
            return v  # what deepcopy returns for a tuple of atoms
        if t in (dict, OrderedDict):
            y = memo[id(v)] = t()
            for k, x in v.items():
                y[value(k)] = value(x)
            return y
        if t in (list, set) and all(type(e) in _ATOMIC for e in v):
            y = memo[id(v)] = t(v)
            return y
        return copy.deepcopy(v, memo)

    def module(m):
        new = memo[id(m)] = type(m).__new__(type(m))
        new.__setstate__({k: value(v) for k, v in m.__getstate__().items()})
        return new

    return value(model)


__all__ = ["structure_copy", "own_tensors", "swap", "tensors"]
