"""The cheap refit for fitness: :class:`TeacherGrams`, the teacher's per-layer Gram matrices over its own inputs,
collected once per round, so that refitting a candidate is a slice of them and a small solve per layer.

The teacher's output of a layer is ``Y = X W^T + b``, linear in its inputs ``X``, so ``X_kept^T Y = G[kept, :]
[W b]^T``: with the teacher's inputs at the kept channels standing in for the pruned network's (the cheap variant
of :func:`evoprune.reconstruct`), no forward pass and no stored outputs are needed. :class:`evoprune.FitnessConfig`
``reconstruct="lsq"`` scores plans this way. B6: it costs no more per evaluation than BN re-calibration, but it
ranks plans worse (Kendall tau 0.42 against top-1 after the full refit, 0.61 for the plain score), because it sees
neither how errors compound through the pruned network nor what a cut unit does downstream; off by default.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..space.plan import PruningPlan
from ..space.pruning_space import PruningSpace, ResolvedPlan
from .lsq import REFIT_TYPES, add_bias, calibration_images, device_of, input_rows, out_width, positions_of, solve, taps
from .slicing import channel_maps


# ---------------------------------------------------------------------------------------------- the cheap variant
class TeacherGrams:
    """The teacher's per-layer Gram matrices ``X^T X`` over its own inputs (sampled as :func:`evoprune.reconstruct`
    samples them), for every conv (``groups == 1``) or linear layer whose inputs a plan can cut. :meth:`refit` then
    refits a pruned model's layers from the teacher's inputs at the kept channels: since the teacher's output is
    ``X W^T + b``,
    ``X_kept^T Y = G[kept, :] W^T``, so a candidate costs a slice and a small solve per layer, no forward pass.
    Only columns that ever see a non-zero input are stored (a 3x3 conv at 1x1 keeps its centre tap)."""

    def __init__(self, grams: dict, ridge: float):
        self.grams = grams  # layer -> (live column indices, Gram over them, float64)
        self.ridge = ridge

    @classmethod
    def collect(cls, teacher: nn.Module, space: PruningSpace, batches, *, positions: int = 16, ridge: float = 1e-3,
                seed: int = 0) -> "TeacherGrams":
        images = calibration_images(batches, space)
        consumers = {c.module for g in space.groups for c in g.consumers}
        modules = dict(teacher.named_modules())
        names = [n for n in modules if n in consumers and type(modules[n]) in REFIT_TYPES
                 and getattr(modules[n], "groups", 1) == 1]
        acc: dict[str, torch.Tensor] = {}
        calls: dict[str, int] = {}
        handles = []
        for k, name in enumerate(names):
            gen = torch.Generator().manual_seed(seed * 100_003 + k)

            def hook(m, args, y, name=name, gen=gen):
                calls[name] = calls.get(name, 0) + 1
                idx = positions_of(y, positions, gen) if isinstance(m, nn.Conv2d) else None
                x = input_rows(m, args[0], idx).float()
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
                g = (x.T @ x).double().cpu()  # float32 products per batch, summed in float64
                acc[name] = g if name not in acc else acc[name] + g

            handles.append(modules[name].register_forward_hook(hook))
        was = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                for b in images:
                    teacher(b.to(device_of(teacher)))
        finally:
            teacher.train(was)
            for h in handles:
                h.remove()
        grams = {}
        for name, g in acc.items():
            if calls[name] != len(images) or not bool(torch.isfinite(g).all()):
                continue  # run more than once per forward, or non-finite: not refit
            live = torch.nonzero(torch.diagonal(g) > 0).flatten()
            grams[name] = (live, g[live][:, live].contiguous())
        return cls(grams, ridge)

    def refit(self, teacher: nn.Module, net: nn.Module, plan: PruningPlan | ResolvedPlan,
              space: PruningSpace) -> nn.Module:
        """Refit, in place, every layer of ``net`` (``slice_plan(teacher, plan, space)``) whose inputs lost channels,
        from the teacher's inputs at the kept channels. Returns ``net``."""
        t_modules, modules = dict(teacher.named_modules()), dict(net.named_modules())
        for name, (out_drop, in_drop) in channel_maps(teacher, plan, space).items():
            if not in_drop or name not in self.grams or name not in modules:
                continue
            t, m = t_modules[name], modules[name]
            k = taps(t)
            in_width = t.weight.shape[1]
            kept_in = torch.tensor([c for c in range(in_width) if c not in in_drop], dtype=torch.long)
            kept_out = torch.tensor([c for c in range(out_width(t)) if c not in out_drop], dtype=torch.long)
            cols = torch.cat([(kept_in[:, None] * k + torch.arange(k)).flatten(),
                              torch.tensor([in_width * k])])  # kept input columns, then the bias column
            live, gram = self.grams[name]
            w_t = torch.cat([t.weight.detach().reshape(t.weight.shape[0], -1).double().cpu(),
                             (t.bias.detach().double().cpu() if t.bias is not None
                              else torch.zeros(t.weight.shape[0], dtype=torch.float64))[:, None]], 1)[kept_out]
            pos = torch.full((in_width * k + 1,), -1, dtype=torch.long)
            pos[live] = torch.arange(len(live))
            k_pos = pos[cols]
            sel = k_pos >= 0  # kept columns that see data; the others keep the teacher's weight
            a = gram[k_pos[sel]][:, k_pos[sel]]
            b = gram[k_pos[sel]] @ w_t[:, live].T
            w = solve(a[None], b[None], w_t[:, cols[sel]].T[None], self.ridge)
            if w is None:
                continue
            new = w_t[:, cols].clone()
            new[:, sel] = w[0].T
            m.weight.data.copy_(new[:, :-1].reshape(m.weight.shape).to(m.weight))
            add_bias(m, new[:, -1], absolute=True)
        return net

    def nbytes(self) -> int:
        return sum(g.numel() * g.element_size() for _, g in self.grams.values())


__all__ = ["TeacherGrams"]
