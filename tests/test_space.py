"""The family matrix: PruningSpace discovery, physical pruning, masked evaluation and the analytic cost on CIFAR
sized inputs for a range of torchvision families; structural facts about groups and connection units; export;
models torch-pruning can only partly map (ShuffleNetV2's channel shuffle); and the errors from_model raises for
models it cannot handle."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision

import evoprune
from evoprune import ConfigError, ModelError, PlanError, PruningPlan, PruningSpace, apply_plan, masked
from evoprune.deploy import export
from evoprune.errors import UntraceableWarning

pytestmark = pytest.mark.usefixtures("torch_single_thread")
torchvision_models = torchvision.models
NUM_CLASSES = 10
KEEPS = (0.8, 0.5, 0.25)


# ---------------------------------------------------------------------------------------------- model builders
def _inline_vgg16_bn_cifar(num_classes=NUM_CLASSES):
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers, c = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v

    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(512, num_classes)

        def forward(self, x):
            return self.classifier(torch.flatten(self.features(x), 1))

    return VGG()


def _inline_resnet18_cifar(num_classes=NUM_CLASSES):
    model = torchvision_models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


try:  # evoprune.models is the project's own zoo; fall back to inline builders while it is not importable
    from evoprune.models import resnet18_cifar, vgg16_bn_cifar
except Exception:  # pragma: no cover - depends on the state of the tree
    vgg16_bn_cifar, resnet18_cifar = _inline_vgg16_bn_cifar, _inline_resnet18_cifar


def _tv(name, **kw):
    return lambda: getattr(torchvision_models, name)(num_classes=NUM_CLASSES, **kw)


@dataclass(frozen=True)
class Family:
    build: object
    size: int  # input side
    classifier: str  # the module producing the logits: never part of a group
    slow: bool = False
    untraceable: bool = False  # torch-pruning cannot map part of it: from_model warns and leaves that part out


FAMILIES = {
    "vgg16_bn_cifar": Family(lambda: vgg16_bn_cifar(num_classes=NUM_CLASSES), 32, "classifier"),
    "resnet18_cifar": Family(lambda: resnet18_cifar(num_classes=NUM_CLASSES), 32, "fc"),
    "mobilenet_v2": Family(_tv("mobilenet_v2"), 32, "classifier.1"),
    "mobilenet_v3_small": Family(_tv("mobilenet_v3_small"), 32, "classifier.3"),
    "regnet_x_400mf": Family(_tv("regnet_x_400mf"), 32, "fc"),
    "regnet_y_400mf": Family(_tv("regnet_y_400mf"), 32, "fc"),
    "mnasnet0_5": Family(_tv("mnasnet0_5"), 32, "classifier.1"),
    "squeezenet1_1": Family(_tv("squeezenet1_1"), 32, "classifier.1"),
    "googlenet": Family(_tv("googlenet", init_weights=True), 32, "fc"),
    "vgg11_bn": Family(_tv("vgg11_bn"), 32, "classifier.6", slow=True),
    "resnet34": Family(_tv("resnet34"), 32, "fc", slow=True),
    "resnet50": Family(_tv("resnet50"), 32, "fc", slow=True),
    "efficientnet_b0": Family(_tv("efficientnet_b0"), 32, "classifier.1", slow=True),
    "mobilenet_v3_large": Family(_tv("mobilenet_v3_large"), 32, "classifier.3", slow=True),
    "densenet121": Family(_tv("densenet121"), 32, "classifier", slow=True),
    "shufflenet_v2_x0_5": Family(_tv("shufflenet_v2_x0_5"), 32, "fc", untraceable=True),
}


@dataclass
class Built:
    name: str
    model: nn.Module
    x: torch.Tensor
    space: PruningSpace
    out: torch.Tensor  # the unpruned model's output on x


def _make(name: str, randomize_bn) -> Built:
    fam = FAMILIES[name]
    torch.manual_seed(0)
    model = randomize_bn(fam.build(), seed=1).eval()
    x = torch.randn(1, 3, fam.size, fam.size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UntraceableWarning)
        space = PruningSpace.from_model(model, x)
    untraceable = [w for w in caught if issubclass(w.category, UntraceableWarning)]
    # a model torch-pruning maps whole loses nothing to the untraceable-part check; the others warn once
    assert len(untraceable) == int(fam.untraceable), [str(w.message) for w in untraceable]
    return Built(name, model, x, space, out)


_CACHE: dict[str, Built] = {}


def _cached(name: str, randomize_bn) -> Built:
    """The two CIFAR families are used by several tests: build them once per session."""
    if name not in _CACHE:
        _CACHE[name] = _make(name, randomize_bn)
    return _CACHE[name]


@pytest.fixture(scope="module", params=[
    pytest.param(n, marks=[pytest.mark.slow] if f.slow else []) for n, f in FAMILIES.items()])
def family(request, randomize_bn) -> Built:
    name = request.param
    return _cached(name, randomize_bn) if name in ("vgg16_bn_cifar", "resnet18_cifar") else _make(name, randomize_bn)


def _individual(space, keep, random_individual, seed):
    rng = np.random.default_rng(seed)
    genes = random_individual(space, keep, rng, cut=0.3)
    n = space.layout.n_neurons
    if space.units and all(genes[n:]):  # always exercise at least one connection cut
        genes[n + int(rng.integers(len(space.units)))] = 0
    return genes


def _check_plan(b: Built, plan: PruningPlan, state_guard, *, expect_smaller=True):
    """Physical pruning vs. analytic cost vs. masked evaluation, for one plan. Returns (pruned, macs, params)."""
    check_state = state_guard(b.model)
    pruned = apply_plan(b.model, plan, b.x, space=b.space).eval()
    check_state()  # the input model is untouched

    with torch.no_grad():
        y = pruned(b.x)
    assert y.shape == b.out.shape

    macs, params = tp.utils.count_ops_and_params(pruned, b.x)
    assert b.space.cost(plan) == (macs, params)  # exact, not approximately
    if expect_smaller:
        assert params < b.space.base_params and macs < b.space.base_macs

    with torch.no_grad(), masked(b.model, plan, b.space) as m:
        y_masked = m(b.x)
    torch.testing.assert_close(y_masked, y, atol=1e-4, rtol=1e-4)
    # the outputs of these random networks are small: demand that masked/physical disagree far less than pruning
    # changes the output, so that a channel masked in the wrong place cannot hide under atol
    effect = (y - b.out).abs().max().item()
    assert (y_masked - y).abs().max().item() <= 1e-3 * effect + 1e-7, (effect, (y_masked - y).abs().max().item())

    with torch.no_grad():  # masked() restored the model
        torch.testing.assert_close(b.model(b.x), b.out, atol=0, rtol=0)
    check_state()
    return pruned, macs, params


# ---------------------------------------------------------------------------------------------- the matrix
@pytest.mark.slow
@pytest.mark.parametrize("keep", KEEPS)
def test_family_prunes_and_costs_exactly(family, keep, random_individual, state_guard):
    b = family
    genes = _individual(b.space, keep, random_individual, seed=[*map(ord, b.name), int(keep * 100)])
    plan = b.space.decode(genes)
    _check_plan(b, plan, state_guard)


def test_family_space_structure(family):
    b = family
    sp = b.space
    modules = dict(b.model.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    # groups in network order, named after their first member, all real modules
    names = [g.name for g in sp.groups]
    assert names == sorted(names, key=order.get)
    assert len(set(names)) == len(names)
    for g in sp.groups:
        assert g.size >= 2 and g.members[0] == g.name
        assert all(m in modules for m in g.members)
        assert list(g.members) == sorted(g.members, key=order.get)
    # the classifier's output is never a group
    assert FAMILIES[b.name].classifier in modules
    assert all(FAMILIES[b.name].classifier not in g.members for g in sp.groups)
    # units in network order, real modules
    assert [u.name for u in sp.units] == sorted((u.name for u in sp.units), key=order.get)
    assert all(u.kind in ("residual", "sequential") and all(m in modules for m in u.modules) for u in sp.units)
    # layout
    lay = sp.layout
    assert lay.n_neurons == sum(g.size for g in sp.groups)
    assert lay.n_connections == len(sp.units)
    assert len(sp) == lay.n_neurons + lay.n_connections
    for i, g in enumerate(sp.groups):
        s = lay.group_slice(i)
        assert s.stop - s.start == g.size
    # the full plan costs what torch-pruning counts on the unpruned model, and is the all-ones individual
    assert sp.cost(sp.full_plan()) == tp.utils.count_ops_and_params(b.model, b.x)
    assert sp.encode(sp.full_plan()) == lay.ones()
    assert sp.decode(lay.ones()) == sp.full_plan()


# ---------------------------------------------------------------------------------------------- structural facts
@pytest.fixture(scope="module")
def vgg(randomize_bn) -> Built:
    return _cached("vgg16_bn_cifar", randomize_bn)


@pytest.fixture(scope="module")
def resnet(randomize_bn) -> Built:
    return _cached("resnet18_cifar", randomize_bn)


def test_resnet_identity_blocks_are_units_downsample_blocks_are_not(resnet):
    units = {u.name: u for u in resnet.space.units}
    assert units["layer1.0"].kind == "residual" and units["layer1.0"].modules == ("layer1.0",)
    assert "layer2.0" not in units and "layer3.0" not in units and "layer4.0" not in units
    assert set(units) == {"layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"}
    # the stem, the residual groups and the inner block convs are groups; fc is not
    names = [g.name for g in resnet.space.groups]
    assert names[0] == "conv1" and "fc" not in names
    stem = resnet.space.group("conv1")  # the stem is tied to layer1's residual adds
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2"} <= set(stem.members)


def test_vgg_equal_width_convs_are_sequential_units(vgg):
    units = {u.name: u for u in vgg.space.units}
    u = units["features.3"]
    assert u.kind == "sequential"
    assert u.modules == ("features.3", "features.4", "features.5")
    assert u.in_group == "features.0" and u.out_group == "features.3"
    assert "features.0" not in units and "features.7" not in units  # 3->64 and 64->128 change the width
    assert len(vgg.space.groups) == 13 and [g.size for g in vgg.space.groups][:4] == [64, 64, 128, 128]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["vgg", "resnet"])
def test_cutting_each_unit_lowers_macs_and_cost_still_matches(which, request, state_guard):
    b = request.getfixturevalue(which)
    sp = b.space
    base_macs = sp.base_macs
    for u in sp.units:
        plan = PruningPlan(connections={u.name: False}, fingerprint=sp.fingerprint)
        _, macs, params = _check_plan(b, plan, state_guard)
        assert macs < base_macs and params < sp.base_params, u.name
    # all units at once, together with channel pruning
    genes = sp.layout.ones()
    genes[sp.layout.n_neurons:] = [0] * len(sp.units)
    rng = np.random.default_rng(5)
    for i, g in enumerate(sp.groups):
        sl = sp.layout.group_slice(i)
        drop = rng.choice(g.size, g.size // 2, replace=False)
        for k in drop:
            genes[sl.start + int(k)] = 0
    all_cut = sp.decode(genes)
    _, macs_all, _ = _check_plan(b, all_cut, state_guard)
    genes[sp.layout.n_neurons:] = [1] * len(sp.units)
    _, macs_none, _ = _check_plan(b, sp.decode(genes), state_guard)
    assert macs_all < macs_none


def test_cut_sequential_unit_width_follows_its_input_group(vgg):
    sp = vgg.space
    plan = PruningPlan(groups={"features.0": tuple(range(10))}, connections={"features.3": False})
    widths = sp.widths(plan)
    assert widths["features.0"] == 10 and widths["features.3"] == 10  # bypassed: fed by features.0 directly
    assert widths["features.7"] == 128


# ---------------------------------------------------------------------------------------------- export
_SUBPROCESS = textwrap.dedent("""
    import sys

    class NoEvoprune:  # evoprune may be installed (CI installs it): make every evoprune import fail here
        def find_spec(self, name, path=None, target=None):
            if name == "evoprune" or name.startswith("evoprune."):
                raise ImportError("evoprune is blocked in this interpreter")
    sys.meta_path.insert(0, NoEvoprune())
    try:
        import evoprune
    except ImportError:
        pass
    else:
        sys.exit("evoprune must not be importable here, found " + evoprune.__file__)
    import torch
    io = torch.load("io.pt", weights_only=True)
    if sys.argv[1].endswith(".onnx"):
        import onnxruntime as ort
        sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
        model = lambda x: torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    else:  # .pt2: an ExportedProgram, exported in eval mode
        model = torch.export.load(sys.argv[1]).module()
    with torch.no_grad():
        for x, want in ((io["x"], io["y"]), (io["x3"], io["y3"])):
            got = model(x)
            assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
            diff = (got - want).abs().max().item()
            assert diff <= 1e-4, diff
    print("reloaded ok")
