"""The prune job's record in ``<out>/checkpoint/job.json``, and the checks that decide whether a run may resume.

With ``resume`` on (the default) the job keeps ``<out>/checkpoint/``: the search's ``checkpoint.pt`` and ``job.json``,
which records every :class:`~evoprune.cli.options.JobOptions` setting, where the model and data came from (``source``,
given by the command line), a fingerprint of the data and a digest of the teacher's weights, and whether the run
finished. A later run into the same ``out`` checks them before any work (:func:`check_resume`; the command line does so
before it even loads the data) and refuses a change of anything that changes the result, naming the flags with their old
and new values. ``--device`` and the engine (``--executor``, ``--scheduler``, ``--workers``) may change (they change
where, not what, up to float rounding), and so may ``--no-resume`` itself. A run whose ``job.json`` says it finished is
complete; the command line then does nothing (:func:`finished`). With ``resume`` off the job keeps no checkpoint and
deletes a stale one in ``out`` (:func:`remove_stale_checkpoint`: its outputs are being replaced, so it no longer
describes them).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from .._version import __version__
from ..errors import CheckpointError, ConfigError
from ..evolve.checkpoint import FILENAME as CHECKPOINT_FILE
from ..progress import status
from ..storage import write_json
from .options import FLAGS, NEGATED, TARGET_FLAGS, JobOptions

#: Settings that may change between a run and its resume: they do not change the result.
RESUMABLE_CHANGES = frozenset({"device", "resume", "executor", "scheduler", "workers"})  # where, not what
JOB_FILE = "job.json"
JOB_FORMAT = 1
CHECKPOINT_DIR = "checkpoint"


def weights_digest(model: nn.Module) -> str:
    """A short SHA-1 of ``model``'s state_dict (names, shapes, dtypes and bytes): which teacher a run started from."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def data_fingerprint(data) -> dict:
    """Fingerprints of the ``train`` and ``val`` sets of ``data``: which images a run started from."""
    return {"train": data.train.fingerprint(), "val": data.val.fingerprint()}


def job_file(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / JOB_FILE


def result_options(opts: JobOptions) -> dict:
    """The settings of ``opts`` that change the result (all but :data:`RESUMABLE_CHANGES`)."""
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


def _by_flag(options: dict) -> dict:
    """``options`` with ``target``/``target_kind`` as the one target flag that set them (``target`` for
    --target-macs, ``target_params``, ``target_latency_ms``), so that a change names the flags the user gave."""
    if "target_kind" not in options:
        return options
    out = {k: v for k, v in options.items() if k not in ("target", "target_kind")}
    name = {kind: flag for flag, kind in TARGET_FLAGS.items()}.get(options["target_kind"], "target")
    out[name] = options.get("target")
    return out


def _differences(old: dict, new: dict) -> list[str]:
    old, new = _by_flag(old), _by_flag(new)
    lines = []
    for name in [k for k in new if k in old] + [k for k in new if k not in old] + [k for k in old if k not in new]:
        a, b = old.get(name), new.get(name)
        if a != b:
            lines.append(f"{FLAGS.get(name, name)} was {_show(name, a)}, now {_show(name, b)}")
    return lines


def check_resume(out_dir: str | Path, opts: JobOptions, *, source: dict | None = None, data=None,
                 model: nn.Module | None = None) -> dict | None:
    """Check a run into ``out_dir`` against the job recorded there, before any work; return the record (None if
    there is none, or with ``opts.resume`` off).

    Raises :class:`ConfigError` naming each changed setting by its flag, with its old and new value, when any
    setting that changes the result differs (every :class:`JobOptions` field except ``device`` and ``resume``),
    when ``source`` (where the model and data come from; compared when given) differs, or when ``data`` or ``model``
    (compared when given) are not the data and teacher weights the run started with.
    """
    record = check_settings(out_dir, opts, source=source)
    check_inputs(out_dir, record, data=data, model=model)
    return record


def check_settings(out_dir: str | Path, opts: JobOptions, *, source: dict | None = None) -> dict | None:
    """The half of :func:`check_resume` that needs neither data nor model: the settings and ``source``. The command
    line runs it before it loads anything; :func:`check_inputs` finishes the check once they are loaded."""
    if not opts.resume:
        return None
    record = read_job(out_dir)
    if record is None:
        return None
    changes = _differences(record["options"], result_options(opts))
    if source is not None and record.get("source") is not None:
        changes += _differences(record["source"], source)
    _refuse(out_dir, changes)
    return record


def check_inputs(out_dir: str | Path, record: dict | None, *, data=None, model: nn.Module | None = None) -> None:
    """The other half: ``data`` and ``model`` (compared when given) are the data and teacher weights the recorded run
    (``record``, from :func:`check_settings`; None: nothing recorded) started with."""
    if record is None:
        return
    changes = []
    if data is not None and record.get("data") not in (None, data_fingerprint(data)):
        changes.append(f"the data differ (fingerprint {record['data']}, now {data_fingerprint(data)})")
    if model is not None and record.get("model") not in (None, weights_digest(model)):
        changes.append(f"the teacher's weights differ (digest {record['model']}, now {weights_digest(model)})")
    _refuse(out_dir, changes)


def _refuse(out_dir, changes: list[str]) -> None:
    if changes:
        raise ConfigError(f"{out_dir} holds a run made with other settings: {'; '.join(changes)}. Use --no-resume to "
                          "start over, or a new --out")


def finished(out_dir: str | Path, record: dict | None) -> bool:
    """Whether ``out_dir``, whose record :func:`check_settings` returned, holds a finished run of this job (its
    report.md is there), so there is nothing to do."""
    return bool(record and record.get("complete") and (Path(out_dir) / "report.md").is_file())


def start_record(out_dir: str | Path, opts: JobOptions, *, title: str, source: dict | None, data,
                 model: nn.Module) -> dict:
    """Write the record of a run that starts into ``out_dir`` (not complete yet) and return it."""
    record = {"format": JOB_FORMAT, "evoprune_version": __version__, "title": title,
              "options": result_options(opts), "device": opts.device, "source": source,
              "data": data_fingerprint(data), "model": weights_digest(model), "complete": False, "files": []}
    write_json(job_file(out_dir), record)
    return record


def finish_record(out_dir: str | Path, record: dict, files: list[str]) -> None:
    """Mark the run recorded in ``out_dir`` complete, with the names of the files it wrote."""
    write_json(job_file(out_dir), {**record, "complete": True, "files": [Path(f).name for f in files]})


def remove_stale_checkpoint(out: Path, verbose: bool) -> None:
    """With resume off: delete the search checkpoint and job record in ``out`` (they no longer describe it)."""
    removed = []
    for path in (out / CHECKPOINT_DIR / CHECKPOINT_FILE, job_file(out)):
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    if removed and verbose:
        status(f"evoprune: resume is off: removed the old {' and '.join(removed)} from {out / CHECKPOINT_DIR}")


def forget_unstarted(out: Path, *, remove_dir: bool) -> None:
    """After a run into ``out`` was refused before its first checkpoint: delete the job record it wrote (and the
    empty checkpoint folder, and ``out`` itself if this run made it and it is empty), so nothing is left behind."""
    if (out / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file():
        return
    job_file(out).unlink(missing_ok=True)
    for folder in (out / CHECKPOINT_DIR, out) if remove_dir else (out / CHECKPOINT_DIR,):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
