"""Shared by the CIFAR-10 examples: flags, data, teacher weights (or a cached baseline), the prune job, and
turning evoprune errors into one line and an exit code."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from evoprune import EvoPruneError, job
from evoprune.data import load_cifar10
from evoprune.errors import ConfigError, DataError
from evoprune.models import load_weights
from evoprune.storage import torch_save
from evoprune.train import train


def parser(description: str, default_weights: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", default=os.environ.get("EVOPRUNE_DATA", "data/cifar10"),
                   help="CIFAR-10: torchvision folder, ImageFolder tree (train/, val/) or its .tar.gz "
                        "(default: $EVOPRUNE_DATA or %(default)s)")
    p.add_argument("--download", action="store_true", help="download CIFAR-10 with torchvision if --data is empty")
    p.add_argument("--weights", default=default_weights,
                   help="teacher state_dict (.pt); without it a baseline is trained first and cached in --out")
    p.add_argument("--baseline-epochs", type=int, default=4, help="epochs for the baseline (default: %(default)s)")
    job.add_search_arguments(p)
    return p


def main(build_model, description: str, default_weights: str | None = None, argv=None) -> int:
    args = parser(description, default_weights).parse_args(argv)
    try:
        opts = job.options_from_args(args)
        data = load_cifar10(args.data, download=args.download)
        model = build_model(num_classes=len(data.train.classes))
        if args.weights:
            load_weights(model, args.weights)
        else:
            model = _baseline(model, data, args, opts)
        job.run(model.eval(), data, args.out, opts, title=description)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (EvoPruneError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _baseline(model, data, args, opts):
    cached = Path(args.out) / f"baseline-{type(model).__name__}-e{args.baseline_epochs}-s{opts.seed}.pt"
    if cached.exists():
        load_weights(model, cached)
        print(f"evoprune: baseline loaded from {cached}", file=sys.stderr)
        return model
    print(f"evoprune: no --weights: training a baseline for {args.baseline_epochs} epochs", file=sys.stderr)
    train(model, data.train, args.baseline_epochs, val_set=data.val, device=opts.device, seed=opts.seed)
    torch_save(model.cpu().state_dict(), cached)
    return model.cpu()


def exit_code(code: int) -> None:
    """Exit with ``code``. Under ``python -m scoop`` a plain non-zero exit still makes scoop return 0, so the
    failure is also announced on stderr with a marker line that wrappers can check."""
    if code:
        print(f"evoprune: FAILED (exit {code})", file=sys.stderr)
        sys.exit(code)
