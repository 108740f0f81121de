"""Shared test helpers. Each helper is a plain function exposed through a session-scoped fixture of the same name,
so tests (and module-scoped fixtures) can request it without importing ``conftest``."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state: DEAP's operators draw from ``random`` (and
    ``evoprune.register`` seeds nothing, as a library should not), so a test is repeatable on its own."""
    random.seed(0)
    np.random.seed(0)


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running stats and affine parameters (in place), so that a channel masked or
    removed in the wrong place changes the output instead of hiding behind mean 0 / var 1 / weight 1 / bias 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.track_running_stats and m.running_mean is not None:
                    m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
                    m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                    m.bias.copy_(0.2 * torch.randn(n, generator=gen))
    return model


def _random_individual(space, keep: float, rng: np.random.Generator, cut: float = 0.3) -> list[int]:
    """A valid individual of ``space``: each group keeps round(keep * size) random channels (never fewer than
    ``space.min_keep``), and each connection unit is cut with probability ``cut``."""
    genes: list[int] = []
    for g in space.groups:
        k = min(g.size, max(space.min_keep, int(round(keep * g.size))))
        bits = np.zeros(g.size, dtype=int)
        bits[rng.choice(g.size, size=k, replace=False)] = 1
        genes.extend(int(b) for b in bits)
    genes.extend(int(rng.random() >= cut) for _ in space.units)
    return genes


def _state_guard(model: nn.Module):
    """Snapshot ``model``'s state_dict and module structure; the returned ``check()`` asserts they are unchanged."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    structure = [(n, type(m)) for n, m in model.named_modules()]

    def check():
        now = model.state_dict()
        assert list(now) == list(state), "state_dict keys changed"
        for k, v in state.items():
            assert now[k].shape == v.shape, f"{k}: shape {tuple(v.shape)} -> {tuple(now[k].shape)}"
            assert torch.equal(now[k], v), f"{k}: values changed"
        assert [(n, type(m)) for n, m in model.named_modules()] == structure, "module structure changed"

    return check


def _write_imagefolder(root, n_train: int, n_val: int, *, classes: int, size: int):
    """Generated data (``evoprune.data.synthetic``) written as PNGs in an ImageFolder tree ``train/<c>, val/<c>``."""
    from PIL import Image

    from evoprune.data import synthetic
    data = synthetic(n_train, n_val, classes=classes, size=size, seed=0)
    for split, images in (("train", data.train), ("val", data.val)):
        for i, (img, label) in enumerate(zip(images.images, images.labels)):
            folder = root / split / f"class{int(label)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


def _trained_tiny(n_train: int, n_val: int, *, data_seed: int, epochs: int):
    """A ``tiny_cnn`` trained (seed 0) on generated, separable-but-noisy data: ``(model in eval mode, data)``."""
    from evoprune.data import synthetic
    from evoprune.models import tiny_cnn
    from evoprune.train import train
    data = synthetic(n_train, n_val, noise=0.35, seed=data_seed)
    torch.manual_seed(0)
    model = tiny_cnn(4, 16)
    train(model, data.train, epochs, batch_size=64, lr=0.05, progress=False, seed=0)
    return model.eval(), data


def _check_round_files(out, k: int = 1) -> None:
    """What a prune run claims for round ``k`` is what it wrote: ``round{k}.pt`` and ``round{k}.pt2`` load and
    compute the same logits, with the parameter count that ``round{k}.json`` and ``report.json`` report."""
    import json
    from pathlib import Path
    out = Path(out)
    card = json.loads((out / f"round{k}.json").read_text())
    report = json.loads((out / "report.json").read_text())
    row = next(r for r in report["rows"] if r["round"] == k)
    model = torch.load(out / f"round{k}.pt", weights_only=False).eval()
    program = torch.export.load(str(out / f"round{k}.pt2")).module()
    params = sum(p.numel() for p in model.parameters())
    assert params == card["params"] == row["params"] < report["baseline"]["params"]
    x = torch.randn(2, *card["input_shape"][1:])
    with torch.no_grad():
        assert torch.allclose(program(x), model(x), atol=1e-4)
    assert 0.0 <= row["top1"] <= 1.0 and "report.md" in {p.name for p in out.iterdir()}


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``evoprune demo --quick`` run once for the whole session, under umask 022, its output captured:
    ``(exit code, stdout, stderr, out dir)``. Tests read it and never write into its folder."""
    import contextlib
    import io
    import os
    from evoprune.cli import main
    out = tmp_path_factory.mktemp("demo") / "run"
    stdout, stderr = io.StringIO(), io.StringIO()
    before = os.umask(0o022)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["demo", "--quick", "--out", str(out)])
    finally:
        os.umask(before)
    return code, stdout.getvalue(), stderr.getvalue(), out


@pytest.fixture(scope="session")
def check_round_files():
    return _check_round_files


@pytest.fixture(scope="session")
def trained_tiny():
    return _trained_tiny


@pytest.fixture(scope="session")
def write_imagefolder():
    return _write_imagefolder


@pytest.fixture(scope="session")
def randomize_bn():
    return _randomize_bn


@pytest.fixture(scope="session")
def random_individual():
    return _random_individual


@pytest.fixture(scope="session")
def state_guard():
    return _state_guard


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tests with one intra-op thread (restored afterwards). The networks under test are small and
    run at batch 1-2, where a second thread gains little, while on a busy 2-core machine OpenMP threads contend so
    badly that a forward pass gets 10-100x slower. Use it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
