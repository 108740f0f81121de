"""evoprune.reconstruct: the closed-form layer refit after surgery (bias compensation and least squares)."""
from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import torch_pruning as tp

import evoprune
from evoprune import (ConfigError, DataError, PlanError, PruningPlan, PruningSpace, ReconstructionWarning, TeacherGrams,
                      reconstruct, slice_plan)

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ---------------------------------------------------------------------------------------------- models
class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv_b, self.bn_b = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(x + self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x))))))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.pw(self.dw(self.stem(x))).mean((2, 3)))


def _duplicate(modules, src, dst):
    """Make output channels ``dst`` of each module in ``modules`` exact copies of channels ``src`` (weights, biases,
    BN affine and statistics): the removed channels are then exact linear combinations of kept ones."""
    with torch.no_grad():
        for m in modules:
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, name, None)
                if t is not None:
                    t[dst] = t[src]


def _redundant(kind, randomize_bn):
    torch.manual_seed(0)
    model = {"plain": Plain, "residual": Residual, "depthwise": Depthwise}[kind]()
    randomize_bn(model)
    src, dst = [0, 1, 2, 3], [4, 5, 6, 7]
    if kind == "plain":
        _duplicate([model.features[0], model.features[1]], src, dst)
        group_root = "features.0"
    elif kind == "residual":
        _duplicate([model.block.conv_a, model.block.bn_a], src, dst)
        group_root = "block.conv_a"
    else:
        _duplicate([model.stem[0], model.stem[1], model.dw[0], model.dw[1]], src, dst)
        group_root = "stem.0"
    return model.eval(), group_root


def _plan_dropping(space, root, drop):
    groups = {}
    for g in space.groups:
        keep = tuple(i for i in range(g.size) if not (root in g.members and i in drop))
        groups[g.name] = keep
    plan = PruningPlan(groups, {u.name: True for u in space.units}, fingerprint=space.fingerprint)
    assert any(len(k) < g.size for g, k in zip(space.groups, groups.values())), "the plan removes nothing"
    return plan


def _images(n=64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 3, 12, 12, generator=gen) for _ in range(n // 32)]


def _rel_err(a, b):
    return float((a - b).pow(2).mean() / b.pow(2).mean())


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["plain", "residual", "depthwise"])
def test_lsq_recovers_removed_channels_that_are_combinations_of_kept_ones(kind, randomize_bn, state_guard):
    teacher, root = _redundant(kind, randomize_bn)
    x = torch.randn(1, 3, 12, 12)
    space = PruningSpace.from_model(teacher, x)
    plan = _plan_dropping(space, root, {4, 5, 6, 7})
    pruned = slice_plan(teacher, plan, space)
    check = state_guard(teacher)
    test_x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = teacher(test_x)
        before = _rel_err(pruned(test_x), want)
        refit = reconstruct(teacher, pruned, plan, space, _images(), "lsq", ridge=1e-10)
        got = refit(test_x)
    check()  # the teacher is never modified
    assert before > 1e-3  # the cut mattered
    assert _rel_err(got, want) < 1e-7  # float32 products, float64 sums
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert refit is not pruned  # a copy by default; the input model keeps its weights
    count = lambda m: tp.utils.count_ops_and_params(m, x)  # noqa: E731
    assert count(refit) == count(pruned)  # a bias-free conv's bias folds into its BN: no parameter is added
    with torch.no_grad():
        assert _rel_err(pruned(test_x), want) == pytest.approx(before)


def test_teacher_grams_refit_recovers_redundant_channels(randomize_bn):
    teacher, root = _redundant("plain", randomize_bn)
    x = torch.randn(1, 3, 12, 12)
    space = PruningSpace.from_model(teacher, x)
    plan = _plan_dropping(space, root, {4, 5, 6, 7})
    grams = TeacherGrams.collect(teacher, space, _images(), ridge=1e-10)
    net = grams.refit(teacher, slice_plan(teacher, plan, space), plan, space)
    test_x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(net(test_x), teacher(test_x), rtol=1e-4, atol=1e-4)


def test_bias_matches_the_teachers_channel_means(randomize_bn):
    teacher, root = _redundant("plain", randomize_bn)
    x = torch.randn(1, 3, 12, 12)
    space = PruningSpace.from_model(teacher, x)
    plan = _plan_dropping(space, root, {5, 6, 7})
    images = _images()
    net = reconstruct(teacher, slice_plan(teacher, plan, space), plan, space, images, "bias")
    conv_t, conv_p = teacher.features[4], net.features[4]  # the BN after the refit conv (it takes the bias)
    assert net.features[3].bias is None and net.fc.bias is not None
    outs = {}
    for name, (model, conv) in {"t": (teacher, conv_t), "p": (net, conv_p)}.items():
        h = conv.register_forward_hook(lambda m, a, y, name=name: outs.setdefault(name, []).append(y))
        with torch.no_grad():
            for b in images:
                model(b)
        h.remove()
    mean_t = torch.cat(outs["t"]).mean((0, 2, 3))
    mean_p = torch.cat(outs["p"]).mean((0, 2, 3))
    torch.testing.assert_close(mean_p, mean_t, rtol=1e-4, atol=1e-5)


