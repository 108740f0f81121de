"""The examples run: ``examples/vgg16_cifar.py`` serially and under ``python -m scoop`` on tiny generated CIFAR-like
data, and ``examples/deap_pipeline.py`` (evoprune inside a stock DEAP loop) serially and under SCOOP.

SCOOP exits 0 even when the program it runs fails, so the runs under it are judged by their output files and by the
absence of 'Traceback' and 'FAILED' in their output, not only by the return code."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evoprune.models import tiny_cnn, vgg16_bn_cifar

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TINY_FLAGS = ["--score-samples", "64", "--population", "6", "--elites", "2", "--generations", "1", "--rounds", "1",
              "--recal-batches", "2", "--finetune-epochs", "0.5"]
ROUND_FILES = ("round1.pt", "round1.pt2", "round1.json", "report.md", "report.json", "pareto.png",
               "logbook.csv")


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory, write_imagefolder):
    """A 32x32, 10-class ImageFolder tree (200 train / 100 val) and a random VGG16-BN state_dict."""
    root = write_imagefolder(tmp_path_factory.mktemp("cifar_like"), 200, 100, classes=10, size=32)
    torch.manual_seed(0)
    weights = root / "vgg16.pt"
    torch.save(vgg16_bn_cifar().state_dict(), weights)
    return root, weights


def run_script(argv, tmp_path: Path, *, scoop: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "EVOPRUNE_CACHE": str(tmp_path / "cache")}
    env.pop("EVOPRUNE_DATA", None)
    launcher = [sys.executable, "-m", "scoop", "-n", "2"] if scoop else [sys.executable]
    return subprocess.run(launcher + [str(a) for a in argv], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=timeout)


def assert_clean(proc: subprocess.CompletedProcess) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Traceback" not in output and "FAILED" not in output, output[-4000:]
    return output


@pytest.mark.slow
@pytest.mark.parametrize("scoop", [False, True], ids=["serial", "scoop"])
def test_vgg16_example_smoke(cifar_like, tmp_path, scoop, check_round_files):
    data, weights = cifar_like
    out = tmp_path / "run"
    proc = run_script([EXAMPLES / "vgg16_cifar.py", "--data", data, "--weights", weights, "--out", out, *TINY_FLAGS],
                      tmp_path, scoop=scoop)
    output = assert_clean(proc)
    for name in ROUND_FILES:
        assert (out / name).is_file(), f"{name} missing; output:\n{output[-3000:]}"
    check_round_files(out, 1)
    assert "final   : top-1" in output


@pytest.mark.slow
@pytest.mark.parametrize("scoop", [False, True], ids=["serial", "scoop"])
def test_deap_pipeline_example(tmp_path, scoop):
    out = tmp_path / "best"
    proc = run_script([EXAMPLES / "deap_pipeline.py", "--out", out], tmp_path, scoop=scoop, timeout=300)
    output = assert_clean(proc)
    assert "hall of fame (" in proc.stdout
    hof = proc.stdout.split("hall of fame (")[1]
    assert len([line for line in hof.splitlines() if line.strip().endswith("%")]) >= 1
    assert (out / "best.pt2").is_file() and (out / "best.json").is_file() and (out / "best.pt").is_file()
    assert "exported:" in output


# ---------------------------------------------------------------- the examples' flag handling, in-process (fast)

@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import _common
    return _common


def test_example_help_mentions_the_search_flags(common, capsys):
    assert common.main(tiny_cnn, "tiny example", argv=["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--data", "--weights", "--baseline-epochs", "--population", "--p-c", "--p-mut", "--rounds",
                 "--target-macs", "--out", "--no-resume"):
        assert flag in out


def test_example_errors_are_one_line_and_an_exit_code(common, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EVOPRUNE_CACHE", str(tmp_path / "cache"))
    code = common.main(tiny_cnn, "tiny example", argv=["--data", str(tmp_path / "missing"), "--out",
                                                        str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: {tmp_path / 'missing'}") and "must be one of" in err
    code = common.main(tiny_cnn, "tiny example", argv=["--data", str(tmp_path), "--p-mut", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --p-mut must be a probability")
    assert common.main(tiny_cnn, "tiny example", argv=["--rounds", "x"]) == 2
    assert capsys.readouterr().err.startswith("error: argument --rounds")


@pytest.mark.parametrize("script, build, paper_params", [("vgg16_cifar.py", vgg16_bn_cifar, 0.3e6),
                                                         ("resnet18_cifar.py", "resnet18_tv", 0.1e6)])
def test_the_documented_paper_protocol_parses_and_ends_at_the_papers_params(script, build, paper_params):
    """Each example's docstring gives the paper's protocol (issue 22): its flags parse with the example's own parser
    and checks, and its --target-params fraction ends at the paper's parameter count for the shared teacher."""
    import ast
    import shlex
    from evoprune import models
    from evoprune.cli.options import options_from_args
    sys.path.insert(0, str(EXAMPLES))
    import _common
    doc = ast.get_docstring(ast.parse((EXAMPLES / script).read_text()))
    lines = doc.replace("\\\n", " ").splitlines()
    (cmd,) = [line for line in lines if "--target-params" in line and "python -m scoop" in line]
    argv = shlex.split(cmd.split(script, 1)[1])
    opts = options_from_args(_common.parser("x", None).parse_args(argv))
    assert (opts.rounds, opts.population, opts.elites, opts.p_c, opts.p_mut) == (5, 30, 5, 0.6, 0.6)
    assert opts.target_kind == "params" and opts.finetune_epochs >= 1 and opts.kd and opts.reconstruct == "lsq"
    model = build() if callable(build) else getattr(models, build)()
    final = opts.target * sum(p.numel() for p in model.parameters())
    assert 0.99 * paper_params <= final <= paper_params
