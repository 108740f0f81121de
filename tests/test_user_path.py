"""What a user meets on the way through the command line: the demo's figures and files, evaluating the demo's
outputs, the report without matplotlib and with the loss metric, and resuming (refused fast when a setting changed,
nothing redone when the run is finished)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import stat
import sys

import pytest
import torch
from deap import tools

from evoprune.cli import job, options, resume, sources
from evoprune.evolve import report
from evoprune.cli.demo import demo_options
from evoprune.cli.commands import main
from evoprune.errors import ConfigError
from evoprune.evolve import SearchResult

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TINY_SEARCH = ["--score-samples", "20", "--population", "4", "--elites", "2", "--generations", "1", "--rounds", "1",
               "--recal-batches", "1", "--finetune-epochs", "0.5"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EVOPRUNE_DATA", raising=False)


def run_main(*argv):
    """``main(argv)`` with stdout and stderr captured (works in module-scoped fixtures, unlike capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def demo(demo_run):
    """The session's ``evoprune demo --quick`` run (under umask 022): (exit code, stdout, stderr, out dir)."""
    return demo_run


# ------------------------------------------------------------------------------------------------ the demo

@pytest.mark.slow
def test_the_demo_labels_its_baseline_figures_with_one_split(demo):
    code, stdout, stderr, out = demo
    assert code == 0, stderr
    settings = json.loads((out / "report.json").read_text())["settings"]
    label = f"(val-report half, {settings['report_images']} images)"
    start = re.search(r"baseline top-1 (\d\.\d{4}) (\(.*?\))", stderr)
    end = re.search(r"baseline: top-1 (\d\.\d{4}) (\(.*?\))", stdout)
    assert start and end, (stdout, stderr)
    assert start.group(2) == end.group(2) == label
    assert start.group(1) == end.group(1)  # one figure, printed twice
    baseline = json.loads((out / "report.json").read_text())["baseline"]["top1"]
    assert end.group(1) == f"{baseline:.4f}"


@pytest.mark.slow
def test_the_demo_writes_files_with_the_umask_mode(demo):
    code, _, _, out = demo
    files = [p for p in out.rglob("*") if p.is_file()]
    assert code == 0 and len(files) >= 9
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


@pytest.mark.slow
def test_the_demo_files_line_lists_what_it_wrote(demo):
    code, stdout, stderr, out = demo
    files_line = next(line for line in stdout.splitlines() if line.startswith("files   :"))
    for name in ("report.md", "report.json", "logbook.csv", "pareto.png", ".pt2"):
        assert name in files_line
    assert "skipped" not in files_line and "skipped" not in stderr


@pytest.mark.slow
def test_the_demo_round_evaluates_to_the_reported_top1(demo):
    """The command the demo prints runs, and gives the top-1 the report gives for that round, on the same split."""
    code, stdout, stderr, out = demo
    (line,) = [line for line in stdout.splitlines() if line.startswith("check a round: ")]
    argv = shlex.split(line.split(": ", 1)[1])
    assert argv[0] == "evoprune" and "--data" in argv and "--split" in argv
    code, evaluated, err = run_main(*argv[1:])
    assert code == 0, err
    reported = json.loads((out / "report.json").read_text())
    top1, images = reported["rows"][-1]["top1"], reported["settings"]["report_images"]
    assert evaluated.startswith(f"top-1 {top1:.4f} on {images} val-report images")


def test_evaluate_help_examples_use_data_that_fit(capsys):
    assert main(["evaluate", "--help"]) == 0
    out = capsys.readouterr().out
    demo_examples = [line for line in out.splitlines() if "runs/demo/" in line]
    assert demo_examples and all("--data demo" in line for line in demo_examples)


def test_data_demo_reproduces_the_demo_data():
    """``--data demo[:quick][:SEED]`` is the data ``evoprune demo [--quick] [--seed SEED]`` trains on."""
    for quick, seed in ((False, 0), (True, 0), (True, 3)):
        name = sources.demo_data_name(quick, seed)
        assert sources.demo_data_spec(name) == (quick, seed)
        a, b = sources.demo_data(quick, seed), sources.demo_data(*sources.demo_data_spec(name))
        assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(sources.demo_data(True, 0).val.images, sources.demo_data(True, 3).val.images)
    assert len(sources.demo_data(False, 0).val) == demo_options(False)[0][1]
    assert sources.demo_data_spec("data/cifar10") is None


@pytest.mark.parametrize("spec", ["demo:fast", "demo:1:2", "demo:quick:quick"])
def test_a_bad_demo_data_spec_is_a_usage_error(spec, capsys):
    code = main(["evaluate", "--arch", "tiny", "--weights", "w.pt", "--data", spec])
    err = capsys.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "demo:quick" in err


# ------------------------------------------------------------------------------------------------ pareto.png

@pytest.mark.slow
def test_without_matplotlib_no_pareto_png_and_the_output_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    code, stdout, stderr = run_main("demo", "--quick", "--out", tmp_path / "run")
    assert code == 0, stderr
    assert not (tmp_path / "run" / "pareto.png").exists()
    assert (tmp_path / "run" / "report.md").is_file()
    files_line = next(line for line in stdout.splitlines() if line.startswith("files   :"))
    wrote_line = next(line for line in stderr.splitlines() if line.startswith("evoprune: wrote"))
    assert "pareto.png" not in wrote_line
    assert files_line.count("pareto.png") == 1
    assert files_line.endswith("pareto.png skipped: pip install 'evoprune[plot]'")
    assert "evoprune: pareto.png skipped: pip install 'evoprune[plot]'" in stderr


def fake_result(scores: list[float], macs: list[float]) -> SearchResult:
    """A one-round result whose evaluated plans have these fitness scores and MACs."""
    points = list(zip(scores, macs))
    best = max(points)
    row = {"round": 1, "params": 10, "size_mb": 0.1, "macs": best[1], "top1": 0.5, "top1_pruned": 0.4,
           "search_score": best[0], "reduction_pct": 10.0, "macs_pct": 50.0, "time_s": 1.0, "evaluations": 3,
           "cut": []}
    return SearchResult(rows=[row], widths=[{"fc": 4}, {"fc": 4}], plans=[{}], evaluated=[points],
                        pareto=[[best]], logbook=tools.Logbook(),
                        baseline={"params": 20, "size_mb": 0.2, "macs": 2 * best[1], "top1": 0.6})


def plotted_points(ax) -> list[tuple[float, float]]:
    pts = [tuple(map(float, xy)) for c in ax.collections for xy in c.get_offsets()]
    pts += [(float(x), float(y)) for line in ax.get_lines() for x, y in zip(line.get_xdata(), line.get_ydata())]
    return pts


@pytest.mark.parametrize("metric", ["top1", "loss"])
def test_the_pareto_plot_shows_the_metric_it_searched_on(metric):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    scores = [0.25, 0.5, 0.75] if metric == "top1" else [-2.3, -1.2, -0.4]  # loss: a score is minus the loss
    macs = [1e6, 2e6, 3e6]
    ax = report.pareto_axes(fake_result(scores, macs), metric=metric)
    try:
        shown = {round(y, 6) for _, y in plotted_points(ax)}
        expected = {round(s if metric == "top1" else -s, 6) for s in scores}
        assert shown == expected  # every plan is there, as top-1 or as the (positive) loss
        low, high = ax.get_ylim()
        assert all(low <= y <= high for y in shown)
        assert ax.get_ylabel() == report.AXIS_LABELS[metric]
        assert ("loss on the search split" if metric == "loss" else "top-1 on the search split") in ax.get_ylabel()
    finally:
        plt.close(ax.figure)


def test_write_report_plots_with_the_runs_metric(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    seen = []
    monkeypatch.setattr(report, "plot_pareto", lambda result, path, metric: seen.append(metric))
    written = report.write_report(fake_result([-2.0], [1e6]), tmp_path, settings={"fitness.metric": "loss"})
    assert seen == ["loss"] and "pareto" in written
    report.write_report(fake_result([0.5], [1e6]), tmp_path, settings={})
    assert seen == ["loss", "top1"]
    with pytest.raises(ConfigError):
        report.write_report(fake_result([0.5], [1e6]), tmp_path / "bad", settings={"fitness.metric": "f1"})
    assert not (tmp_path / "bad").exists()


def test_write_report_returns_only_what_it_wrote(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    written = report.write_report(fake_result([0.5], [1e6]), tmp_path)
    assert set(written) == {"json", "md", "logbook"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(os.path.basename(p) for p in written.values())


# ------------------------------------------------------------------------------------------------ resuming

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished ``evoprune prune --arch tiny`` run on the quick demo data: (out dir, argv)."""
    out = tmp_path_factory.mktemp("resume") / "run"
    argv = ["prune", "--arch", "tiny", "--data", "demo:quick", "--out", str(out), "--baseline-epochs", "1",
            *TINY_SEARCH]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVOPRUNE_CACHE", str(out.parent / "cache"))
        code, stdout, stderr = run_main(*argv)
    assert code == 0, stderr
    return out, argv


@pytest.fixture
def no_data(monkeypatch):
    """Any data load fails the test: the command must decide before loading data."""
    def refuse(*args, **kwargs):
        raise AssertionError("data were loaded")
    monkeypatch.setattr(sources, "load_data", refuse)


def outputs(out):
    return {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_a_finished_run_is_not_redone(finished_run, no_data, capsys):
    out, argv = finished_run
    before = outputs(out)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"evoprune: {out} already holds a finished run (report.md); nothing to do (--no-resume starts over)" in err
    assert outputs(out) == before


@pytest.mark.parametrize("change, old, new", [
    (["--target-macs", "0.3"], "0.5", "0.3"),
    (["--finetune-epochs", "1"], "0.5", "1.0"),
    (["--rounds", "2"], "1", "2"),
    (["--no-kd"], "not given", "given"),
    (["--baseline-epochs", "2"], "1", "2"),
    (["--data", "demo"], "demo:quick", "demo"),
    (["--reconstruct", "bias"], "lsq", "bias"),
    (["--fitness-reconstruct", "lsq"], "none", "lsq"),
])
def test_a_changed_setting_is_refused_before_any_data_are_loaded(finished_run, no_data, change, old, new, capsys):
    out, argv = finished_run
    flag = change[0]
    argv = [a for a in argv]
    if flag in argv:
        i = argv.index(flag)
        argv[i + 1] = change[1]
    else:
        argv += change
    before = outputs(out)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = error_lines(err)
    assert f"{flag} was {old}, now {new}" in line
    assert "use --no-resume to start over, or a new --out" in line.lower()
    assert outputs(out) == before


def test_job_run_refuses_other_settings_or_data_before_any_work(finished_run, monkeypatch):
    out, _ = finished_run
    monkeypatch.setattr(job, "search", lambda *a, **k: pytest.fail("the search ran"))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4))
    data = sources.demo_data(True, 0)
    recorded = json.loads(resume.job_file(out).read_text())["options"]
    opts = options.JobOptions(**{**recorded, "finetune_epochs": 2.0})
    with pytest.raises(ConfigError, match="--finetune-epochs was 0.5, now 2.0"):
        job.run(model, data, out, opts, verbose=False)
    same = options.JobOptions(**recorded)
    with pytest.raises(ConfigError, match="the data differ"):
        job.run(model, sources.demo_data(True, 1), out, same, verbose=False)
    with pytest.raises(ConfigError, match="teacher's weights differ"):
        job.run(model, data, out, same, verbose=False)


@pytest.mark.slow
def test_no_resume_starts_over_and_drops_the_old_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["prune", "--arch", "tiny", "--data", "demo:quick", "--out", out, "--baseline-epochs", "1", *TINY_SEARCH]
    assert main([str(a) for a in argv]) == 0
    assert json.loads(resume.job_file(out).read_text())["complete"] is True
    argv[argv.index("--score-samples") + 1] = "30"  # a change: refused unless starting over
    assert main([str(a) for a in argv]) == 2
    assert main([str(a) for a in argv] + ["--no-resume"]) == 0
    assert not resume.job_file(out).exists() and not (out / "checkpoint" / "checkpoint.pt").exists()
    assert json.loads((out / "report.json").read_text())["settings"]["score_samples"] == 30
    capsys.readouterr()


@pytest.mark.slow
def test_data_demo_evaluates_the_default_demo(tmp_path):
    """``--data demo`` (no qualifiers) is the data of a default ``evoprune demo`` run (about 10 s)."""
    out = tmp_path / "demo"
    code, stdout, stderr = run_main("demo", "--out", out)
    assert code == 0, stderr
    assert stdout.rstrip().endswith("--data demo --split val-report")  # the command it suggests
    code, evaluated, err = run_main("evaluate", "--model", out / "round2.pt2", "--data", "demo",
                                    "--split", "val-report")
    assert code == 0, err
    reported = json.loads((out / "report.json").read_text())
    assert evaluated.startswith(f"top-1 {reported['rows'][-1]['top1']:.4f} on "
                                f"{reported['settings']['report_images']} val-report images")