def test_a_layer_after_a_cut_unit_is_refit_and_helps(randomize_bn):
    torch.manual_seed(0)
    teacher = randomize_bn(Residual()).eval()
    x = torch.randn(1, 3, 12, 12)
    space = PruningSpace.from_model(teacher, x)
    assert space.units, "the residual block is a connection unit"
    plan = PruningPlan({g.name: tuple(range(g.size)) for g in space.groups},
                       {u.name: False for u in space.units}, fingerprint=space.fingerprint)
    pruned = slice_plan(teacher, plan, space)
    images = _images(128)
    refit = reconstruct(teacher, pruned, plan, space, images, "lsq")
    assert not torch.equal(refit.fc.weight, pruned.fc.weight)  # nothing lost channels: the cut alone triggers it
    with torch.no_grad():
        test_x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(7))
        assert _rel_err(refit(test_x), teacher(test_x)) < _rel_err(pruned(test_x), teacher(test_x))


def test_full_plan_and_none_leave_the_model_as_it_is(randomize_bn):
    teacher, _ = _redundant("plain", randomize_bn)
    space = PruningSpace.from_model(teacher, torch.randn(1, 3, 12, 12))
    net = reconstruct(teacher, slice_plan(teacher, space.full_plan(), space), space.full_plan(), space, _images())
    for a, b in zip(net.parameters(), teacher.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- labels, errors
class _Untouchable:
    """A label object that fails on any use: the refit must never read labels."""

    def __getattr__(self, name):
        raise AssertionError(f"labels were read ({name})")


def test_labels_are_never_read(randomize_bn):
    teacher, root = _redundant("plain", randomize_bn)
    space = PruningSpace.from_model(teacher, torch.randn(1, 3, 12, 12))
    plan = _plan_dropping(space, root, {4, 5})
    pruned = slice_plan(teacher, plan, space)
    images = _images()
    only = reconstruct(teacher, pruned, plan, space, images, "lsq")
    paired = reconstruct(teacher, pruned, plan, space, [(b, _Untouchable()) for b in images], "lsq")
    for a, b in zip(only.parameters(), paired.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batches, error, match", [
    ([], DataError, "needs calibration images"),
    ([torch.randn(4, 3, 8, 8)], DataError, r"shape \(3, 8, 8\) per sample"),
    ([torch.full((4, 3, 12, 12), float("nan"))], DataError, "NaN or infinite"),
    ([torch.zeros(4, 3, 12, 12, dtype=torch.long)], DataError, "float image tensors"),
])
def test_bad_calibration_images_are_refused(batches, error, match, randomize_bn):
    teacher, root = _redundant("plain", randomize_bn)
    space = PruningSpace.from_model(teacher, torch.randn(1, 3, 12, 12))
    plan = _plan_dropping(space, root, {4})
    with pytest.raises(error, match=match):
        reconstruct(teacher, slice_plan(teacher, plan, space), plan, space, batches)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "ols"}, "method must be one of none, bias, lsq"),
    ({"positions": 0}, "positions must be an int >= 1"),
    ({"ridge": 0.0}, "ridge must be 'auto' or a positive number"),
])
def test_bad_settings_are_refused(kwargs, match, randomize_bn):
    teacher, root = _redundant("plain", randomize_bn)
    space = PruningSpace.from_model(teacher, torch.randn(1, 3, 12, 12))
    plan = _plan_dropping(space, root, {4})
    with pytest.raises(ConfigError, match=match):
        reconstruct(teacher, slice_plan(teacher, plan, space), plan, space, _images(), **kwargs)


def test_a_plan_of_another_space_is_refused(randomize_bn):
    teacher, _ = _redundant("plain", randomize_bn)
    space = PruningSpace.from_model(teacher, torch.randn(1, 3, 12, 12))
    with pytest.raises(PlanError):
        reconstruct(teacher, teacher, "not a plan", space, _images())


def test_too_few_images_fall_back_to_bias_with_a_warning_naming_the_layer(randomize_bn):
    teacher, root = _redundant("plain", randomize_bn)
    space = PruningSpace.from_model(teacher, torch.randn(1, 3, 12, 12))
    plan = _plan_dropping(space, root, {4, 5})
    few = [torch.randn(1, 3, 12, 12)]  # 16 positions for 6 * 9 + 1 unknowns
    with pytest.warns(ReconstructionWarning, match=r"features\.3: 16 calibration samples for \d+ unknowns"):
        net = reconstruct(teacher, slice_plan(teacher, plan, space), plan, space, few, "lsq")
    assert torch.isfinite(net(torch.randn(2, 3, 12, 12))).all()


