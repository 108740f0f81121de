"""Fitness: score a plan by top-1 (or loss, or KL to the unpruned model) on a held-out subset, plus its cost.

* **Faithful.** BatchNorm statistics are re-calibrated on a few fixed training batches before scoring (adaptive BN,
  as in EagleEye). Pruning shifts every downstream activation distribution, so without it the quick score ranks plans
  poorly.
* **Fast.** Each plan is scored masked (no copy, full-size compute) or physically pruned (tensors sliced straight
  from the space's index maps, :func:`evoprune.prune.slicing.slice_plan`: no graph trace), whichever is cheaper for its
  MACs; image models run channels-last; tensors stay in memory; the genes are checked and the plan validated once;
  the last :data:`CACHE_SIZE` genomes are cached; inference mode. :meth:`Evaluator.screening` scores on the first
  share of the images and re-calibration batches only (the first stage of a staged search); the unpruned model's
  outputs (for ``metric="kl"``) are computed once per process.
* **Parallel-friendly.** An :class:`Evaluator` pickles to a few hundred bytes: the model and tensors are published
  once (:mod:`evoprune.evolve.engines`: SCOOP, a process pool or Dask) and every process loads them once, keeping
  the :data:`MAX_WORKERS` newest evaluators' state (a search makes one per round), so memory stays flat over rounds.
"""
from __future__ import annotations

import copy
import math
import os
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import ConfigError, EvaluationError, ModelError, PlanError
from ..netinfo import check_finite
from ..prune.bn import recalibrate_bn, restored_bn
from ..prune.grams import TeacherGrams
from ..prune.lsq import CALIB_IMAGES, calibration_subset
from ..prune.slicing import slice_plan
from ..prune.surgery import masked
from ..space.genome import check_genes, decode
from ..space.pruning_space import PruningSpace
from ..validators import check_device, check_fraction, check_int
from .engines import fetch, forget, owned, publish, scoop_origin, under_scoop

_WORKERS: "OrderedDict[str, _Worker]" = OrderedDict()  # token -> loaded state, in this process, newest last
MAX_WORKERS = 2  # loaded fitness states a process keeps: this round's and the one before (one model each)
CACHE_SIZE = 4096  # genomes whose fitness a process remembers (least recently used dropped first)


METRICS = ("top1", "loss", "kl")
WORST_SCORE = -math.inf
"""The score of a plan whose fitness call failed under ``on_error="worst"``: below every real score of every metric
(top-1 is in [0, 1], minus a loss is in (-inf, 0]), so a crashed plan never wins a selection or joins a front."""


def reference_score(metric: str, num_classes: int) -> float:
    """The score of a chance-level classifier: top-1 0 for ``"top1"`` (anything above is better than nothing), minus
    the loss of the uniform prediction, ``-ln(num_classes)``, for ``"loss"``. The logbook's hypervolume and the
    Pareto plot measure plans against it."""
    if metric in ("loss", "kl"):  # KL to the teacher of the uniform prediction is at most ln(classes)
        return -math.log(max(2, int(num_classes)))
    return 0.0


