"""slice_plan against apply_plan, its reference: on the family matrix of test_space (random plans with connection
cuts), the sliced model must be apply_plan's model exactly (module tree, attributes, state_dict, outputs), own all
its tensors and leave the input model untouched; modules it does not handle take the apply_plan path."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

import evoprune.prune.slicing
import evoprune.space.graph
import test_space as ts
from evoprune import ModelError, PlanError, PruningPlan, PruningSpace, apply_plan
from evoprune.prune.copying import structure_copy, tensors
from evoprune.prune.slicing import slice_plan

pytestmark = pytest.mark.usefixtures("torch_single_thread")

_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features", "num_parameters")


@pytest.fixture(scope="module", params=[
    pytest.param(n, marks=[pytest.mark.slow] if f.slow else []) for n, f in ts.FAMILIES.items()])
def family(request, randomize_bn) -> ts.Built:
    """test_space's family matrix (the two CIFAR families are built once per session, shared with test_space)."""
    name = request.param
    return ts._cached(name, randomize_bn) if name in ("vgg16_bn_cifar", "resnet18_cifar") \
        else ts._make(name, randomize_bn)


def _storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel()}


def _assert_same_model(got: nn.Module, want: nn.Module, x: torch.Tensor) -> None:
    """``got`` is ``want``: same modules and attributes, same state_dict (keys, order, dtypes, shapes, values),
    same parameter flags, same outputs."""
    assert [(n, type(m)) for n, m in got.named_modules()] == [(n, type(m)) for n, m in want.named_modules()]
    for (name, a), b in zip(got.named_modules(), want.modules()):
        assert set(vars(a)) == set(vars(b)), name
        for attr in _ATTRS:
            assert getattr(a, attr, None) == getattr(b, attr, None), (name, attr)
        assert a.training == b.training, name
    sg, sw = got.state_dict(), want.state_dict()
    assert list(sg) == list(sw)
    for k in sw:
        assert sg[k].dtype == sw[k].dtype and sg[k].shape == sw[k].shape, (k, sg[k].shape, sw[k].shape)
        assert torch.equal(sg[k], sw[k]), k
    assert [(n, p.requires_grad) for n, p in got.named_parameters()] == \
        [(n, p.requires_grad) for n, p in want.named_parameters()]
    got.eval(), want.eval()
    with torch.no_grad():
        torch.testing.assert_close(got(x), want(x), atol=0, rtol=0)


def _check(b, plan: PruningPlan, state_guard, **kw) -> nn.Module:
    check_state = state_guard(b.model)
    want = apply_plan(b.model, plan, b.x, space=b.space)
    got = slice_plan(b.model, plan, b.space, **kw)
    check_state()  # the input model is untouched
    assert not _storages(got) & _storages(b.model)  # every tensor is owned
    _assert_same_model(got, want, b.x)
    check_state()
    return got


# ---------------------------------------------------------------------------------------------- the matrix
@pytest.mark.slow
@pytest.mark.parametrize("keep", ts.KEEPS)
def test_slice_equals_apply_on_family(family, keep, random_individual, state_guard):
    b = family
    genes = ts._individual(b.space, keep, random_individual, seed=[*map(ord, b.name), int(keep * 100), 7])
    plan = b.space.decode(genes)
    assert plan.cut or not b.space.units  # a connection cut in every plan of a family that has units
    got = _check(b, plan, state_guard, strict=True)  # strict: every family here is sliced, never sent to apply_plan
    assert sum(p.numel() for p in got.parameters()) == b.space.cost(plan)[1]


