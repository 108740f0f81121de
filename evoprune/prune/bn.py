"""BatchNorm statistics: re-calibrate them on a few batches (adaptive BN, as in EagleEye), or put them back."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


def _bn_layers(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def recalibrate_bn(net: nn.Module, batches) -> nn.Module:
    """Adaptive BN: recompute every BatchNorm's running statistics on ``batches`` (cumulative average), leaving
    weights and every other layer (dropout included) in eval mode."""
    bns = _bn_layers(net)
    if not bns or not batches:
        return net
    momenta = [bn.momentum for bn in bns]
    net.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        with torch.no_grad():
            for x in batches:
                net(x)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        net.eval()
    return net


@contextlib.contextmanager
def restored_bn(net: nn.Module):
    """Put every BatchNorm's running statistics back as they were on exit."""
    saved = [(bn, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in _bn_layers(net)]
    try:
        yield net
    finally:
        for bn, mean, var, n in saved:
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(n)


__all__ = ["recalibrate_bn", "restored_bn"]
