"""The prune job behind the examples, ``evoprune prune`` and ``evoprune demo``: image data in, compact models and
a report out.

It splits ``val`` into a search half (fitness, stratified) and a report half (every reported accuracy), takes BN
re-calibration batches from ``train``, runs :func:`evoprune.evolve.search` with fine-tuning (optionally distilled
from the unpruned teacher) between rounds, and writes per round ``round{k}.pt``, ``round{k}.torchscript.pt`` and
``round{k}.json``, then ``report.json``, ``report.md``, ``pareto.png`` and ``logbook.csv``.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn

from .data import Cifar10, ImageSet, normalize
from .errors import ConfigError
from .export import export
from .fitness import FitnessConfig
from .report import write_report
from .evolve import SearchConfig, SearchResult, search
from .train import evaluate, finetune


@dataclass
class JobOptions(SearchConfig):
    """The search settings (:class:`~evoprune.evolve.SearchConfig`: rounds, generations, population, elites, p_c,
    p_mut, target, objective, connections, seed...) plus what the job does around the search."""

    generations: int = 4
    finetune_epochs: float = 1.0
    finetune_lr: float = 0.01
    kd: bool = True
    score_samples: int = 1000
    recal_batches: int = 20
    batch_size: int = 64
    device: str = "cpu"
    resume: bool = True

    def check(self):
        if self.score_samples < 10:
            raise ConfigError(f"score_samples must be >= 10, got {self.score_samples}")
        if self.recal_batches < 0 or self.finetune_epochs < 0:
            raise ConfigError("recal_batches and finetune_epochs must be >= 0")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
        super().check()

    def search_config(self) -> SearchConfig:
        return SearchConfig(**{f.name: getattr(self, f.name) for f in fields(SearchConfig)})


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """The GA and job flags shared by the examples and ``evoprune prune``."""
    d = JobOptions()
    g = parser.add_argument_group("search (paper defaults: N=30, K=5, p_c=0.6, p_mut=0.6, T=5)")
    g.add_argument("--out", default="runs/evoprune", help="output directory (default: %(default)s)")
    g.add_argument("--rounds", type=int, default=d.rounds, help="GA rounds T (default: %(default)s)")
    g.add_argument("--population", type=int, default=d.population, help="population N (default: %(default)s)")
    g.add_argument("--elites", type=int, default=d.elites, help="selected genomes K (default: %(default)s)")
    g.add_argument("--p-c", type=float, default=d.p_c, help="crossover cut point p_c (default: %(default)s)")
    g.add_argument("--p-mut", type=float, default=d.p_mut, help="mutation probability (default: %(default)s)")
    g.add_argument("--generations", type=int, default=d.generations,
                   help="generations per round (default: %(default)s)")
    g.add_argument("--target-macs", type=float, default=d.target,
                   help="final MACs as a fraction of the original, reached geometrically over the rounds "
                        "(default: %(default)s)")
    g.add_argument("--objective", choices=("budget", "nsga2", "topk"), default=d.objective,
                   help="selection: budget (best score under the MACs budget), nsga2 or topk (default: %(default)s)")
    g.add_argument("--no-connections", action="store_true", help="neuron chromosome only (no connection genes)")
    g.add_argument("--finetune-epochs", type=float, default=d.finetune_epochs,
                   help="fine-tuning epochs after each round, fractions allowed (default: %(default)s)")
    g.add_argument("--no-kd", action="store_true", help="fine-tune without distillation from the unpruned teacher")
    g.add_argument("--score-samples", type=int, default=d.score_samples,
                   help="images in the fitness subset (from the search half of val) (default: %(default)s)")
    g.add_argument("--recal-batches", type=int, default=d.recal_batches,
                   help="training batches for BN re-calibration before scoring; 0 turns it off "
                        "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    g.add_argument("--device", default=d.device, help="cpu or cuda (default: %(default)s)")
    g.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")


def options_from_args(args: argparse.Namespace) -> JobOptions:
    opts = JobOptions(rounds=args.rounds, population=args.population, elites=args.elites, p_c=args.p_c,
                      p_mut=args.p_mut, generations=args.generations, target=args.target_macs,
                      objective=args.objective, connections=not args.no_connections,
                      finetune_epochs=args.finetune_epochs, kd=not args.no_kd, score_samples=args.score_samples,
                      recal_batches=args.recal_batches, seed=args.seed, device=args.device,
                      resume=not args.no_resume)
    opts.check()
    return opts


def run(model: nn.Module, data: Cifar10, out_dir: str | Path, opts: JobOptions, *, title: str = "evoprune run",
        verbose: bool = True) -> SearchResult:
    """Prune ``model`` on ``data`` and write the compact models and the report into ``out_dir``."""
    opts.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    search_set, report_set = data.val.stratified_split(0.5, seed=opts.seed)
    score_set = search_set.stratified_sample(min(opts.score_samples, len(search_set)), seed=opts.seed)
    score_x, score_y = normalize(score_set.images), score_set.labels
    recal_x = _recal_batches(data.train, opts)
    example = score_x[:1]
    teacher = copy.deepcopy(model).eval() if opts.kd and opts.finetune_epochs > 0 else None

    def report(net):
        return evaluate(net, report_set, device=opts.device)

    def tune(net, k):
        if opts.finetune_epochs <= 0:
            return net
        epochs, fraction = max(1, int(opts.finetune_epochs + 0.999)), opts.finetune_epochs
        steps = None if fraction >= 1 else max(1, int(fraction * len(data.train) / opts.batch_size))
        finetune(net, data.train, epochs, teacher=teacher, lr=opts.finetune_lr, batch_size=opts.batch_size,
                 device=opts.device, seed=opts.seed + k, progress=verbose, max_batches=steps)
        return net.cpu().eval()

    def on_round(k, net, row, plan):
        export(net, out / f"round{k}.pt", example, formats=("pt", "torchscript"), plan=plan,
               extra={"round": k, "row": row, "top1_split": "val-report"})

    settings = {**asdict(opts), "search_images": len(score_set), "report_images": len(report_set)}
    result = search(model, example, score_x, score_y, recal_x=recal_x or None, report=report,
                    finetune=tune if opts.finetune_epochs > 0 else None, on_round=on_round,
                    config=opts.search_config(),
                    fitness=FitnessConfig(bn_recalibration=bool(recal_x), device=opts.device),
                    checkpoint_dir=str(out / "checkpoint") if opts.resume else None, verbose=verbose,
                    progress=verbose)
    write_report(result, out, title=title, settings=settings)
    if verbose:
        print(result.table(), file=sys.stderr)
        print(f"evoprune: wrote {out}/round*.pt, report.md, report.json, pareto.png, logbook.csv", file=sys.stderr)
    return result


def _recal_batches(train_set: ImageSet, opts: JobOptions) -> list[torch.Tensor]:
    """A fixed, stratified sample of training images for BN re-calibration (no augmentation)."""
    n = min(opts.recal_batches * opts.batch_size, len(train_set) - 1)
    if opts.recal_batches == 0 or n < 2:
        return []
    sample = train_set.stratified_sample(n, seed=opts.seed + 1)
    return [normalize(sample.images[i:i + opts.batch_size]) for i in range(0, n, opts.batch_size)]