@pytest.mark.parametrize("which", ["vgg", "resnet"])
def test_slice_every_unit_cut_and_full_plan(which, randomize_bn, state_guard):
    b = ts._cached({"vgg": "vgg16_bn_cifar", "resnet": "resnet18_cifar"}[which], randomize_bn)
    sp = b.space
    _check(b, sp.full_plan(), state_guard, strict=True)  # nothing removed: still a copy that owns its tensors
    genes = sp.layout.ones()
    genes[sp.layout.n_neurons:] = [0] * len(sp.units)  # every unit cut, with half of every group
    rng = np.random.default_rng(3)
    for i, g in enumerate(sp.groups):
        sl = sp.layout.group_slice(i)
        for k in rng.choice(g.size, g.size // 2, replace=False):
            genes[sl.start + int(k)] = 0
    _check(b, sp.decode(genes), state_guard, strict=True)


def test_structure_copy_is_deepcopy_sharing_tensors(family):
    """The fast structure copy against copy.deepcopy with the tensors shared (its definition): same module
    classes and attributes, the same tensors, and no mutable state shared with the original."""
    model = family.model
    handle = model.register_forward_hook(lambda m, args, out: None)  # hooks are copied too
    try:
        got, want = structure_copy(model), copy.deepcopy(model, memo={id(t): t for t in tensors(model)})
    finally:
        handle.remove()
    originals = dict(model.named_modules())
    assert [(n, type(m)) for n, m in got.named_modules()] == [(n, type(m)) for n, m in want.named_modules()]
    for (name, a), b in zip(got.named_modules(), want.modules()):
        assert a is not originals[name]
        assert list(vars(a)) == list(vars(b)), name
        for key, va in vars(a).items():
            vb, vo = vars(b)[key], vars(originals[name])[key]
            if key in ("_parameters", "_buffers"):
                assert va.keys() == vb.keys() and all(va[k] is vb[k] is vo[k] for k in va), (name, key)
            elif key == "_modules":
                assert list(va) == list(vb), name
            elif isinstance(vo, (dict, list, set)):
                assert va == vb and va is not vo, (name, key)  # equal contents, its own container
            else:
                assert type(va) is type(vb) and va == vb, (name, key)
        assert len(a._forward_hooks) == (name == "")


# ---------------------------------------------------------------------------------------------- the contract
@pytest.fixture()
def vgg(randomize_bn):
    return ts._cached("vgg16_bn_cifar", randomize_bn)


def test_slice_neither_traces_nor_runs_the_model(vgg, random_individual, monkeypatch):
    plan = vgg.space.decode(ts._individual(vgg.space, 0.5, random_individual, seed=1))

    def refuse(*args, **kwargs):
        raise AssertionError("slice_plan built a DependencyGraph")

    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", refuse)
    monkeypatch.setattr(evoprune.space.graph, "build", refuse)
    monkeypatch.setattr(evoprune.prune.slicing, "apply_plan", refuse)
    calls = []
    handle = vgg.model.register_forward_pre_hook(lambda m, args: calls.append(1))  # copied into the result too
    try:
        pruned = slice_plan(vgg.model, plan, vgg.space)
    finally:
        handle.remove()
    assert calls == []
    assert pruned.classifier.in_features == len(plan.groups["features.40"])


def test_slice_validates_unless_told_not_to(vgg, random_individual, monkeypatch):
    sp = vgg.space
    with pytest.raises(PlanError, match="out of range"):
        slice_plan(vgg.model, PruningPlan(groups={"features.0": (0, 64)}), sp)
    with pytest.raises(PlanError, match="another pruning space"):
        slice_plan(vgg.model, PruningPlan(fingerprint="0" * 16), sp)
    with pytest.raises(PlanError, match="PruningPlan"):
        slice_plan(vgg.model, {"features.0": (0, 1)}, sp)
    plan = sp.decode(ts._individual(sp, 0.5, random_individual, seed=2))
    want = apply_plan(vgg.model, plan, vgg.x, space=sp)

    def refuse(plan):
        raise AssertionError("validated again")

    monkeypatch.setattr(sp, "validate", refuse)
    _assert_same_model(slice_plan(vgg.model, plan, sp, validate=False), want, vgg.x)


def test_slice_matches_apply_on_frozen_parameters_and_gradients(vgg, random_individual):
    """torch-pruning gives every pruned parameter a fresh nn.Parameter (trainable) with its gradient sliced along,
    and apply_plan copies the untouched ones without gradient: slice_plan does the same."""
    model = ts.FAMILIES["vgg16_bn_cifar"].build()
    model.load_state_dict(vgg.model.state_dict())
    model.eval()
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, float(i))
        p.requires_grad_(i % 2 == 0)
    plan = vgg.space.decode(ts._individual(vgg.space, 0.5, random_individual, seed=4))
    want = apply_plan(model, plan, vgg.x, space=vgg.space)
    got = slice_plan(model, plan, vgg.space)
    _assert_same_model(got, want, vgg.x)
    grads = [(n, p.grad) for n, p in got.named_parameters()]
    for (n, g), (_, w) in zip(grads, want.named_parameters()):
        assert (g is None) == (w.grad is None), n
        assert g is None or torch.equal(g, w.grad), n
    assert any(g is not None for _, g in grads) and any(g is None for _, g in grads)
    assert not {id(p) for p in got.parameters()} & {id(p) for p in model.parameters()}


