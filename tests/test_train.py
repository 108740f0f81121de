"""Training, distillation fine-tuning and evaluation on small synthetic, colour-coded data."""
import copy
import functools
import re

import pytest
import torch

from evoprune.data import ImageSet
from evoprune.errors import ConfigError, DataError, ModelError
from evoprune.models import tiny_cnn
from evoprune.train import distillation_loss, evaluate, finetune, train

COLOURS = torch.tensor([(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30)])


def colour_set(count: int, seed: int) -> ImageSet:
    """``count`` noisy 16x16 images of 4 classes; each class is a colour, so the classes are separable."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 4
    noise = torch.randint(-60, 60, (count, 3, 16, 16), generator=generator)
    images = (COLOURS[labels].view(count, 3, 1, 1) + noise).clamp(0, 255).to(torch.uint8)
    return ImageSet(images, labels, ["red", "green", "blue", "yellow"])


pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def train_set():
    return colour_set(256, seed=0)


@pytest.fixture(scope="module")
def val_set():
    return colour_set(128, seed=1)


def fresh_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tiny_cnn(num_classes=4, width=8)


@pytest.fixture(scope="module")
def trained(train_set, val_set):
    model = fresh_model()
    history = train(model, train_set, 3, val_set=val_set, batch_size=32, progress=False)
    return model, history


def test_train_learns_separable_data(trained, val_set):
    model, history = trained
    assert history["epoch"] == [1, 2, 3]
    assert len(history["train_loss"]) == len(history["val_acc"]) == len(history["lr"]) == 3
    assert history["val_acc"][-1] > 0.6
    assert evaluate(model, val_set) == pytest.approx(history["val_acc"][-1])
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["lr"][-1] < 0.01  # OneCycle anneals far below its peak


def test_finetune_with_teacher_recovers_a_damaged_model(trained, train_set, val_set):
    teacher, _ = trained
    student = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for module in student.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(0.5).add_(torch.randn_like(module.weight) * module.weight.std() * 2)
    teacher.train()  # finetune must put the teacher in eval mode, then give it back as it was
    teacher_state = copy.deepcopy(teacher.state_dict())
    before = evaluate(student, val_set)
    history = finetune(student, train_set, 2, teacher=teacher, val_set=val_set, batch_size=32, progress=False)
    after = history["val_acc"][-1]
    assert after > before
    assert after > 0.6
    assert teacher.training
    assert all(torch.equal(teacher_state[k], v) for k, v in teacher.state_dict().items())  # frozen, BN included


def test_distillation_loss_is_zero_only_when_student_matches_teacher():
    logits = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    assert distillation_loss(logits, logits, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, logits.flip(1), 4.0).item() > 0.01


def test_evaluate_restores_the_training_flag(val_set):
    model = fresh_model()
    model.train()
    evaluate(model, val_set)
    assert model.training
    model.eval()
    evaluate(model, val_set)
    assert not model.training


def test_evaluate_does_not_update_batchnorm_statistics(val_set):
    model = fresh_model()
    before = copy.deepcopy(model.state_dict())
    evaluate(model, val_set)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_same_seed_same_run(train_set):
    runs = [train(fresh_model(), train_set, 1, batch_size=64, seed=5, progress=False, schedule="cosine")
            for _ in range(2)]
    assert runs[0]["train_loss"] == runs[1]["train_loss"]


def test_max_batches_and_plain_epoch_lines_off_a_terminal(train_set, val_set, capfd, monkeypatch):
    """With stderr not a terminal (a log file), no bar is drawn: each epoch leaves one plain summary line on stderr,
    with no carriage return or terminal escape, and nothing goes to stdout."""
    monkeypatch.delenv("EVOPRUNE_PROGRESS", raising=False)
    model = fresh_model()
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(module.training))
    history = train(model, train_set, 2, val_set=val_set, batch_size=32, max_batches=3, progress=True)
    assert calls == [True] * 3 + [False] * 1 + [True] * 3 + [False] * 1  # 3 batches, then val (128 < 256: one)
    finetune(model, train_set, 1, teacher=fresh_model(1), batch_size=32, max_batches=2)
    evaluate(model, val_set)
    out, err = capfd.readouterr()
    assert out == ""
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert len(lines) == 3, err
    for line, epoch, batches in zip(lines, ("1/2", "2/2", "1/1"), ("3/3", "3/3", "2/2")):
        assert line.startswith(f"epoch {epoch}  batch {batches}  loss ")
        assert " acc " in line and " lr " in line and line.endswith("s")
    assert f"val {history['val_acc'][0]:.4f}" in lines[0] and f"val {history['val_acc'][1]:.4f}" in lines[1]
    assert "val" not in lines[2]
    train(model, train_set, 1, batch_size=32, max_batches=1, progress=False)
    assert capfd.readouterr() == ("", "")


def test_bars_are_drawn_when_forced(train_set, val_set, capsys, monkeypatch):
    """EVOPRUNE_PROGRESS=1 draws tqdm bars on stderr (batches, with loss and accuracy), still never on stdout;
    progress=False still prints nothing."""
    import evoprune.progress
    import evoprune.train
    monkeypatch.setenv("EVOPRUNE_PROGRESS", "1")
    monkeypatch.setattr(evoprune.train, "bar", functools.partial(evoprune.progress.bar, mininterval=0))
    model = fresh_model()
    train(model, train_set, 1, val_set=val_set, batch_size=32, max_batches=2)
    out, err = capsys.readouterr()
    assert out == ""
    assert "\r" in err and "epoch 1/1" in err and "2/2" in err and "batch/s" in err
    assert re.search(r"loss \d\.\d{4}  acc \d\.\d{3}", err)  # the postfix
    assert "epoch 1/1 val" in err  # the validation bar
    # the summary line is written after the bar was cleared (at the start of the line, ended by a newline)
    assert any(re.fullmatch(r"epoch 1/1  batch 2/2  loss .* val \S+  \S+s\n", part) for part in err.split("\r"))
    evaluate(model, val_set, batch_size=32)
    out, err = capsys.readouterr()
    assert out == "" and "evaluate" in err and "4/4" in err
    train(model, train_set, 1, batch_size=32, max_batches=1, progress=False)
    evaluate(model, val_set, progress=False)
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("kwargs", [
    {"epochs": 0}, {"epochs": -1}, {"epochs": 1.5}, {"batch_size": 0}, {"lr": 0.0}, {"schedule": "step"},
    {"kd_alpha": 1.5}, {"kd_temperature": 0.0}, {"label_smoothing": 1.0}, {"max_batches": 0},
    {"device": "nonsense"},
])
def test_bad_parameters_raise_config_error_before_training(kwargs, train_set):
    model = fresh_model()
    before = copy.deepcopy(model.state_dict())
    args = {"epochs": 1, **kwargs}
    with pytest.raises(ConfigError):
        train(model, train_set, args.pop("epochs"), progress=False, **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_cuda_without_cuda_is_a_config_error(train_set, val_set):
    with pytest.raises(ConfigError, match="device is .cuda., but torch sees no CUDA device here; use cpu"):
        train(fresh_model(), train_set, 1, device="cuda", progress=False)
    with pytest.raises(ConfigError, match="device is .cuda., but torch sees no CUDA device here; use cpu"):
        evaluate(fresh_model(), val_set, device="cuda")


def test_empty_sets_are_data_errors(train_set):
    empty = train_set.subset(torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError):
        train(fresh_model(), empty, 1, progress=False)
    with pytest.raises(DataError):
        train(fresh_model(), train_set, 1, val_set=empty, progress=False)
    with pytest.raises(DataError):
        evaluate(fresh_model(), empty)


def test_nan_loss_names_epoch_and_batch(train_set):
    model = fresh_model()
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    with pytest.raises(ModelError, match=r"epoch 1, batch 1/"):
        train(model, train_set, 2, batch_size=32, progress=True)
