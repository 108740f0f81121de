"""Training, fine-tuning (optionally with knowledge distillation) and evaluation on in-memory image sets.

The recipe is the one the shipped VGG16-BN teacher was trained with: SGD with Nesterov momentum, OneCycle (or cosine)
learning rate stepped per batch, cross-entropy with label smoothing, random-crop + flip augmentation. All of it runs
on plain tensors from :func:`evoprune.data.batches`, on CPU or CUDA; images are normalised with the statistics
their set carries (``ImageSet.stats``: CIFAR-10's unless the data were given their own).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .data import ImageSet, batches, num_batches
from .errors import ConfigError, DataError, ModelError
from .progress import bar, status
from .validators import check_device, is_int

SCHEDULES = ("onecycle", "cosine")


def train(model: nn.Module, train_set: ImageSet, epochs: int, *, val_set: ImageSet | None = None,
          batch_size: int = 128, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
          schedule: str = "onecycle", label_smoothing: float = 0.1, teacher: nn.Module | None = None,
          kd_alpha: float = 0.5, kd_temperature: float = 4.0, device: str | torch.device = "cpu", seed: int = 0,
          progress: bool = True, max_batches: int | None = None) -> dict[str, list[float]]:
    """Train ``model`` in place on ``train_set``; return the per-epoch history.

    SGD with Nesterov momentum; the learning rate follows OneCycle (peak ``lr``, 25 % warm-up) or cosine decay from
    ``lr``, stepped every batch. The loss is cross-entropy with ``label_smoothing``; with a ``teacher`` it becomes
    ``(1 - kd_alpha) * CE + kd_alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` with the teacher
    frozen in eval mode. Batches are augmented (random crop with reflect padding, horizontal flip) and shuffled from
    ``seed``. ``max_batches`` caps the batches per epoch (for quick runs). After each epoch ``val_set``, if given, is
    evaluated. ``model`` (and ``teacher``) are moved to ``device``.

    With ``progress`` (the default) each epoch shows a bar over its batches on stderr (loss and accuracy so far as
    its postfix; only when stderr is a terminal, see :mod:`evoprune.progress`), and ends with one plain summary line
    on stderr (:func:`epoch_summary`), which a log file keeps. ``progress=False`` prints nothing.

    The history has one entry per epoch under ``epoch``, ``train_loss``, ``train_acc``, ``lr`` (at the epoch's end),
    ``seconds`` and, with a ``val_set``, ``val_acc``. Raises :class:`ConfigError` for bad parameters,
    :class:`DataError` for empty sets and :class:`ModelError` when the loss becomes NaN or infinite.
    """
    check_training_args(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                        schedule=schedule, label_smoothing=label_smoothing, kd_alpha=kd_alpha,
                        kd_temperature=kd_temperature, max_batches=max_batches)
    check_nonempty(train_set, "train_set")
    if val_set is not None:
        check_nonempty(val_set, "val_set")
    device = resolve_device(device)

    drop_last = len(train_set) > batch_size  # a last batch of one sample would break BatchNorm
    steps = num_batches(train_set, batch_size, drop_last=drop_last)
    if max_batches is not None:
        steps = min(steps, max_batches)
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True,
                                weight_decay=weight_decay)
    scheduler = make_scheduler(optimizer, schedule, lr=lr, total_steps=epochs * steps)
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"epoch": [], "train_loss": [], "train_acc": [], "lr": [], "seconds": []}
    if val_set is not None:
        history["val_acc"] = []
    teacher_was_training = teacher.training if teacher is not None else False

    try:
        if teacher is not None:
            teacher.eval()
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            model.train()
            loss_sum, correct, seen, done = 0.0, 0, 0, 0
            stream = batches(train_set, batch_size, shuffle=True, generator=generator, augment=True,
                             device=device, drop_last=drop_last)
            with bar(total=steps, desc=f"epoch {epoch}/{epochs}", unit="batch", enabled=progress) as shown:
                for step, (images, labels) in enumerate(stream, 1):
                    if step > steps:
                        break
                    logits = model(images)
                    loss = training_loss(logits, labels, teacher, images, label_smoothing=label_smoothing,
                                         kd_alpha=kd_alpha, kd_temperature=kd_temperature)
                    loss_value = loss.item()
                    if not math.isfinite(loss_value):
                        raise ModelError(f"training loss is {loss_value} at epoch {epoch}, batch {step}/{steps}; "
                                         f"lower the learning rate (lr={lr}) or check the model and data for NaNs.")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    loss_sum += loss_value * len(labels)
                    correct += int((logits.argmax(1) == labels).sum())
                    seen += len(labels)
                    done = step
                    if not shown.disable:
                        shown.set_postfix_str(f"loss {loss_sum / seen:.4f}  acc {correct / seen:.3f}", refresh=False)
                        shown.update()
            record_epoch(history, epoch, loss_sum / seen, correct / seen, optimizer.param_groups[0]["lr"],
                         time.perf_counter() - start)
            if val_set is not None:
                history["val_acc"].append(evaluate(model, val_set, device=device, progress=progress,
                                                   desc=f"epoch {epoch}/{epochs} val"))
            if progress:
                status(epoch_summary(history, epochs, batches=(done, steps)))
    finally:
        if teacher is not None:
            teacher.train(teacher_was_training)
    return history


def finetune(pruned: nn.Module, train_set: ImageSet, epochs: int, *, teacher: nn.Module | None = None,
             lr: float = 0.01, schedule: str = "cosine", **kwargs) -> dict[str, list[float]]:
    """:func:`train` with fine-tuning defaults: a 10x smaller learning rate and cosine decay.

    Pass the unpruned model as ``teacher`` to distil from it; other keywords go to :func:`train`.
    """
    return train(pruned, train_set, epochs, teacher=teacher, lr=lr, schedule=schedule, **kwargs)


def evaluate(model: nn.Module, imageset: ImageSet, *, batch_size: int = 256, device: str | torch.device = "cpu",
             progress: bool = True, desc: str = "evaluate") -> float:
    """Top-1 accuracy of ``model`` on ``imageset`` (in eval mode; the model's training flag is restored).

    With ``progress`` a bar over the batches (labelled ``desc``) is drawn on stderr while stderr is a terminal; it
    is cleared when done, and nothing is printed otherwise.
    """
    check_nonempty(imageset, "imageset")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, not {batch_size}")
    device = resolve_device(device)
    was_training = model.training
    model.to(device)
    model.eval()
    correct = 0
    try:
        with torch.inference_mode(), bar(total=num_batches(imageset, batch_size), desc=desc, unit="batch",
                                         enabled=progress) as shown:
            for images, labels in batches(imageset, batch_size, device=device):
                correct += int((model(images).argmax(1) == labels).sum())
                shown.update()
    finally:
        model.train(was_training)
    return correct / len(imageset)


def training_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: nn.Module | None, images: torch.Tensor, *,
                  label_smoothing: float, kd_alpha: float, kd_temperature: float) -> torch.Tensor:
    """Cross-entropy with label smoothing, mixed with the distillation loss when there is a teacher."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if teacher is None:
        return loss
    with torch.no_grad():
        teacher_logits = teacher(images)
    return (1.0 - kd_alpha) * loss + kd_alpha * distillation_loss(logits, teacher_logits, kd_temperature)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Hinton's KD term: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True) * temperature ** 2


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, *, lr: float,
                   total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-batch schedule: OneCycle peaking at ``lr`` after 25 % of the steps, or cosine decay from ``lr``.

    OneCycle leaves the momentum alone (``cycle_momentum=False``), so ``train``'s ``momentum`` is the one used.
    """
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(total_steps, 2),
                                                   pct_start=0.25, cycle_momentum=False)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


def check_training_args(*, epochs, batch_size, lr, momentum, weight_decay, schedule, label_smoothing, kd_alpha,
                        kd_temperature, max_batches) -> None:
    """Raise :class:`ConfigError` for the first out-of-range training parameter."""
    checks = [
        (is_int(epochs) and epochs >= 1,
         f"epochs must be an int >= 1, not {epochs!r}"),
        (is_int(batch_size) and batch_size >= 1, f"batch_size must be an int >= 1, not {batch_size!r}"),
        (lr > 0, f"lr must be > 0, not {lr}"),
        (0 <= momentum < 1, f"momentum must be in [0, 1), not {momentum}"),
        (weight_decay >= 0, f"weight_decay must be >= 0, not {weight_decay}"),
        (schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}"),
        (0 <= label_smoothing < 1, f"label_smoothing must be in [0, 1), not {label_smoothing}"),
        (0 <= kd_alpha <= 1, f"kd_alpha must be in [0, 1], not {kd_alpha}"),
        (kd_temperature > 0, f"kd_temperature must be > 0, not {kd_temperature}"),
        (max_batches is None or (is_int(max_batches) and max_batches >= 1),
         f"max_batches must be None or an int >= 1, not {max_batches!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def check_nonempty(imageset: ImageSet, name: str) -> None:
    if len(imageset) == 0:
        raise DataError(f"{name} is empty: there is nothing to train on or evaluate")


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``; :class:`ConfigError` if it is malformed or CUDA is asked for but unavailable."""
    return check_device(device)


def record_epoch(history: dict[str, list[float]], epoch: int, loss: float, acc: float, lr: float,
                 seconds: float) -> None:
    for key, value in (("epoch", epoch), ("train_loss", loss), ("train_acc", acc), ("lr", lr),
                       ("seconds", seconds)):
        history[key].append(value)


def epoch_summary(history: dict[str, list[float]], epochs: int, *, batches: tuple[int, int] | None = None) -> str:
    """The plain one-line result of the last epoch in ``history``, e.g.
    ``epoch 2/5  batch 390/390  loss 0.5123  acc 0.842  lr 0.0412  val 0.8610  31.2s`` (``batches`` is
    ``(done, total)``; the time is the training part of the epoch)."""
    text = f"epoch {history['epoch'][-1]}/{epochs}"
    if batches is not None:
        text += f"  batch {batches[0]}/{batches[1]}"
    text += (f"  loss {history['train_loss'][-1]:.4f}  acc {history['train_acc'][-1]:.3f}  "
             f"lr {history['lr'][-1]:.3g}")
    if "val_acc" in history:
        text += f"  val {history['val_acc'][-1]:.4f}"
    return text + f"  {format_seconds(history['seconds'][-1])}"


def format_seconds(seconds: float) -> str:
    """``12.3s`` under a minute, else ``m:ss`` or ``h:mm:ss``."""
    if seconds < 59.95:
        return f"{seconds:.1f}s"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