""")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["vgg", "resnet"])
def test_export_pruned_model(which, request, tmp_path, random_individual):
    b = request.getfixturevalue(which)
    sp = b.space
    plan = sp.decode(_individual(sp, 0.5, random_individual, seed=11))
    pruned = apply_plan(b.model, plan, b.x, space=sp).eval()
    x3 = torch.randn(3, *b.x.shape[1:], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, y3 = pruned(b.x), pruned(x3)

    paths = export(pruned, tmp_path / "pruned.pt", b.x, plan=plan, widths=sp.widths(plan))
    assert set(paths) == {"pt", "pt2", "onnx", "card"}  # the defaults: Python .pt, the two deployment formats
    assert {k: Path(v).name for k, v in paths.items()} == {
        "pt": "pruned.pt", "pt2": "pruned.pt2", "onnx": "pruned.onnx", "card": "pruned.json"}
    assert all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in paths.values())
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes left nothing behind

    # the .pt2 and the .onnx run in a fresh interpreter that cannot import evoprune, at batch 1 and 3
    torch.save({"x": b.x, "y": y, "x3": x3, "y3": y3}, tmp_path / "io.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    for fmt in ("pt2", "onnx"):
        proc = subprocess.run([sys.executable, "-c", _SUBPROCESS, Path(paths[fmt]).name], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, fmt + ": " + proc.stdout + proc.stderr
        assert "reloaded ok" in proc.stdout

    # the full module reloads (trusted file) and computes the same
    full = torch.load(paths["pt"], weights_only=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(x3), y3, atol=0, rtol=0)
    assert sum(p.numel() for p in full.parameters()) == sp.cost(plan)[1]

    # ONNX with a dynamic batch
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(paths["onnx"], providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x3.numpy()})[0]
    np.testing.assert_allclose(got, y3.numpy(), atol=1e-4, rtol=1e-4)

    # the model card
    card = json.loads(Path(paths["card"]).read_text())
    for key in ("input_shape", "macs", "params", "bytes", "plan", "evoprune_version", "group_widths"):
        assert key in card, key
    assert card["input_shape"] == list(b.x.shape)
    assert (card["macs"], card["params"]) == sp.cost(plan)
    assert card["bytes"] == sum(t.numel() * t.element_size() for t in [*pruned.parameters(), *pruned.buffers()])
    assert card["evoprune_version"] == evoprune.__version__
    assert PruningPlan.from_dict(card["plan"]) == plan
    assert card["group_widths"] == sp.widths(plan)


# ---------------------------------------------------------------------------------------------- failures
def _small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


# ---------------------------------------------------------------------------------------------- untraceable parts
# ShuffleNetV2's channel_shuffle (view to 5-D, transpose, view back) is a function torch-pruning cannot map: it
# divides by zero on some shuffles and passes the others' channels straight through, and ``chunk`` gets offsets for
# the wrong sizes. The groups reaching those ops are left out, with one warning; the rest is pruned exactly.
SHUFFLE_LEFT_OUT = [  # the convs whose outputs feed a shuffle (or, depthwise, are coupled to one)
    "stage2.0.branch1.2", *[f"stage2.{i}.branch2.5" for i in range(4)],
    "stage3.0.branch1.0", "stage3.0.branch1.2", *[f"stage3.{i}.branch2.5" for i in range(8)],
    "stage4.0.branch1.0", "stage4.0.branch1.2", *[f"stage4.{i}.branch2.5" for i in range(4)],
]
SHUFFLE_GROUPS = ["conv1.0", *[f"stage2.{i}.branch2.0" for i in range(4)],
                  *[f"stage3.{i}.branch2.0" for i in range(8)],
                  *[f"stage4.{i}.branch2.0" for i in range(4)], "conv5.0"]


def _shufflenet():
    torch.manual_seed(0)
    return torchvision_models.shufflenet_v2_x0_5(num_classes=NUM_CLASSES).eval()


@pytest.fixture(scope="module")
def shufflenet(randomize_bn) -> Built:
    return _make("shufflenet_v2_x0_5", randomize_bn)


def test_shufflenet_untraceable_parts_are_left_out_with_one_warning():
    model, x = _shufflenet(), torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp = PruningSpace.from_model(model, x)
    found = [w for w in caught if issubclass(w.category, UntraceableWarning)]
    assert len(found) == 1 and issubclass(UntraceableWarning, UserWarning)
    assert found[0].filename == __file__  # it points at the caller of from_model
    message = str(found[0].message)
    assert "ShuffleNetV2" in message and "torch-pruning cannot map channels" in message
    assert "stage2.0" in message and "stage4.3" in message  # where the untraceable ops run
    for layer in SHUFFLE_LEFT_OUT:
        assert layer in message
    assert f"the other {len(SHUFFLE_GROUPS)} group(s) are pruned" in message.lower()
    # the left-out layers produce channels of no group; the rest is an ordinary space
    assert [g.name for g in sp.groups] == SHUFFLE_GROUPS
    members = {m for g in sp.groups for m in g.members}
    assert not members & set(SHUFFLE_LEFT_OUT)
    assert sp.group("conv5.0").size == 1024 and sp.group("stage4.0.branch2.0").size == 96
    assert sp.cost(sp.full_plan()) == tp.utils.count_ops_and_params(model, x)


def test_untraceable_build_restores_torch_pruning():
    from torch_pruning.dependency import index_mapping

    from evoprune.space import graph as trace
    before = {n: getattr(index_mapping, n) for n in dir(index_mapping) if n.startswith("update_")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntraceableWarning)
        PruningSpace.from_model(_shufflenet(), torch.randn(1, 3, 32, 32))
    assert {n: getattr(index_mapping, n) for n in before} == before  # the patch lasts for the build only
    with pytest.raises(RuntimeError):  # a build that fails restores it too, and releases the lock
        trace.build(nn.Linear(2, 2), torch.randn(1, 3))
    assert {n: getattr(index_mapping, n) for n in before} == before
    assert not trace.build(_small_cnn(), torch.randn(1, 3, 8, 8)).untraceable


@pytest.mark.slow
def test_shufflenet_half_plan_prunes_costs_exactly_and_exports(shufflenet, random_individual, state_guard,
                                                               tmp_path):
    b = shufflenet
    plan = b.space.decode(random_individual(b.space, 0.5, np.random.default_rng(7)))
    assert all(len(plan.groups[g.name]) == g.size // 2 for g in b.space.groups)
    pruned, macs, params = _check_plan(b, plan, state_guard)  # smaller, runs, exact cost, masked == physical
    assert params < 0.8 * b.space.base_params and macs < 0.8 * b.space.base_macs
    assert pruned.conv5[0].out_channels == 512 and pruned.stage3[2].branch2[0].out_channels == 24
    assert pruned.stage3[2].branch2[5].out_channels == 48  # left out: never pruned
    x3 = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y3 = pruned(x3)
    paths = export(pruned, tmp_path / "shuffle.pt", b.x, formats=("pt", "torchscript"), plan=plan,
                   widths=b.space.widths(plan))
    assert set(paths) == {"pt", "torchscript", "card"}
    full = torch.load(paths["pt"], weights_only=False).eval()
    scripted = torch.jit.load(paths["torchscript"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(full(x3), y3, atol=0, rtol=0)
        torch.testing.assert_close(scripted(x3), y3, atol=1e-5, rtol=1e-5)
    card = json.loads(Path(paths["card"]).read_text())
    assert (card["macs"], card["params"]) == b.space.cost(plan) == (macs, params)


@pytest.mark.slow
def test_shufflenet_search_runs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 32, 32, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (16,), generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntraceableWarning)
        result = evoprune.search(_shufflenet(), x[:1], x, y, recal_x=[x[:8]], rounds=1, generations=1,
                                 population=4, elites=2, target=0.8, seed=0, verbose=False, progress=False)
    row = result.rows[0]
    assert row["macs"] <= row["budget"] + 1e-6 and row["params"] < result.baseline["params"]
    with torch.no_grad():
        assert result.model(x[:2]).shape == (2, NUM_CLASSES)


class _Shuffled(nn.Module):
    """Every conv's output goes through a channel shuffle: nothing torch-pruning can map remains."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    @staticmethod
    def shuffle(x):
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)

    def forward(self, x):
        x = self.shuffle(torch.relu(self.bn1(self.conv1(x))))
        x = self.shuffle(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


def test_nothing_traceable_left_is_a_model_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntraceableWarning)  # an error, not a warning and then an error
        with pytest.raises(ModelError, match="torch-pruning cannot map channels") as info:
            PruningSpace.from_model(_Shuffled().eval(), torch.randn(1, 3, 8, 8))
    message = str(info.value)
    assert "_Shuffled" in message and "conv1" in message and "conv2" in message and "Nothing prunable" in message