@dataclass
class FitnessConfig:
    metric: str = "top1"  # "top1", "loss" (minus the mean loss) or "kl" (minus the mean KL to the unpruned model's
    # outputs: needs no labels)
    bn_recalibration: bool = True
    batch_size: int = 500
    mode: str = "auto"  # "auto", "masked" or "physical"
    physical_below: float = 0.6  # auto: prune physically when the plan keeps less than this fraction of MACs
    on_error: str = "raise"  # "raise" (fail fast) or "worst" (score WORST_SCORE = -inf at full MACs, warn, continue)
    threads: int | None = None  # torch threads per SCOOP worker (default 1); None leaves serial runs alone
    device: str = "cpu"
    finetune_steps: int = 0  # >0: distil the unpruned model into each plan for this many steps before scoring
    cut_steps: int = 0  # >0: distil only plans that cut a connection unit, for this many steps (judges depth cuts)
    finetune_lr: float = 0.01
    reconstruct: str = "none"  # "lsq": score each plan after a least-squares refit from the teacher's inputs (B6)
    calib_images: int = CALIB_IMAGES  # reconstruct: the first images of recal_x the refit is fitted on
    trace_dir: str | None = None  # if set, each process appends one line per evaluation to evals-<pid>.log there

    def check(self):
        if self.metric not in METRICS:
            raise ConfigError(f"must be 'top1', 'loss' or 'kl', got {self.metric!r}", setting="metric")
        if self.mode not in ("auto", "masked", "physical"):
            raise ConfigError(f"mode must be 'auto', 'masked' or 'physical', got {self.mode!r}")
        if self.on_error not in ("raise", "worst"):
            raise ConfigError(f"on_error must be 'raise' or 'worst', got {self.on_error!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {self.batch_size!r}")
        for name in ("finetune_steps", "cut_steps"):
            v = getattr(self, name)
            check_int(name, v, 0)
            if v and not self.bn_recalibration:
                raise ConfigError(f"{name} needs bn_recalibration (its batches are the fine-tuning data)")
        if self.reconstruct not in ("none", "lsq"):
            raise ConfigError(f"fitness reconstruct must be 'none' or 'lsq', got {self.reconstruct!r} (bias "
                              "compensation changes nothing a BN re-calibration does not)", setting="reconstruct")
        if self.reconstruct != "none" and not self.bn_recalibration:
            raise ConfigError("fitness reconstruct needs the re-calibration batches as its calibration images; "
                              "turn bn_recalibration on", setting="reconstruct")
        check_int("calib_images", self.calib_images)
        check_device(self.device)


class Evaluator:
    """``evaluator(individual) -> (score, cost)``: the DEAP ``evaluate`` function. The cost is the plan's MACs, or
    with ``latency`` (a :class:`evoprune.deploy.latency.LatencyTable` of ``space``) its predicted latency in ms.

    ``score_x``/``score_y``: the held-out scoring subset (normalised inputs, int labels; with ``metric="kl"`` the
    labels may be None). ``recal_x``: a list of input batches for BN re-calibration (taken from training data), or
    None to skip it. Build one per round.
    """

    fraction = 1.0  # the share of the images and re-calibration batches a call scores on (see screening)

    def __init__(self, model: nn.Module, space: PruningSpace, score_x: torch.Tensor, score_y: torch.Tensor,
                 recal_x=None, config: FitnessConfig | None = None, latency=None):
        config = config or FitnessConfig()
        config.check()
        if score_y is None and config.metric != "kl":
            raise ConfigError(f"metric {config.metric!r} needs labels (score_y); without labels use metric='kl'",
                              setting="metric")
        if len(score_x) == 0 or (score_y is not None and len(score_x) != len(score_y)):
            raise ConfigError(f"scoring data must be non-empty with one label per input "
                              f"({len(score_x)} inputs, {0 if score_y is None else len(score_y)} labels)")
        if tuple(score_x.shape[1:]) != tuple(space.input_shape[1:]):
            raise ModelError(f"scoring inputs have shape {tuple(score_x.shape[1:])} per sample, the space was built "
                             f"for {tuple(space.input_shape[1:])}")
        if config.bn_recalibration and not recal_x:
            raise ConfigError("BN re-calibration is on but no recal_x batches were given (pass training batches, "
                              "or set bn_recalibration=False)")
        if latency is not None:
            latency.check_space(space)
        check_finite(model)
        self.token = f"evoprune_{uuid.uuid4().hex}"
        self.config = config
        self.space = space  # small: names, sizes and the cost table
        payload = {"model": copy.deepcopy(model).cpu().eval(), "space": space, "score_x": score_x, "score_y": score_y,
                   "recal_x": list(recal_x or []), "config": config, "latency": latency}
        publish(self.token, payload)

    def __getstate__(self):
        return {"token": self.token, "config": self.config, "space": None, "fraction": self.fraction}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __call__(self, individual) -> tuple[float, float]:
        return _worker(self.token).evaluate(individual, self.fraction)

    def screening(self, fraction: float) -> "Evaluator":
        """This evaluator scoring on the first ``fraction`` of the images and of the re-calibration batches only:
        the cheap first stage of a staged search (same published state; its scores are cached apart)."""
        other = copy.copy(self)
        other.fraction = check_fraction("screen", fraction)
        return other

    def rescore(self, individual, x: torch.Tensor, y: torch.Tensor | None) -> float:
        """The score of ``individual`` on other images ``x`` (labels ``y``), scored the same way (uncached, in this
        process): the final choice re-scores its candidates on images the search never selected on."""
        return _worker(self.token).evaluate_on(individual, x, y)

    def score_model(self, model: nn.Module) -> float:
        """Score a whole model (no plan) the way plans are scored, without BN re-calibration."""
        return _worker(self.token).score(model)[0]

    def release(self):
        """Free this evaluator's state in this process. Worker processes free theirs when they load a newer
        evaluator's (they keep at most :data:`MAX_WORKERS`)."""
        _WORKERS.pop(self.token, None)
        forget(self.token)


