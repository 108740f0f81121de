"""Model builders, the registry and strict weight loading."""
from pathlib import Path

import pytest
import torch
from torch import nn

from evoprune.errors import CheckpointError, ConfigError, ModelError
from evoprune.models import (MODELS, VGG16_CFG, build, load_weights, resnet18_cifar, tiny_cnn,
                             vgg11_bn_cifar, vgg16_bn_cifar, vgg_cifar)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEACHER = SHARED / "models" / "vgg16_bn_cifar10.pt"


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_vgg16_bn_layout_and_size():
    model = vgg16_bn_cifar()
    assert count_parameters(model) == 14_724_042
    assert len(model.features) == 44
    assert isinstance(model.features[0], nn.Conv2d) and model.features[0].bias is None
    assert isinstance(model.features[1], nn.BatchNorm2d) and isinstance(model.features[2], nn.ReLU)
    assert isinstance(model.features[6], nn.MaxPool2d) and isinstance(model.features[43], nn.MaxPool2d)
    assert model.classifier.in_features == 512
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_builders():
    assert count_parameters(vgg_cifar(VGG16_CFG, 10)) == 14_724_042
    assert vgg16_bn_cifar(num_classes=100).classifier.out_features == 100
    vgg11 = vgg11_bn_cifar().eval()
    assert sum(isinstance(m, nn.Conv2d) for m in vgg11.modules()) == 8
    assert vgg11(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ConfigError):
        vgg_cifar([64, "X"], 10)


@pytest.mark.skipif(not TEACHER.is_file(), reason=f"the shared teacher weights are not at {TEACHER}")
def test_vgg16_bn_loads_the_shared_teacher_strictly():
    model = vgg16_bn_cifar()
    state = torch.load(TEACHER, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    assert load_weights(vgg16_bn_cifar(), TEACHER).state_dict().keys() == state.keys()
    assert torch.equal(model.classifier.weight, state["classifier.weight"])
    with pytest.raises(ModelError, match="missing key"):
        load_weights(vgg11_bn_cifar(), TEACHER)
    with pytest.raises(ModelError, match=r"classifier.weight: shape \(10, 512\) in the file, \(100, 512\)"):
        load_weights(vgg16_bn_cifar(num_classes=100), TEACHER)


def test_load_weights_round_trip_and_errors(tmp_path):
    source = tiny_cnn()
    torch.save(source.state_dict(), tmp_path / "tiny.pt")
    target = load_weights(tiny_cnn(), tmp_path / "tiny.pt")
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(ModelError, match="shape"):
        load_weights(tiny_cnn(width=8), tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError):
        load_weights(tiny_cnn(), tmp_path / "missing.pt")


def test_resnet18_cifar():
    model = resnet18_cifar().eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_tv_is_torchvisions_resnet18_with_its_imagenet_stem():
    from evoprune.models import resnet18_tv
    model = resnet18_tv().eval()
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert count_parameters(model) == 11_181_642  # the shared teacher's parameter count (../shared/models)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_shared_resnet18_teacher_loads_strictly_into_resnet18_tv():
    from pathlib import Path
    from evoprune.models import resnet18_tv
    path = Path(__file__).resolve().parents[2] / "shared" / "models" / "resnet18_tv_cifar10.pt"
    if not path.is_file():
        pytest.skip("../shared/models/resnet18_tv_cifar10.pt is not beside the repository")
    model = load_weights(resnet18_tv(), path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    mine = model.state_dict()
    assert set(mine) == set(state) and all(torch.equal(mine[k], state[k]) for k in mine)  # every tensor, as saved


def test_tiny_cnn_has_two_cuttable_conv_runs_and_still_classifies_with_both_cut():
    """What the tests use it for: a small network (under 30 k params) whose two shape-preserving conv runs are
    connection units, so that a plan can cut them and the model still runs."""
    from evoprune import PruningSpace, slice_plan
    model = tiny_cnn().eval()
    x = torch.randn(2, 3, 16, 16)
    assert count_parameters(model) < 30_000 and model(x).shape == (2, 4)
    space = PruningSpace.from_model(model, x[:1])
    assert [u.kind for u in space.units] == ["sequential", "sequential"]
    genes = space.layout.ones()
    genes[-2:] = [0, 0]
    cut = slice_plan(model, space.decode(genes), space).eval()
    assert cut(x).shape == (2, 4) and count_parameters(cut) < count_parameters(model)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_architecture_builds_and_classifies_a_cifar_batch(name):
    model = build(name, 3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_an_unknown_architecture_is_refused_naming_the_known_ones():
    with pytest.raises(ConfigError, match="resnet18.*resnet18_tv.*tiny.*vgg11_bn.*vgg16_bn"):
        build("vgg19")