def test_slice_raises_on_a_model_changed_after_the_space(vgg, random_individual):
    plan = vgg.space.decode(ts._individual(vgg.space, 0.5, random_individual, seed=3))
    other = ts.FAMILIES["vgg16_bn_cifar"].build().eval()
    other.classifier = nn.Linear(256, 10)  # not the width the space mapped
    with pytest.raises(ModelError, match="classifier has 256 input channels"):
        slice_plan(other, plan, vgg.space)


# ---------------------------------------------------------------------------------------------- the fallback
class _Scale(nn.Module):
    """A per-channel scale held in a bare nn.Parameter: torch-pruning prunes it as an unwrapped parameter."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, c).view(1, c, 1, 1))

    def forward(self, x):
        return x * self.gamma


class _MyConv(nn.Conv2d):
    """A subclass: slice_plan handles exact types only."""


_UNSUPPORTED = {  # kind -> (first layer, the module after its BN): what slice_plan does not handle, reached by the
    # first layer's channels (not PReLU(8) or InstanceNorm2d(8, affine=True): torch-pruning cannot map the views in
    # their forward, and the space leaves the group out)
    "unwrapped_parameter": (lambda: nn.Conv2d(3, 8, 3, padding=1), lambda: _Scale(8)),
    "conv_transpose": (lambda: nn.ConvTranspose2d(3, 8, 3, padding=1), nn.ReLU),
    "conv_subclass": (lambda: _MyConv(3, 8, 3, padding=1), nn.ReLU),
}


def _odd_cnn(kind: str) -> nn.Module:
    torch.manual_seed(0)
    first, odd = _UNSUPPORTED[kind]
    return nn.Sequential(first(), nn.BatchNorm2d(8), odd(), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("kind", sorted(_UNSUPPORTED))
def test_unsupported_module_falls_back_to_apply_plan(kind, randomize_bn, state_guard, monkeypatch):
    model = randomize_bn(_odd_cnn(kind), seed=1)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    space = PruningSpace.from_model(model, x, with_cost=False)
    assert "0" in [g.name for g in space.groups]
    plan = PruningPlan(groups={"0": (0, 2, 3, 7), "3": tuple(range(0, 16, 3))}, fingerprint=space.fingerprint)
    b = ts.Built(kind, model, x, space, None)

    with pytest.raises(ModelError, match="cannot slice"):
        slice_plan(model, plan, space, strict=True)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return apply_plan(*args, **kwargs)

    monkeypatch.setattr(evoprune.prune.slicing, "apply_plan", spy)
    got = _check(b, plan, state_guard)  # the default falls back, and says nothing
    assert len(calls) == 1 and tuple(calls[0][2].shape) == tuple(x.shape)
    assert got[3].in_channels == 4
    # a plan that removes nothing the odd module sees is sliced
    calls.clear()
    _check(b, PruningPlan(groups={"3": (1, 2)}, fingerprint=space.fingerprint), state_guard,
           strict=kind != "unwrapped_parameter")
    assert len(calls) == int(kind == "unwrapped_parameter")  # a bare parameter anywhere: always apply_plan