def test_a_shuffle_leaves_the_rest_of_a_small_model_prunable(random_individual, state_guard):
    class Model(_Shuffled):
        def forward(self, x):
            x = self.shuffle(torch.relu(self.bn1(self.conv1(x))))
            return self.fc(torch.relu(self.bn2(self.conv2(x))).mean((2, 3)))

    torch.manual_seed(0)
    model, x = Model().eval(), torch.randn(1, 3, 8, 8)
    with pytest.warns(UntraceableWarning, match=r"keep their width: conv1\. The other 1 group"):
        sp = PruningSpace.from_model(model, x)
    assert [g.name for g in sp.groups] == ["conv2"]
    with torch.no_grad():
        out = model(x)
    b = Built("shuffled", model, x, sp, out)
    pruned, _, _ = _check_plan(b, sp.decode(random_individual(sp, 0.5, np.random.default_rng(0))), state_guard)
    assert pruned.conv1.out_channels == 8 and pruned.conv2.out_channels == 4


def _cbr(i, o):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())


class _ConstantCat(nn.Module):
    """A constant concatenated in front: torch-pruning sizes the concat from its traced inputs only and maps a's
    channels to the constant's slots (it prunes the wrong inputs of b without a word)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = _cbr(3, 8), _cbr(12, 8), nn.Linear(8, 3)

    def forward(self, x):
        y = self.a(x)
        return self.fc(self.b(torch.cat([torch.ones(y.shape[0], 4, *y.shape[2:]), y], 1)).mean((2, 3)))


class _SecondHalf(nn.Module):
    """Only the second half of a chunk is used: torch-pruning gives it the first half's offsets (and raises)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.fc = _cbr(3, 8), _cbr(4, 6), _cbr(8, 6), nn.Linear(12, 3)

    def forward(self, x):
        y = self.a(x)
        _, second = y.chunk(2, 1)
        return self.fc(torch.cat([self.b(second), self.c(y)], 1).mean((2, 3)))