def _worker(token: str) -> "_Worker":
    w = _WORKERS.get(token)
    if w is not None:
        _WORKERS.move_to_end(token)
        return w
    payload = fetch(token)
    if payload is None:
        raise EvaluationError(f"no fitness state for {token} in process {os.getpid()}: create the Evaluator in "
                              "the main program before mapping it, and do not map an evaluator after a newer one "
                              f"has been mapped {MAX_WORKERS} times over (workers keep the {MAX_WORKERS} newest)")
    w = _WORKERS[token] = _Worker(payload)
    if not owned(token):  # a worker process: the loaded state is all it needs
        forget(token)
    while len(_WORKERS) > MAX_WORKERS:  # an older round's model and cache (its shared copy went at its load)
        _WORKERS.popitem(last=False)
    return w


class _Worker:
    """The heavy state of an Evaluator inside one process."""

    def __init__(self, payload):
        self.cfg: FitnessConfig = payload["config"]
        if under_scoop() and not scoop_origin():
            torch.set_num_threads(self.cfg.threads or 1)
        elif self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.device = torch.device(self.cfg.device)
        self.space: PruningSpace = payload["space"]
        # image models run faster channels-last (oneDNN's blocked kernels and max-pool on CPU): the same maths
        self.memory_format = torch.channels_last if len(self.space.input_shape) == 4 else torch.contiguous_format
        self.model = payload["model"].to(self.device, memory_format=self.memory_format).eval()
        self.x = payload["score_x"].to(self.device).contiguous(memory_format=self.memory_format)
        self.y = None if payload["score_y"] is None else payload["score_y"].to(self.device)
        self.recal = [b.to(self.device).contiguous(memory_format=self.memory_format) for b in payload["recal_x"]]
        self.targets = None  # the unpruned model's soft targets on the recal batches, for finetune_steps
        self.teacher_logp = None  # its log-probabilities on x, for metric="kl" (computed at the first score)
        self.example = self.x[:1]
        self.latency = payload.get("latency")
        self.grams = None  # TeacherGrams for reconstruct="lsq", collected at the first plan scored
        self.cache: OrderedDict[bytes, tuple[float, float]] = OrderedDict()  # at most CACHE_SIZE, LRU
        self.calls = 0
        self.hits = 0

    def evaluate(self, individual, fraction: float = 1.0) -> tuple[float, float]:
        try:
            genes = check_genes(self.space, individual)  # once: decode and the cost reuse the array
        except PlanError as exc:
            return self._failed(individual, exc, None)
        key = genes.tobytes() + (b"" if fraction == 1.0 else repr(fraction).encode())
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            self.hits += 1
            return hit
        self.calls += 1
        t0 = time.perf_counter()
        try:
            plan = decode(self.space, genes, check=False)
            counts, active = self.space.layout.kept_counts(genes), self.space.layout.active_connections(genes)
            macs, _ = self.space.cost_from_counts(counts, active)
            cost = macs if self.latency is None else self.latency.predict_counts(counts, active)
            score, loss = self._score_plan(plan, macs, self._data(fraction))
            if not math.isfinite(loss):
                raise EvaluationError(f"the scoring loss is {loss}")
        except Exception as exc:
            return self._failed(individual, exc, key)
        result = (float(score), float(cost))
        self._remember(key, result)
        if self.cfg.trace_dir:
            self._trace(key, result, time.perf_counter() - t0)
        return result

    def _data(self, fraction: float, x=None, y=None):
        """(images, labels, teacher log-probabilities or None, re-calibration batches) for one call: the first
        ``fraction`` of this worker's, or the given images with all the batches."""
        if x is not None:
            x = x.to(self.device).contiguous(memory_format=self.memory_format)
            return x, None if y is None else y.to(self.device), self._teacher(x), self.recal
        n = max(1, round(fraction * len(self.x)))
        m = max(1, round(fraction * len(self.recal))) if self.recal else 0
        if self.cfg.metric == "kl" and self.teacher_logp is None:
            self.teacher_logp = self._teacher(self.x)
        t = None if self.teacher_logp is None else self.teacher_logp[:n]
        return self.x[:n], None if self.y is None else self.y[:n], t, self.recal[:m]

    def _teacher(self, x):
        """The unpruned model's log-probabilities on ``x`` (metric "kl"), else None."""
        if self.cfg.metric != "kl":
            return None
        bs = self.cfg.batch_size
        with torch.inference_mode():
            return torch.cat([torch.log_softmax(self.model(x[i:i + bs]).float(), 1) for i in range(0, len(x), bs)])

    def evaluate_on(self, individual, x, y) -> float:
        """The score of ``individual`` on ``x``/``y`` (no cache, errors raised)."""
        genes = check_genes(self.space, individual)
        plan = decode(self.space, genes, check=False)
        macs, _ = self.space.cost_from_counts(self.space.layout.kept_counts(genes),
                                              self.space.layout.active_connections(genes))
        return float(self._score_plan(plan, macs, self._data(1.0, x, y))[0])

    def _remember(self, key, result) -> None:
        self.cache[key] = result
        if len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)

    def _failed(self, individual, exc, key) -> tuple[float, float]:
        """Inside an ``except`` block: score ``individual`` as the worst plan (``on_error="worst"``), or raise a
        :class:`PlanError` as it is and anything else as an :class:`EvaluationError` with the plan and traceback."""
        summary = _describe(self.space, individual)
        if self.cfg.on_error == "worst":
            import warnings
            warnings.warn(f"fitness failed for {summary} ({type(exc).__name__}: {exc}); scored as worst",
                          stacklevel=3)
            worst_cost = self.space.base_macs if self.latency is None else self.latency.base_ms
            result = (WORST_SCORE, float(worst_cost))
            if key is not None:
                self._remember(key, result)
            return result
        if isinstance(exc, PlanError):
            raise exc
        raise EvaluationError(f"fitness failed for {summary} in process {os.getpid()}:\n"
                              f"{traceback.format_exc()}") from None

    def _trace(self, key, result, seconds):
        import hashlib
        line = f"{os.getpid()} {hashlib.sha1(key).hexdigest()[:12]} {result[0]:.6f} {result[1]:.0f} {seconds:.4f}\n"
        with open(os.path.join(self.cfg.trace_dir, f"evals-{os.getpid()}.log"), "a") as fh:
            fh.write(line)

    def _score_plan(self, plan, macs, data):
        mode = self.cfg.mode
        if mode == "auto":
            mode = "physical" if macs < self.cfg.physical_below * self.space.base_macs else "masked"
        steps = self.cfg.finetune_steps or (self.cfg.cut_steps if plan.cut else 0)
        plan = self.space.resolve(plan)  # once: the slicing, the refit and the masking share it
        if self.cfg.reconstruct == "lsq":  # the refit targets the unpruned model's BN statistics: no re-calibration
            if self.grams is None:
                self.grams = TeacherGrams.collect(self.model, self.space,
                                                  calibration_subset(self.recal, self.cfg.calib_images))
            net = slice_plan(self.model, plan, self.space, validate=False, example_inputs=self.example).eval()
            self.grams.refit(self.model, net, plan, self.space)
            if steps:
                self._distil(net, steps)
            return self.score(net.to(memory_format=self.memory_format), data)
        if mode == "physical" or steps:
            net = slice_plan(self.model, plan, self.space, validate=False, example_inputs=self.example).eval()
            net = net.to(memory_format=self.memory_format)
            if self.cfg.bn_recalibration:
                recalibrate_bn(net, data[3])
            if steps:
                self._distil(net, steps)
                if self.cfg.bn_recalibration:
                    recalibrate_bn(net, data[3])
            return self.score(net, data)
        with masked(self.model, plan, self.space, validate=False) as net:
            if self.cfg.bn_recalibration:
                with restored_bn(net):
                    recalibrate_bn(net, data[3])
                    return self.score(net, data)
            return self.score(net, data)

    def _distil(self, net, steps: int):
        """A few SGD steps distilling the unpruned model into ``net`` on the re-calibration batches: a short-term
        fine-tune that rates how well a plan recovers, not only what it keeps."""
        if self.targets is None:
            with torch.no_grad():
                self.targets = [torch.softmax(self.model(b) / 4.0, dim=1) for b in self.recal]
        opt = torch.optim.SGD(net.parameters(), lr=self.cfg.finetune_lr, momentum=0.9, nesterov=True,
                              weight_decay=5e-4)
        net.train()
        for step in range(steps):
            k = step % len(self.recal)
            logp = torch.log_softmax(net(self.recal[k]) / 4.0, dim=1)
            loss = nn.functional.kl_div(logp, self.targets[k], reduction="batchmean") * 16.0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()

    def score(self, net, data=None) -> tuple[float, float]:
        """(score, loss) of ``net`` on ``data`` (:meth:`_data`; default: all of this worker's images). The loss is
        the cross-entropy, or with metric "kl" the mean KL(unpruned || net) over the images."""
        x, labels, teacher, _ = data or self._data(1.0)
        correct, loss_sum = 0, 0.0
        bs, kl = self.cfg.batch_size, self.cfg.metric == "kl"
        with torch.inference_mode():
            for i in range(0, len(x), bs):
                logits = net(x[i:i + bs])
                if kl:
                    logp = torch.log_softmax(logits.float(), 1)
                    loss_sum += float(nn.functional.kl_div(logp, teacher[i:i + bs], reduction="sum", log_target=True))
                    continue
                y = labels[i:i + bs]
                correct += int((logits.argmax(1) == y).sum())
                loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        loss = loss_sum / len(x)
        score = correct / len(x) if self.cfg.metric == "top1" else -loss
        return score, loss


def _describe(space: PruningSpace, individual) -> str:
    try:
        counts = space.layout.kept_counts(individual)
        widths = ", ".join(f"{g.name}={c}/{g.size}" for g, c in zip(space.groups, counts))
        cut = [u.name for u, a in zip(space.units, space.layout.active_connections(individual)) if not a]
        return f"plan [{widths}; cut: {', '.join(cut) or 'none'}]"
    except Exception:
        return f"an individual of {len(individual)} genes"


__all__ = ["Evaluator", "FitnessConfig", "WORST_SCORE", "reference_score", "recalibrate_bn", "restored_bn"]