# ---------------------------------------------------------------------------------------------- deployment
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs evoprune[onnx]")
def test_a_reconstructed_model_exports_and_reloads(randomize_bn, tmp_path):
    import onnxruntime as ort
    teacher, root = _redundant("residual", randomize_bn)
    x = torch.randn(1, 3, 12, 12)
    space = PruningSpace.from_model(teacher, x)
    plan = _plan_dropping(space, root, {4, 5, 6})
    net = reconstruct(teacher, slice_plan(teacher, plan, space), plan, space, _images(), "lsq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = evoprune.export(net, tmp_path / "refit.pt", x, plan=plan)
        test_x = torch.randn(4, 3, 12, 12)
        want = net(test_x).detach().numpy()
        session = ort.InferenceSession(files["onnx"], providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: test_x.numpy()})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        program = torch.export.load(files["pt2"]).module()
        np.testing.assert_allclose(program(test_x).detach().numpy(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- in the pipeline
def _labelled_by(teacher, n=256, seed=3):
    x = torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, teacher(x).argmax(1)


def test_refit_aware_fitness_scores_a_recoverable_plan_as_the_teacher(randomize_bn):
    teacher, root = _redundant("plain", randomize_bn)
    space = PruningSpace.from_model(teacher, torch.randn(1, 3, 12, 12))
    plan = _plan_dropping(space, root, {4, 5, 6, 7})
    sx, sy = _labelled_by(teacher)
    scores = {}
    for how in ("none", "lsq"):
        ev = evoprune.Evaluator(teacher, space, sx, sy, _images(128), evoprune.FitnessConfig(reconstruct=how))
        scores[how] = ev(space.encode(plan))[0]
        ev.release()
    assert scores["lsq"] == pytest.approx(1.0)  # the teacher's own labels: the refit restores it exactly
    assert scores["none"] < scores["lsq"]


@pytest.mark.parametrize("kwargs, match", [
    ({"reconstruct": "bias"}, "fitness reconstruct must be 'none' or 'lsq'"),
    ({"reconstruct": "lsq", "bn_recalibration": False}, "turn bn_recalibration on"),
])
def test_fitness_reconstruct_settings_are_checked(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        evoprune.FitnessConfig(**kwargs).check()


@pytest.mark.slow
def test_search_reconstructs_each_round_and_records_it(trained_tiny):
    from evoprune.data import normalize
    model, data = trained_tiny(512, 256, data_seed=3, epochs=2)
    val = normalize(data.val.images, *data.val.stats)
    x, y = val[:128], data.val.labels[:128]
    recal = [normalize(data.train.images[i:i + 64], *data.train.stats) for i in range(0, 256, 64)]
    kw = dict(rounds=2, generations=1, population=4, elites=2, target=0.4, verbose=False, progress=False)
    rows = {}
    for how in ("none", "lsq"):
        res = evoprune.search(model, x[:1], x, y, recal_x=recal, reconstruct=how, seed=0,
                              report=lambda m: float((m(val[128:]).argmax(1) ==
                                                      data.val.labels[128:]).float().mean()), **kw)
        rows[how] = res.rows
    assert [r["reconstruct"] for r in rows["lsq"]] == ["lsq", "lsq"]
    assert all(r["reconstruct_s"] > 0 for r in rows["lsq"]) and all(r["reconstruct_s"] == 0 for r in rows["none"])
    assert all(r["bn_recalibrated"] is True for r in rows["none"])  # reconstruct="none": BN re-calibration only
    assert all(isinstance(r["bn_recalibrated"], bool) for r in rows["lsq"])  # kept only where it scores higher


def test_search_reconstruct_needs_calibration_images():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 2))
    x = torch.randn(8, 3, 12, 12)
    with pytest.raises(ConfigError, match="needs calibration images") as info:
        evoprune.search(model, x[:1], x, torch.zeros(8, dtype=torch.long), recal_x=None, verbose=False,
                        progress=False, fitness=evoprune.FitnessConfig(bn_recalibration=False))
    assert info.value.setting == "reconstruct"


def test_non_finite_activations_are_refused_naming_the_layer(randomize_bn):
    teacher, root = _redundant("plain", randomize_bn)
    space = PruningSpace.from_model(teacher, torch.randn(1, 3, 12, 12))
    plan = _plan_dropping(space, root, {4, 5})
    pruned = slice_plan(teacher, plan, space)
    with torch.no_grad():
        pruned.features[0].weight.mul_(1e38)  # finite weights whose activations overflow
    with pytest.raises(evoprune.ModelError, match=r"non-finite activations reach features\.3"):
        reconstruct(teacher, pruned, plan, space, _images(), "lsq")