@pytest.mark.parametrize("cls, op, kept", [(_ConstantCat, "CatBackward0", ["b.0"]),
                                           (_SecondHalf, "SplitBackward0", ["b.0", "c.0"])])
def test_concats_and_splits_torch_pruning_maps_wrongly_are_left_out(cls, op, kept, randomize_bn,
                                                                     random_individual, state_guard):
    torch.manual_seed(0)
    model, x = randomize_bn(cls(), seed=1).eval(), torch.randn(1, 3, 8, 8)
    with pytest.warns(UntraceableWarning, match=rf"\({op}\) in {cls.__name__}.forward .* keep their width: a\.0\."):
        sp = PruningSpace.from_model(model, x)
    assert [g.name for g in sp.groups] == kept
    with torch.no_grad():
        out = model(x)
    plan = sp.decode(random_individual(sp, 0.5, np.random.default_rng(0)))
    pruned, _, _ = _check_plan(Built(cls.__name__, model, x, sp, out), plan, state_guard)
    assert pruned.a[0].out_channels == 8


def test_nothing_prunable_is_a_model_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    with pytest.raises(ModelError, match="nothing prunable"):
        PruningSpace.from_model(model, torch.randn(1, 3, 2, 2))


def test_wrong_input_shape_is_a_model_error():
    with pytest.raises(ModelError, match=r"cannot run on inputs of shape \(1, 1, 16, 16\)"):
        PruningSpace.from_model(_small_cnn(), torch.randn(1, 1, 16, 16))


