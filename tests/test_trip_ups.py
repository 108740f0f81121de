"""What a new user trips over (issue 20): ``--out`` that cannot be written, the resume guard's flag names, a refused
run's leftovers, conflicting or useless settings, a latency over its budget, a missing --trust-pickle's exit code,
progress lines in logs, the model card's normalisation through ``evoprune export``, and the Pareto plot."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from deap import tools

from evoprune import SearchResult, progress
from evoprune.cli import job, resume
from evoprune.cli.commands import main
from evoprune.data import synthetic
from evoprune.errors import ConfigError
from evoprune.models import tiny_cnn
from evoprune.cli.options import JobOptions
from evoprune.evolve.report import markdown, pareto_axes

pytestmark = pytest.mark.usefixtures("torch_single_thread")
MISSING_DATA = "no/such/data/folder"  # a --data that fails to load: an error about anything else came first


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ --out
def test_out_naming_a_file_is_refused_before_the_data_load(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine")
    code, out, err = run(capsys, "prune", "--arch", "tiny", "--data", MISSING_DATA, "--out", target)
    assert code == 2
    line = one_error(err)
    assert "--out" in line and "is a file" in line and MISSING_DATA not in line
    assert target.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_out_under_an_unwritable_folder_is_refused_before_the_data_load(capsys):
    """/sys is not writable, even for root (mkdir there fails): the same class of error as a read-only mount."""
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        pass
    else:  # pragma: no cover - a machine where /sys is writable
        os.close(fd)
        os.unlink(probe)
        pytest.skip("/sys is writable here")
    code, out, err = run(capsys, "prune", "--arch", "tiny", "--data", MISSING_DATA, "--out", "/sys/evoprune-run")
    assert code == 2
    line = one_error(err)
    assert "--out /sys/evoprune-run" in line and "cannot write in /sys" in line


# ------------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("flags, named", [
    (["--target-macs", "0.3", "--target-latency-ms", "0.2"], ("--target-macs", "--target-latency-ms")),
    (["--target-params", "0.3", "--target-macs", "0.2"], ("--target-macs", "--target-params")),
    (["--elites", "6", "--population", "6"], ("--elites",)),
    (["--threads", "0"], ("--threads",)),
])
def test_conflicting_or_useless_settings_are_refused_naming_the_flags(flags, named, tmp_path, capsys):
    code, out, err = run(capsys, "prune", "--arch", "tiny", "--data", MISSING_DATA, "--out", tmp_path / "run",
                         *flags)
    assert code == 2
    line = one_error(err)
    assert all(flag in line for flag in named), line
    assert MISSING_DATA not in line and not (tmp_path / "run").exists()


def test_elites_equal_to_population_is_fine_with_explicit_offspring():
    JobOptions(population=6, elites=6, offspring=4).check()
    with pytest.raises(ConfigError) as exc:
        JobOptions(population=6, elites=6).check()
    assert exc.value.setting == "elites"


def test_target_params_sets_a_params_budget(tmp_path):
    from evoprune.cli.parser import build_parser
    from evoprune.cli.options import options_from_args
    args = build_parser().parse_args(["prune", "--arch", "tiny", "--out", str(tmp_path), "--target-params", "0.4"])
    opts = options_from_args(args)
    assert (opts.target, opts.target_kind) == (0.4, "params")
    args = build_parser().parse_args(["prune", "--arch", "tiny", "--out", str(tmp_path)])
    assert (options_from_args(args).target, options_from_args(args).target_kind) == (0.5, "macs")


# ------------------------------------------------------------------------------------------------ resume guard
@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A job record for a latency-target run, as a run that started writes it."""
    out = tmp_path_factory.mktemp("recorded")
    opts = JobOptions(target=0.2, target_kind="latency")
    resume.start_record(out, opts, title="t", source=None, data=synthetic(8, 8, seed=0), model=tiny_cnn())
    return out


def test_resume_guard_names_the_latency_flag(recorded):
    with pytest.raises(ConfigError) as exc:
        resume.check_resume(recorded, JobOptions(target=0.1, target_kind="latency"))
    msg = str(exc.value)
    assert "--target-latency-ms was 0.2, now 0.1" in msg and "--target-macs" not in msg


def test_resume_guard_names_the_flags_when_the_target_kind_changes(recorded):
    with pytest.raises(ConfigError) as exc:
        resume.check_resume(recorded, JobOptions(target=0.5, target_kind="macs"))
    msg = str(exc.value)
    assert "--target-latency-ms was 0.2, now not given" in msg and "--target-macs was not given, now 0.5" in msg
    assert "target_kind" not in msg


def test_a_run_refused_before_its_search_leaves_nothing(tmp_path, capsys):
    """A latency budget below the smallest legal plan is refused before the search; no checkpoint/job.json stays
    behind, so the corrected rerun into the same --out is not refused as a changed run."""
    pytest.importorskip("onnxruntime")
    out = tmp_path / "run"
    code, _, err = run(capsys, "prune", "--arch", "tiny", "--data", "demo:quick", "--out", out,
                       "--target-latency-ms", "0.000001", "--baseline-epochs", "1", "--score-samples", "20",
                       "--population", "4", "--elites", "2", "--generations", "1", "--rounds", "1")
    assert code == 2 and "--target-latency-ms" in one_error(err)
    assert not (out / "checkpoint" / "job.json").exists()
    assert [p.name for p in out.iterdir()] == [p.name for p in out.glob("baseline-*.pt")]  # only the cached baseline


