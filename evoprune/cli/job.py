"""The prune job: image data and a trained model in, compact models and a report out.

:func:`run` splits ``val`` into a search half (fitness, stratified) and a report half (every reported accuracy), takes
BN re-calibration batches from ``train``, runs :func:`evoprune.evolve.loop.search` with fine-tuning (optionally
distilled from the unpruned teacher) between rounds, and writes per round ``round{k}.pt`` (Python), the deployment files
``round{k}.pt2`` (torch.export) and ``round{k}.onnx`` (with the onnx extra), and ``round{k}.json``, then
``report.json``, ``report.md``, ``logbook.csv`` and (with matplotlib) ``pareto.png``. It keeps a record for resuming in
``<out>/checkpoint/`` (:mod:`evoprune.cli.resume`).

:func:`prune_job` and :func:`prune_saved_model` are the same job given by command-line flags (``evoprune prune``
and the examples): the teacher from ``--weights``, a baseline trained and cached in ``--out`` (:func:`baseline`), or
a whole saved ``--model``; ``--out`` is checked before anything is loaded, and a summary is printed at the end.
The settings are :class:`~evoprune.cli.options.JobOptions` (re-exported here, with :func:`options_from_args`).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import re
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..data import ImageData, ImageSet, normalize, normalized
from ..deploy.exporter import export
from ..errors import ConfigError, EvoPruneError
from ..evolve.engines import opened
from ..evolve.fitness import FitnessConfig
from ..evolve.loop import search
from ..evolve.report import PARETO_SKIPPED, write_report
from ..evolve.result import SearchResult, latency_over
from ..models import fit_weights, load_weights
from ..progress import status
from ..storage import check_out_dir, torch_save
from ..train import evaluate, finetune, train
from . import resume, sources
from .options import JobOptions, options_from_args

__all__ = ["JobOptions", "JobResult", "options_from_args", "run", "val_splits", "describe_files", "summary_lines",
           "baseline", "prune_job", "prune_saved_model", "FINISHED"]

#: Each round's files: the Python .pt, the deployment formats torch.export (.pt2) and ONNX (with the onnx extra).
ROUND_FORMATS = ("pt", "pt2") + (("onnx",) if importlib.util.find_spec("onnx") is not None else ())
FINISHED = "evoprune: {out} already holds a finished run (report.md); nothing to do (--no-resume starts over)"


@dataclass
class JobResult(SearchResult):
    """A :class:`~evoprune.evolve.result.SearchResult` plus what the job wrote: ``files`` (the paths this call wrote, in
    order), ``skipped`` (one line per output it could not write, e.g. pareto.png without matplotlib) and
    ``settings`` (as in report.json: the options, ``search_images``, ``report_images``, ``fitness.metric``)."""

    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def val_splits(val: ImageSet, seed: int) -> tuple[ImageSet, ImageSet]:
    """``(search, report)``: the halves of ``val`` the job scores plans on and reports top-1 on (stratified, split
    with the job's ``seed``). ``evoprune evaluate --split val-report`` evaluates on the same report half."""
    return val.stratified_split(0.5, seed=seed)


# ----------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Checked:
    """What the command line checked before loading anything (:func:`precheck`): ``opts`` (``opts.check()``) and
    the record in ``out`` they were checked against (:func:`evoprune.cli.resume.check_settings`). Given to
    :func:`run`, it spares the same checks a second time; :func:`run` then checks only the data and the weights."""

    opts: JobOptions
    source: dict | None
    record: dict | None


def precheck(out_dir: str | Path, opts: JobOptions, source: dict | None) -> Checked:
    """``--out`` and the options against the run recorded there, before the data and model are loaded (``opts`` was
    checked when it was made from the flags: :func:`~evoprune.cli.options.options_from_args`)."""
    out = check_out_dir(out_dir)
    return Checked(opts, source, resume.check_settings(out, opts, source=source))


def run(model: nn.Module, data: ImageData, out_dir: str | Path, opts: JobOptions, *, title: str = "evoprune run",
        verbose: bool = True, source: dict | None = None, map: Callable | None = None,
        checked: Checked | None = None) -> JobResult:
    """Prune ``model`` on ``data`` and write the compact models and the report into ``out_dir``; return a
    :class:`JobResult` (the search result plus the files this call wrote).

    ``source`` (optional, plain JSON values) says where the model and data came from, e.g. ``{"data": path,
    "weights": path}``; it is recorded in ``checkpoint/job.json`` and a resume with another source is refused. See
    :mod:`evoprune.cli.resume` for resuming: the settings, the data and the teacher's weights are checked against the
    job recorded in ``out_dir`` before any work (:class:`ConfigError` on a change). ``map``: where fitness calls
    run (default: the engine ``opts.executor`` names, made and closed here; see :mod:`evoprune.evolve.engines`).
    ``checked``: what the command line checked already (:func:`precheck`), for these ``opts`` and ``source``.
    """
    out = check_out_dir(out_dir, "out_dir")
    if checked is None or checked.opts is not opts or checked.source != source:
        opts.check()
        checked = Checked(opts, source, resume.check_settings(out, opts, source=source))
    if map is None:
        with _engine(opts) as engine:
            return _run(model, data, out, opts, title, verbose, source, engine, checked.record)
    return _run(model, data, out, opts, title, verbose, source, map, checked.record)


def _run(model, data, out: Path, opts: JobOptions, title, verbose, source, map, record) -> JobResult:
    """:func:`run` once its options and the record in ``out`` are checked."""
    data = normalized(data, opts.normalize)
    resume.check_inputs(out, record, data=data, model=model)
    resumed = record is not None
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if opts.resume:
        record = resume.start_record(out, opts, title=title, source=source, data=data, model=model)
    else:
        resume.remove_stale_checkpoint(out, verbose)
    search_set, report_set = val_splits(data.val, opts.seed)
    score_set, choose_set = _score_and_choose(search_set, opts)
    score_x, score_y = normalize(score_set.images, *score_set.stats), score_set.labels
    choose_x = None if choose_set is None else normalize(choose_set.images, *choose_set.stats)
    recal_x = _recal_batches(data.train, opts)
    example = score_x[:1]
    teacher = copy.deepcopy(model).eval() if opts.kd and opts.finetune_epochs > 0 else None
    files: list[str] = []

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
        written = export(net, out / f"round{k}.pt", example, formats=ROUND_FORMATS, optional=("pt2", "onnx"),
                         plan=plan,
                         extra={"round": k, "row": row, "top1_split": "val-report", "split_seed": opts.seed,
                                "normalization": asdict(data.train.stats)})
        files.extend(written.values())

    fitness = FitnessConfig(metric=opts.metric, bn_recalibration=bool(recal_x), device=opts.device,
                            reconstruct=opts.fitness_reconstruct, calib_images=opts.calib_images)
    settings = {**asdict(opts), "search_images": len(score_set), "report_images": len(report_set),
                "choose_images": 0 if choose_set is None else len(choose_set), "fitness.metric": fitness.metric}
    try:
        result = search(model, example, score_x, score_y, recal_x=recal_x or None, report=report,
                        finetune=tune if opts.finetune_epochs > 0 else None, on_round=on_round,
                        config=opts.search_config(), fitness=fitness,
                        checkpoint_dir=str(out / resume.CHECKPOINT_DIR) if opts.resume else None, verbose=verbose,
                        progress=verbose, map=map, choose_x=choose_x,
                        choose_y=None if choose_set is None else choose_set.labels)
    except EvoPruneError:  # refused (e.g. a budget below the smallest legal plan) before any checkpoint: a run
        if not resumed:    # that never started leaves no record, so the corrected rerun is not refused
            resume.forget_unstarted(out, remove_dir=created)
        raise
    written = write_report(result, out, title=title, settings=settings)
    files.extend(written[k] for k in ("md", "json", "logbook", "pareto") if k in written)
    skipped = [] if "pareto" in written else [PARETO_SKIPPED]
    if opts.resume:
        resume.finish_record(out, record, files)
    if verbose:
        status(result.table())
        status(f"evoprune: wrote {out}/{describe_files(files)}")
        for line in skipped:
            status(f"evoprune: {line}")
    return JobResult(**{f.name: getattr(result, f.name) for f in fields(SearchResult)}, files=files,
                     skipped=skipped, settings=settings)


def _score_and_choose(search_set, opts: JobOptions):
    """(fitness subset, choice set): ``--score-samples`` stratified images of the search half, and the rest of it
    (None if nothing is left), on which the round's final plan is chosen."""
    n = min(opts.score_samples, len(search_set))
    if n == len(search_set):
        return search_set, None
    return search_set.stratified_split(n, seed=opts.seed)


def _engine(opts: JobOptions):
    """The map ``opts`` asks for, as a context that closes it (:func:`evoprune.evolve.engines.opened`)."""
    return opened(opts.executor, scheduler=opts.scheduler, workers=opts.workers)


def _recal_batches(train_set: ImageSet, opts: JobOptions) -> list[torch.Tensor]:
    """A fixed, stratified sample of training images for BN re-calibration (no augmentation)."""
    n = min(opts.recal_batches * opts.batch_size, len(train_set) - 1)
    if opts.recal_batches == 0 or n < 2:
        return []
    sample = train_set.stratified_sample(n, seed=opts.seed + 1)
    return [normalize(sample.images[i:i + opts.batch_size], *sample.stats) for i in range(0, n, opts.batch_size)]


# ----------------------------------------------------------------------------------------------------------------
# What the job prints
# ----------------------------------------------------------------------------------------------------------------

def describe_files(files: list[str]) -> str:
    """``round{1..2}.pt, .pt2, .json; report.md, report.json, logbook.csv`` for a list of written paths
    (all in one directory)."""
    names = [Path(f).name for f in files]
    rounds, suffixes, others = [], [], []
    for name in names:
        m = re.fullmatch(r"round(\d+)(\..+)", name)
        if m:
            rounds.append(int(m.group(1)))
            suffixes.append(m.group(2))
        else:
            others.append(name)
    rounds, suffixes = sorted(set(rounds)), list(dict.fromkeys(suffixes))
    parts = []
    if rounds:
        if len(rounds) == 1:
            stem = f"round{rounds[0]}"
        elif rounds == list(range(rounds[0], rounds[-1] + 1)):
            stem = f"round{{{rounds[0]}..{rounds[-1]}}}"
        else:
            stem = "round{" + ",".join(map(str, rounds)) + "}"
        parts.append(f"{stem}{suffixes[0]}" + "".join(f", {s}" for s in suffixes[1:]))
    if others:
        parts.append(", ".join(others))
    return "; ".join(parts) or "nothing"


def summary_lines(result: JobResult, out: Path) -> str:
    """Baseline vs final accuracy (and on which images), MACs and params, and the files this run wrote."""
    def top1(x):
        return "-" if x is None else f"{x:.4f}"
    base, last, rounds = result.baseline, result.rows[-1], len(result.rows)
    n = result.settings.get("report_images")
    split = "val-report half" + (f", {n} images" if n else "")
    macs_pct = 100.0 * last["macs"] / base["macs"]
    params_pct = 100.0 * last["params"] / base["params"]
    files = f"{out}/{describe_files(result.files)}" if result.files else "none written"
    return "\n".join([
        f"baseline: top-1 {top1(base.get('top1'))} ({split}), {base['macs'] / 1e6:.3f} MMACs, "
        f"{base['params']:,} params",
        f"final   : top-1 {top1(last.get('top1'))} (same images), {last['macs'] / 1e6:.3f} MMACs ({macs_pct:.1f} % "
        f"of baseline, -{100 - macs_pct:.1f} %), {last['params']:,} params (-{100 - params_pct:.1f} %) after "
        f"{rounds} round(s)",
        *([_latency_line(result)] if "latency_ms" in base else []),
        f"files   : {files}" + "".join(f"; {line}" for line in result.skipped),
    ])


def _latency_line(result: JobResult) -> str:
    """Measured latency before and after, on the runtime the run targeted."""
    base, last, s = result.baseline, result.rows[-1], result.settings
    where = f"{s.get('runtime')}, {s.get('threads')} thread(s)"
    text = (f"latency : {base['latency_ms']:.3f} -> {last['latency_ms']:.3f} ms at batch 1 "
            f"({base['latency_ms'] / last['latency_ms']:.2f}x faster)")
    if base["latency_batch"] != 1:
        text += (f", {base['latency_batch_ms']:.3f} -> {last['latency_batch_ms']:.3f} ms at batch "
                 f"{base['latency_batch']}")
    text = f"{text}, measured on {where}; budget {last['budget']:.3f} ms at batch {base['latency_batch']}"
    over = latency_over(last)
    if over is not None:
        text += (f"; OVER the budget by {over:.3f} ms ({100 * over / last['budget']:.0f} %), though predicted "
                 "within it: measure on an idle machine, or lower --target-latency-ms")
    return text


# ----------------------------------------------------------------------------------------------------------------
# The job from command-line flags
# ----------------------------------------------------------------------------------------------------------------

def baseline(model: nn.Module, data, out_dir, epochs: int, opts: JobOptions, *, progress: bool = True) -> nn.Module:
    """Train ``model`` for ``epochs`` (or load the copy cached in ``out_dir`` by an earlier run) and return it."""
    cached = Path(out_dir) / f"baseline-{type(model).__name__}-e{epochs}-s{opts.seed}-{data.train.fingerprint()}.pt"
    if cached.exists():
        load_weights(model, cached)
        print(f"evoprune: baseline loaded from {cached}", file=sys.stderr)
        return model
    print(f"evoprune: no --weights: training a baseline for {epochs} epochs", file=sys.stderr)
    train(model, data.train, epochs, val_set=data.val, device=opts.device, seed=opts.seed, progress=progress)
    model = model.cpu()
    torch_save(model.state_dict(), cached)
    return model


def prune_job(build_model: Callable, args: argparse.Namespace, *, title: str) -> None:
    """The job of ``evoprune prune --arch`` and of the examples: data, teacher (``--weights``) or a cached
    baseline, then :func:`run` into ``--out``, and a summary on stdout. Raises evoprune errors; the command line
    wraps it in :func:`evoprune.cli.commands.guarded` (errors -> one line and an exit code).

    Before loading anything it checks ``--out``: a run there made with other settings is refused, a finished one
    with the same settings is not redone. A bad ``--weights`` file is refused before the data load."""
    opts = options_from_args(args)
    check_out_dir(args.out)  # before any other refusal: a bad --out is named first
    if args.baseline_epochs < 1:
        raise ConfigError(f"must be >= 1, got {args.baseline_epochs}", setting="baseline_epochs")
    source = {"arch" if getattr(args, "arch", None) else "model_builder":
              getattr(args, "arch", None) or getattr(build_model, "__name__", type(build_model).__name__),
              "weights": sources.abspath(args.weights),
              "baseline_epochs": None if args.weights else args.baseline_epochs,
              "data": sources.data_source(args)}
    checked = precheck(args.out, opts, source)
    if resume.finished(args.out, checked.record):
        print(FINISHED.format(out=args.out), file=sys.stderr)
        return
    state = sources.read_weights(args.weights) if args.weights else None
    with _engine(opts) as engine:  # an unreachable --scheduler fails before the data load
        data = sources.load_data(args)
        classes = len(data.train.classes)
        model = build_model(num_classes=classes)
        if state is not None:
            fit_weights(model, state, args.weights, hint=f"Pass the --arch it was saved from (the number of "
                                                          f"classes, {classes}, comes from --data).")
        else:
            model = baseline(model, data, args.out, args.baseline_epochs, opts)
        result = run(model.eval(), data, args.out, opts, title=title, source=source, map=engine, checked=checked)
    print(summary_lines(result, Path(args.out)))


def prune_saved_model(args: argparse.Namespace) -> None:
    """The job of ``evoprune prune --model``: a whole saved model (``--trust-pickle``), checked against the data's
    images (``--input-shape``) and classes, then :func:`run` into ``--out`` and a summary on stdout. Like
    :func:`prune_job`, ``--out`` is checked before anything is loaded."""
    opts = options_from_args(args)
    source = {"model": sources.abspath(args.model), "data": sources.data_source(args)}
    checked = precheck(args.out, opts, source)
    if resume.finished(args.out, checked.record):
        print(FINISHED.format(out=args.out), file=sys.stderr)
        return
    model = sources.load_model_file(args.model, trust=args.trust_pickle, purpose="prune")
    with _engine(opts) as engine:  # an unreachable --scheduler fails before the data load
        data = sources.load_data(args)
        shape = tuple(data.train.images.shape[1:])
        if args.input_shape and tuple(args.input_shape) != shape:
            raise ConfigError(f"{','.join(str(d) for d in args.input_shape)} does not match the data's images "
                              f"({','.join(str(d) for d in shape)}); resize the data or fix --input-shape",
                              setting="input_shape")
        sources.check_outputs(model, data, args.model)
        result = run(model, data, args.out, opts, title=f"evoprune: {Path(args.model).name}", source=source,
                     map=engine, checked=checked)
    print(summary_lines(result, Path(args.out)))