def test_apply_plan_with_inputs_unlike_the_space_is_a_model_error():
    model, x = _small_cnn(), torch.randn(1, 3, 16, 16)
    sp = PruningSpace.from_model(model, x)
    with pytest.raises(ModelError, match="space was built for"):
        apply_plan(model, sp.full_plan(), torch.randn(1, 3, 20, 20), space=sp)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_a_model_error(value):
    model = _small_cnn()
    with torch.no_grad():
        model[3].weight[0, 0, 0, 0] = value
    with pytest.raises(ModelError, match=r"3\.weight contains NaN or inf"):
        PruningSpace.from_model(model, torch.randn(1, 3, 16, 16))


def test_non_tensor_inputs_and_non_modules_are_model_errors():
    with pytest.raises(ModelError):
        PruningSpace.from_model(_small_cnn(), [torch.randn(1, 3, 16, 16)])
    with pytest.raises(ModelError):
        PruningSpace.from_model(lambda x: x, torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("bad", [nn.Conv2d, nn.Conv2d(3, 8, 3), "no.such.layer"])
def test_ignored_layers_rejects_types_and_foreign_layers(bad):
    with pytest.raises(ConfigError):
        PruningSpace.from_model(_small_cnn(), torch.randn(1, 3, 16, 16), ignored_layers=[bad])


def test_ignored_layers_type_message_suggests_instances():
    with pytest.raises(ConfigError, match="not types"):
        PruningSpace.from_model(_small_cnn(), torch.randn(1, 3, 16, 16), ignored_layers=[nn.Conv2d])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["instance", "name"])