# ------------------------------------------------------------------------------------------------ latency budget
def _latency_result(measured: float, budget: float = 0.2) -> SearchResult:
    base = {"params": 1000, "size_mb": 0.01, "macs": 1e6, "top1": 0.9, "latency_ms": 0.5, "latency_batch": 1,
            "latency_batch_ms": 0.5}
    row = {"round": 1, "params": 500, "size_mb": 0.005, "macs": 4e5, "top1": 0.85, "reduction_pct": 50.0,
           "macs_pct": 40.0, "time_s": 1.0, "latency_ms": measured, "latency_batch": 1, "latency_batch_ms": measured,
           "budget": budget, "budget_kind": "latency", "predicted_ms": 0.19, "search_score": 0.8, "cut": [],
           "evaluations": 10}
    return SearchResult([row], [{"a": 8}, {"a": 4}], [{}], [[(0.8, 0.19)]], [[(0.8, 0.19)]], tools.Logbook(),
                        baseline=base, cost="ms")


def test_a_latency_over_its_budget_is_said_in_the_summary_and_the_report():
    over = _latency_result(0.22)
    result = job.JobResult(**vars(over), files=[], skipped=[], settings={"runtime": "onnxruntime", "threads": 1})
    summary = job.summary_lines(result, Path("out"))
    assert "OVER the budget by 0.020 ms (10 %)" in summary
    assert "over its latency budget" in markdown(over, title="t") and "0.220 ms against 0.200 ms" in markdown(
        over, title="t")
    within = _latency_result(0.180)
    result = job.JobResult(**vars(within), files=[], skipped=[], settings={"runtime": "onnxruntime", "threads": 1})
    assert "OVER" not in job.summary_lines(result, Path("out")) and "over its" not in markdown(within, title="t")


# ------------------------------------------------------------------------------------------------ progress in logs
def test_plain_progress_lines_off_a_terminal(capfd, monkeypatch):
    """stderr is no terminal here: a long step prints plain lines (name, done/total, elapsed, ETA) at a bounded
    rate, and a closing line; a short one prints nothing."""
    monkeypatch.delenv("EVOPRUNE_PROGRESS", raising=False)
    clock = iter(range(0, 1000, 5))  # every call to the clock: 5 s later
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setenv("EVOPRUNE_PROGRESS_INTERVAL", "12")
    with progress.bar(total=10, desc="round 1/2 gen 0/4", unit="plan") as shown:
        for _ in range(10):
            shown.update()
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert out == "" and "\r" not in err and "\x1b" not in err
    assert lines[0] == "evoprune: round 1/2 gen 0/4: 1/10 plan (10 %), 5 s, ETA 45 s"
    assert lines[-1].endswith("10/10 plan (100 %), 55 s (done)")
    assert 3 <= len(lines) <= 6  # 55 s at one line per 12 s at most, plus the first and the last
    clock = iter(range(100))  # 1 s per call: under FIRST_LINE_S until the end
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock) * 0.1)
    with progress.bar(total=3, desc="short") as shown:
        for _ in range(3):
            shown.update()
    assert capfd.readouterr() == ("", "")
    monkeypatch.setenv("EVOPRUNE_PROGRESS", "0")
    assert progress.bar(total=3).disable


# ------------------------------------------------------------------------------------------------ export
def test_export_keeps_the_normalization_of_the_source_card(tmp_path, capsys):
    model = tiny_cnn().eval()
    torch.save(model, tmp_path / "round1.pt")
    stats = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616]}
    (tmp_path / "round1.json").write_text(json.dumps({"input_shape": [1, 3, 16, 16], "normalization": stats,
                                                      "round": 1}))
    code, out, err = run(capsys, "export", "--model", tmp_path / "round1.pt", "--trust-pickle", "--out",
                         tmp_path / "edge" / "net", "--formats", "pt2")
    assert code == 0, err
    card = json.loads((tmp_path / "edge" / "net.json").read_text())
    assert card["normalization"] == stats and card["round"] == 1 and card["input_shape"] == [1, 3, 16, 16]


# ------------------------------------------------------------------------------------------------ the Pareto plot
def test_pareto_plot_draws_the_budget_and_keeps_labels_inside():
    pytest.importorskip("matplotlib")
    row = {"round": 1, "macs": 2e5, "search_score": 0.9, "budget": 2.5e5, "budget_kind": "macs"}
    result = SearchResult([row], [{}, {}], [{}], [[(0.5, 1e5), (0.9, 2e5)]], [[(0.9, 2e5)]], tools.Logbook())
    ax = pareto_axes(result)
    vertical = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert [line.get_xdata()[0] for line in vertical] == [0.25]  # the budget, in MMACs
    low, high = ax.get_ylim()
    assert high > 0.9 + 0.05 * (0.9 - 0.5)  # room above the top point for its label
    ax.figure.clf()


class _Branchy(torch.nn.Module):
    """Data-dependent control flow: torch.export refuses it (ONNX's tracer and the pickle do not)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y.mean((2, 3)) if y.sum() > 0 else -y.mean((2, 3))


def test_a_format_that_cannot_be_written_is_skipped_only_when_optional(tmp_path):
    from evoprune.deploy import export
    from evoprune.errors import ModelError
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ModelError, match="torch.export"):
        export(_Branchy().eval(), tmp_path / "strict", x, formats=("pt", "pt2"))
    with pytest.warns(UserWarning, match="the .pt2 file is not written"):
        written = export(_Branchy().eval(), tmp_path / "lenient", x, formats=("pt", "pt2"), optional=("pt2",))
    assert set(written) == {"pt", "card"} and not (tmp_path / "lenient.pt2").exists()
    card = json.loads(Path(written["card"]).read_text())
    assert "torch.export" in card["skipped"]["pt2"] and set(card["files"]) == {"pt"}
