"""``evoprune demo``: the prune job on a built-in default, with no download: a tiny CNN trained on generated images,
then pruned over two GA rounds, writing the same report files as a real run.

Its data are :func:`evoprune.cli.sources.demo_data` (also ``--data demo`` for the other commands, so the demo's outputs
can be evaluated); its settings are :func:`demo_options`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..models import tiny_cnn
from ..train import evaluate, train
from . import job
from .options import JobOptions
from .sources import DEMO_SIZES, demo_data, demo_data_name


def demo_options(quick: bool, seed: int = 0):
    """The data sizes ``(train, val)``, baseline epochs and :class:`~evoprune.cli.options.JobOptions` of ``evoprune
    demo``."""
    sizes = DEMO_SIZES[bool(quick)]
    if quick:
        epochs = 3
        opts = JobOptions(rounds=2, population=6, elites=2, generations=1, target=0.3, finetune_epochs=0.5,
                          recal_batches=2, score_samples=200, seed=seed, resume=False)
    else:
        epochs = 4
        opts = JobOptions(rounds=2, population=10, elites=3, generations=3, target=0.25, finetune_epochs=1.0,
                          recal_batches=4, score_samples=500, seed=seed, resume=False)
    return sizes, epochs, opts


def run_demo(out: str | Path, *, quick: bool, seed: int) -> job.JobResult:
    """Train the demo's tiny CNN on its generated data, prune it into ``out`` and print a summary and the command
    that checks a round (progress on stderr, the summary on stdout)."""
    t0 = time.perf_counter()
    (n_train, n_val), epochs, opts = demo_options(quick, seed)
    data = demo_data(quick, seed)
    print(f"evoprune demo: generated {n_train} train / {n_val} val images, 16x16, 4 classes; training a tiny CNN "
          f"for {epochs} epochs", file=sys.stderr)
    torch.manual_seed(seed)
    model = tiny_cnn(num_classes=4)
    train(model, data.train, epochs, batch_size=64, lr=0.05, seed=seed, progress=True)
    _, report_set = job.val_splits(data.val, opts.seed)  # the images every top-1 of the run is reported on
    print(f"evoprune demo: baseline top-1 {evaluate(model, report_set):.4f} (val-report half, {len(report_set)} "
          f"images); searching ({opts.rounds} rounds x {opts.generations} generations, population "
          f"{opts.population}, target {opts.target:.0%} of the MACs)", file=sys.stderr)
    out = Path(out)
    result = job.run(model.eval(), data, out, opts, title="evoprune demo: TinyCNN on generated images",
                     source={"data": demo_data_name(quick, seed)})
    print(f"evoprune demo: done in {time.perf_counter() - t0:.1f} s")
    print(job.summary_lines(result, out))
    last = result.rows[-1]["round"]
    flag = f" --seed {seed}" if seed else ""
    print(f"check a round: evoprune evaluate --model {out / f'round{last}.pt2'} --data "
          f"{demo_data_name(quick, seed)} --split val-report{flag}")
    return result