def test_ignored_layer_channels_stay_out_of_the_space(resnet, how, random_individual, state_guard):
    model, x = resnet.model, resnet.x
    layer = model.layer1[0].conv1 if how == "instance" else "layer1.0.conv1"
    sp = PruningSpace.from_model(model, x, ignored_layers=[layer])
    assert all("layer1.0.conv1" not in g.members for g in sp.groups)
    assert {g.name for g in sp.groups} == {g.name for g in resnet.space.groups} - {"layer1.0.conv1"}
    # a plan in this space never touches the ignored conv's outputs, and costs stay exact
    b = Built("resnet18_cifar", model, x, sp, resnet.out)
    genes = _individual(sp, 0.5, random_individual, seed=21)
    genes[sp.layout.n_neurons + [u.name for u in sp.units].index("layer1.0")] = 1  # keep the block alive
    plan = sp.decode(genes)
    pruned, _, _ = _check_plan(b, plan, state_guard)
    assert pruned.layer1[0].conv1.out_channels == 64
    # the ignored group's name is now unknown to the space
    with pytest.raises(PlanError, match="unknown group 'layer1.0.conv1'"):
        sp.validate(PruningPlan(groups={"layer1.0.conv1": (0, 1)}))


def test_the_pruned_model_shares_no_memory_with_the_input(vgg, random_individual, state_guard):
    b = vgg
    check = state_guard(b.model)
    genes = _individual(b.space, 0.99, random_individual, seed=2)  # most tensors untouched by pruning
    pruned = apply_plan(b.model, b.space.decode(genes), b.x, space=b.space)
    original = {t.untyped_storage().data_ptr() for t in list(b.model.parameters()) + list(b.model.buffers())}
    assert not [n for n, t in list(pruned.named_parameters()) + list(pruned.named_buffers())
                if t.untyped_storage().data_ptr() in original]
    with torch.no_grad():
        for t in list(pruned.parameters()) + list(pruned.buffers()):
            t.zero_()  # scribbling on the copy...
    check()  # ...leaves the input model as it was
