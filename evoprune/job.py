"""The prune job behind the examples, ``evoprune prune`` and ``evoprune demo``: image data in, compact models and
a report out.

It splits ``val`` into a search half (fitness, stratified) and a report half (every reported accuracy), takes BN
re-calibration batches from ``train``, runs :func:`evoprune.evolve.search` with fine-tuning (optionally distilled
from the unpruned teacher) between rounds, and writes per round ``round{k}.pt``, ``round{k}.torchscript.pt`` and
``round{k}.json``, then ``report.json``, ``report.md``, ``logbook.csv`` and (with matplotlib) ``pareto.png``.

Resuming. With ``resume`` on (the default) the job keeps ``<out>/checkpoint/``: the search's ``checkpoint.pt`` and
``job.json``, which records every :class:`JobOptions` setting, where the model and data came from (``source``,
given by the command line), a fingerprint of the data and a digest of the teacher's weights, and whether the run
finished. A later run into the same ``out`` checks them before any work (:func:`check_resume`; the command line
does so before it even loads the data) and refuses a change of anything that changes the result, naming the flags
with their old and new values. ``--device`` may change (it changes where, not what, up to float rounding), and so
may ``--no-resume`` itself. A run whose ``job.json`` says it finished is complete; the command line then does
nothing (:func:`finished`). With ``resume`` off the job keeps no checkpoint and deletes a stale one in ``out``
(its outputs are being replaced, so it no longer describes them).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn

from ._version import __version__
from .data import Cifar10, ImageSet, normalize
from .errors import CheckpointError, ConfigError
from .evolve import METHODS, SearchConfig, SearchResult, search
from .runtime import RUNTIMES
from .toolbox import CROSSOVERS, MUTATIONS
from .export import export
from .fitness import FitnessConfig
from .progress import status
from .report import PARETO_SKIPPED, write_report
from .storage import write_json
from .train import evaluate, finetune

#: The command-line flag of each setting (JobOptions fields and the command line's model/data sources). Settings
#: without a flag (target_kind, finetune_lr, batch_size...) are API-only and keep their Python names.
FLAGS = {
    "rounds": "--rounds", "population": "--population", "elites": "--elites", "p_c": "--p-c", "p_mut": "--p-mut",
    "generations": "--generations", "target": "--target-macs", "objective": "--objective", "method": "--method",
    "crossover": "--crossover", "mutation": "--mutation",
    "connections": "--no-connections", "finetune_epochs": "--finetune-epochs", "kd": "--no-kd",
    "score_samples": "--score-samples", "recal_batches": "--recal-batches", "seed": "--seed", "device": "--device",
    "resume": "--no-resume",
    "data": "--data", "arch": "--arch", "weights": "--weights", "model": "--model",
    "baseline_epochs": "--baseline-epochs",
    "target_latency_ms": "--target-latency-ms", "runtime": "--runtime", "latency_batch": "--latency-batch",
    "threads": "--threads", "snap": "--no-snap",
}
#: Boolean settings whose flag turns them off (``--no-kd`` sets ``kd=False``).
NEGATED = frozenset({"connections", "kd", "resume", "snap"})
#: Settings that may change between a run and its resume: they do not change the result.
RESUMABLE_CHANGES = frozenset({"device", "resume"})
JOB_FILE = "job.json"
JOB_FORMAT = 1
CHECKPOINT_DIR = "checkpoint"


@dataclass
class JobOptions(SearchConfig):
    """The search settings (:class:`~evoprune.evolve.SearchConfig`: rounds, generations, population, elites, p_c,
    p_mut, target, objective, connections, seed...) plus what the job does around the search."""

    finetune_epochs: float = 1.0
    finetune_lr: float = 0.01
    kd: bool = True
    score_samples: int = 1000
    recal_batches: int = 20
    batch_size: int = 64
    device: str = "cpu"
    resume: bool = True

    def check(self):
        """Raise :class:`ConfigError` (its ``setting`` names the field; :data:`FLAGS` has its flag) for the first
        setting out of range."""
        if not _is_int(self.score_samples) or self.score_samples < 10:
            raise ConfigError(f"must be an int >= 10, got {self.score_samples!r}", setting="score_samples")
        if not _is_int(self.recal_batches) or self.recal_batches < 0:
            raise ConfigError(f"must be an int >= 0 (0 turns re-calibration off), got {self.recal_batches!r}",
                              setting="recal_batches")
        if not _is_number(self.finetune_epochs) or not self.finetune_epochs >= 0 or \
                math.isinf(self.finetune_epochs):
            raise ConfigError(f"must be a number >= 0 (0 turns fine-tuning off), got {self.finetune_epochs!r}",
                              setting="finetune_epochs")
        if not _is_number(self.finetune_lr) or not 0 < self.finetune_lr < math.inf:
            raise ConfigError(f"must be a number > 0, got {self.finetune_lr!r}", setting="finetune_lr")
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(f"must be an int >= 1, got {self.batch_size!r}", setting="batch_size")
        if not isinstance(self.device, str):
            raise ConfigError(f"must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}", setting="device")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"is {self.device!r}, but torch sees no CUDA device; use cpu", setting="device")
        super().check()

    def search_config(self) -> SearchConfig:
        return SearchConfig(**{f.name: getattr(self, f.name) for f in fields(SearchConfig)})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


@dataclass
class JobResult(SearchResult):
    """A :class:`~evoprune.evolve.SearchResult` plus what the job wrote: ``files`` (the paths this call wrote, in
    order), ``skipped`` (one line per output it could not write, e.g. pareto.png without matplotlib) and
    ``settings`` (as in report.json: the options, ``search_images``, ``report_images``, ``fitness.metric``)."""

    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


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
    g.add_argument("--target-latency-ms", type=float, default=None, metavar="MS",
                   help="aim at this latency in ms on --runtime instead of --target-macs (measured per round with a "
                        "latency table; reached geometrically over the rounds)")
    g.add_argument("--runtime", choices=RUNTIMES, default=d.runtime,
                   help="deployment runtime the latency is measured on (default: %(default)s; onnxruntime needs "
                        "pip install 'evoprune[onnx]')")
    g.add_argument("--latency-batch", type=int, default=d.latency_batch, metavar="N",
                   help="batch size the latency is measured at (default: %(default)s)")
    g.add_argument("--threads", type=int, default=d.threads, metavar="N",
                   help="the runtime's intra-op threads for latency (default: %(default)s)")
    g.add_argument("--no-snap", action="store_true",
                   help="with --target-latency-ms: allow any width, not only multiples of the CPU's channel block")
    g.add_argument("--objective", choices=("budget", "nsga2", "topk"), default=d.objective,
                   help="selection: budget (best score under the MACs or latency budget), nsga2 or topk "
                        "(default: %(default)s)")
    g.add_argument("--crossover", choices=CROSSOVERS, default=d.crossover,
                   help="paper (one-point at the p_c cut) or uniform (whole groups swap) (default: %(default)s)")
    g.add_argument("--mutation", choices=MUTATIONS, default=d.mutation,
                   help="guided (importance-biased flips), bitflip (the paper's), swap (which channels, at constant "
                        "widths), width (layer widths move) or mixed (width + swap) (default: %(default)s)")
    g.add_argument("--method", choices=METHODS, default=d.method,
                   help="ga (the genetic algorithm), or a baseline at the GA's evaluation budget (population + "
                        "generations x (population - elites) plans per round, ranked by the same fitness): random "
                        "(random search) or init (the GA's initial population alone) (default: %(default)s)")
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
    g.add_argument("--no-resume", action="store_true",
                   help="start over: delete the checkpoint in --out instead of resuming it (a resumed run must use "
                        "the same settings; --device may change)")


def options_from_args(args: argparse.Namespace) -> JobOptions:
    timed = args.target_latency_ms is not None
    opts = JobOptions(rounds=args.rounds, population=args.population, elites=args.elites, p_c=args.p_c,
                      p_mut=args.p_mut, generations=args.generations,
                      target=args.target_latency_ms if timed else args.target_macs,
                      target_kind="latency" if timed else "macs", runtime=args.runtime,
                      latency_batch=args.latency_batch, threads=args.threads, snap=not args.no_snap,
                      objective=args.objective, method=args.method,
                      crossover=args.crossover, mutation=args.mutation, connections=not args.no_connections,
                      finetune_epochs=args.finetune_epochs, kd=not args.no_kd, score_samples=args.score_samples,
                      recal_batches=args.recal_batches, seed=args.seed, device=args.device,
                      resume=not args.no_resume)
    opts.check()
    return opts


# ----------------------------------------------------------------------------------------------------------------
# Splits, fingerprints and the job record (checkpoint/job.json)
# ----------------------------------------------------------------------------------------------------------------

def val_splits(val: ImageSet, seed: int) -> tuple[ImageSet, ImageSet]:
    """``(search, report)``: the halves of ``val`` the job scores plans on and reports top-1 on (stratified, split
    with the job's ``seed``). ``evoprune evaluate --split val-report`` evaluates on the same report half."""
    return val.stratified_split(0.5, seed=seed)


def weights_digest(model: nn.Module) -> str:
    """A short SHA-1 of ``model``'s state_dict (names, shapes, dtypes and bytes): which teacher a run started from."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def data_fingerprint(data: Cifar10) -> dict:
    return {"train": data.train.fingerprint(), "val": data.val.fingerprint()}


def job_file(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / JOB_FILE


def _result_options(opts: JobOptions) -> dict:
    return {k: v for k, v in asdict(opts).items() if k not in RESUMABLE_CHANGES}


def read_job(out_dir: str | Path) -> dict | None:
    """The job record in ``out_dir`` (``checkpoint/job.json``), or None if there is none."""
    path = job_file(out_dir)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc}); use --no-resume to start over, "
                              "or a new --out", reason="corrupt") from None
    if not isinstance(record, dict) or record.get("format") != JOB_FORMAT or not isinstance(record.get("options"),
                                                                                            dict):
        raise CheckpointError(f"{path}: not an evoprune job record (format {JOB_FORMAT}); use --no-resume to start "
                              "over, or a new --out", reason="corrupt")
    return record


def _show(name: str, value) -> str:
    if name in NEGATED and isinstance(value, bool):
        return "not given" if value else "given"
    return "not given" if value is None else str(value)


def _differences(old: dict, new: dict) -> list[str]:
    lines = []
    for name in [k for k in new if k in old] + [k for k in new if k not in old] + [k for k in old if k not in new]:
        a, b = old.get(name), new.get(name)
        if a != b:
            lines.append(f"{FLAGS.get(name, name)} was {_show(name, a)}, now {_show(name, b)}")
    return lines


def check_resume(out_dir: str | Path, opts: JobOptions, *, source: dict | None = None, data: Cifar10 | None = None,
                 model: nn.Module | None = None) -> dict | None:
    """Check a run into ``out_dir`` against the job recorded there, before any work; return the record (None if
    there is none, or with ``opts.resume`` off).

    Raises :class:`ConfigError` naming each changed setting by its flag, with its old and new value, when any
    setting that changes the result differs (every :class:`JobOptions` field except ``device`` and ``resume``),
    when ``source`` (where the model and data come from; compared when given) differs, or when ``data`` or ``model``
    (compared when given) are not the data and teacher weights the run started with.
    """
    if not opts.resume:
        return None
    record = read_job(out_dir)
    if record is None:
        return None
    changes = _differences(record["options"], _result_options(opts))
    if source is not None and record.get("source") is not None:
        changes += _differences(record["source"], source)
    if data is not None and record.get("data") not in (None, data_fingerprint(data)):
        changes.append(f"the data differ (fingerprint {record['data']}, now {data_fingerprint(data)})")
    if model is not None and record.get("model") not in (None, weights_digest(model)):
        changes.append(f"the teacher's weights differ (digest {record['model']}, now {weights_digest(model)})")
    if changes:
        raise ConfigError(f"{out_dir} holds a run made with other settings: {'; '.join(changes)}. Use --no-resume to "
                          "start over, or a new --out")
    return record


def finished(out_dir: str | Path, opts: JobOptions, *, source: dict | None = None) -> bool:
    """Whether ``out_dir`` holds a finished run of this job (same settings; its report.md is there), so there is
    nothing to do. Raises like :func:`check_resume` when the settings differ; False with ``opts.resume`` off."""
    record = check_resume(out_dir, opts, source=source)
    return bool(record and record.get("complete") and (Path(out_dir) / "report.md").is_file())


def _remove_stale_checkpoint(out: Path, verbose: bool) -> None:
    from .checkpoint import FILENAME
    removed = []
    for path in (out / CHECKPOINT_DIR / FILENAME, job_file(out)):
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    if removed and verbose:
        status(f"evoprune: resume is off: removed the old {' and '.join(removed)} from {out / CHECKPOINT_DIR}")


def describe_files(files: list[str]) -> str:
    """``round{1..2}.pt, .torchscript.pt, .json; report.md, report.json, logbook.csv`` for a list of written paths
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


# ----------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------

def run(model: nn.Module, data: Cifar10, out_dir: str | Path, opts: JobOptions, *, title: str = "evoprune run",
        verbose: bool = True, source: dict | None = None) -> JobResult:
    """Prune ``model`` on ``data`` and write the compact models and the report into ``out_dir``; return a
    :class:`JobResult` (the search result plus the files this call wrote).

    ``source`` (optional, plain JSON values) says where the model and data came from, e.g. ``{"data": path,
    "weights": path}``; it is recorded in ``checkpoint/job.json`` and a resume with another source is refused. See
    the module docstring for resuming: the settings, the data and the teacher's weights are checked against the
    job recorded in ``out_dir`` before any work (:class:`ConfigError` on a change).
    """
    opts.check()
    out = Path(out_dir)
    check_resume(out, opts, source=source, data=data, model=model)
    out.mkdir(parents=True, exist_ok=True)
    if opts.resume:
        record = {"format": JOB_FORMAT, "evoprune_version": __version__, "title": title,
                  "options": _result_options(opts), "device": opts.device, "source": source,
                  "data": data_fingerprint(data), "model": weights_digest(model), "complete": False, "files": []}
        write_json(job_file(out), record)
    else:
        _remove_stale_checkpoint(out, verbose)
    search_set, report_set = val_splits(data.val, opts.seed)
    score_set = search_set.stratified_sample(min(opts.score_samples, len(search_set)), seed=opts.seed)
    score_x, score_y = normalize(score_set.images), score_set.labels
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
        written = export(net, out / f"round{k}.pt", example, formats=("pt", "torchscript"), plan=plan,
                         extra={"round": k, "row": row, "top1_split": "val-report", "split_seed": opts.seed})
        files.extend(written.values())

    fitness = FitnessConfig(bn_recalibration=bool(recal_x), device=opts.device)
    settings = {**asdict(opts), "search_images": len(score_set), "report_images": len(report_set),
                "fitness.metric": fitness.metric}
    result = search(model, example, score_x, score_y, recal_x=recal_x or None, report=report,
                    finetune=tune if opts.finetune_epochs > 0 else None, on_round=on_round,
                    config=opts.search_config(), fitness=fitness,
                    checkpoint_dir=str(out / CHECKPOINT_DIR) if opts.resume else None, verbose=verbose,
                    progress=verbose)
    written = write_report(result, out, title=title, settings=settings)
    files.extend(written[k] for k in ("md", "json", "logbook", "pareto") if k in written)
    skipped = [] if "pareto" in written else [PARETO_SKIPPED]
    if opts.resume:
        write_json(job_file(out), {**record, "complete": True, "files": [Path(f).name for f in files]})
    if verbose:
        status(result.table())
        status(f"evoprune: wrote {out}/{describe_files(files)}")
        for line in skipped:
            status(f"evoprune: {line}")
    return JobResult(**{f.name: getattr(result, f.name) for f in fields(SearchResult)}, files=files,
                     skipped=skipped, settings=settings)


def _recal_batches(train_set: ImageSet, opts: JobOptions) -> list[torch.Tensor]:
    """A fixed, stratified sample of training images for BN re-calibration (no augmentation)."""
    n = min(opts.recal_batches * opts.batch_size, len(train_set) - 1)
    if opts.recal_batches == 0 or n < 2:
        return []
    sample = train_set.stratified_sample(n, seed=opts.seed + 1)
    return [normalize(sample.images[i:i + opts.batch_size]) for i in range(0, n, opts.batch_size)]
