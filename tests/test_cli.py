"""The ``evoprune`` command line, run in-process through ``main([...])`` (plus one real ``python -m evoprune``):
end to end on a tiny CNN and tiny generated data, exit codes, error lines and help texts."""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evoprune.cli import commands as cli, parser as cli_parser, options, sources
from evoprune import SearchConfig
from evoprune.cli.commands import main
from evoprune.models import load_weights, tiny_cnn

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("demo", "prune", "train", "evaluate", "export", "inspect")
TINY_SEARCH = ["--score-samples", "20", "--population", "4", "--elites", "2", "--generations", "1", "--rounds", "1",
               "--recal-batches", "1", "--finetune-epochs", "0.5"]


pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EVOPRUNE_DATA", raising=False)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory, write_imagefolder) -> Path:
    """A 16x16, 4-class ImageFolder tree of PNGs: 120 train and 60 val images."""
    return write_imagefolder(tmp_path_factory.mktemp("imagefolder"), 120, 60, classes=4, size=16)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> Path:
    """A whole tiny CNN saved with torch.save(model): a pickle, so it needs --trust-pickle."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    torch.save(tiny_cnn(num_classes=4).eval(), path)
    return path


@pytest.fixture(scope="module")
def demo(demo_run):
    """The session's ``evoprune demo --quick`` run: (exit code, out dir)."""
    return demo_run[0], demo_run[3]


# ------------------------------------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_demo_writes_every_report_file(demo):
    code, out = demo
    assert code == 0
    onnx = ("round1.onnx", "round2.onnx") if importlib.util.find_spec("onnx") is not None else ()
    for name in ("report.md", "report.json", "pareto.png", "logbook.csv", "round1.pt", "round1.pt2",
                 "round1.json", "round2.pt", "round2.pt2", "round2.json", *onnx):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = json.loads((out / "report.json").read_text())
    macs = [report["baseline"]["macs"]] + [row["macs"] for row in report["rows"]]
    assert len(macs) == 3 and all(a > b for a, b in zip(macs, macs[1:])), macs
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "logbook.csv").read_text().splitlines()[0].startswith("round,gen,evals")


@pytest.mark.slow
def test_demo_prints_a_summary(demo_run):
    code, out, err, folder = demo_run
    assert code == 0
    assert "baseline: top-1" in out and "final   : top-1" in out and "MMACs" in out and "params (-" in out
    assert str(folder) in out and (folder / "report.md").is_file()


@pytest.mark.slow
def test_prune_arch_tiny_on_an_imagefolder(imagefolder, tmp_path, capsys):
    code, out, err = run(capsys, "prune", "--arch", "tiny", "--data", imagefolder, "--out", tmp_path / "run",
                         "--baseline-epochs", "1", *TINY_SEARCH)
    assert code == 0, err
    for name in ("round1.pt", "round1.pt2", "round1.json", "report.json", "report.md", "logbook.csv"):
        assert (tmp_path / "run" / name).is_file(), name
    assert len(list((tmp_path / "run").glob("baseline-TinyCNN-e1-s0-*.pt"))) == 1  # cached, keyed by the data
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(report["rows"]) == 1 and report["rows"][0]["macs"] < report["baseline"]["macs"]
    assert "final   : top-1" in out


@pytest.mark.slow
def test_a_prune_checks_its_options_and_the_resume_record_once_each(imagefolder, tmp_path, capsys, monkeypatch):
    """On the way from the flags to the search, JobOptions.check and the resume check of the settings run once
    each (the data and weights, which the first check cannot see, are checked once they are loaded)."""
    from evoprune.cli import resume
    calls = {"check": 0, "settings": 0, "inputs": 0}
    real_check, real_settings, real_inputs = options.JobOptions.check, resume.check_settings, resume.check_inputs

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper
    monkeypatch.setattr(options.JobOptions, "check", counted("check", real_check))
    monkeypatch.setattr(resume, "check_settings", counted("settings", real_settings))
    monkeypatch.setattr(resume, "check_inputs", counted("inputs", real_inputs))
    code, out, err = run(capsys, "prune", "--arch", "tiny", "--data", imagefolder, "--out", tmp_path / "run",
                         "--baseline-epochs", "1", *TINY_SEARCH)
    assert code == 0, err
    assert calls == {"check": 1, "settings": 1, "inputs": 1}


@pytest.mark.slow
def test_prune_knapsack_with_a_kl_fitness_and_a_final_choice(imagefolder, tmp_path, capsys):
    """--method knapsack --metric kl: one evaluation, a label-free fitness; the rest of val's search half chooses,
    and the report says so."""
    code, out, err = run(capsys, "prune", "--arch", "tiny", "--data", imagefolder, "--out", tmp_path / "run",
                         "--baseline-epochs", "1", *TINY_SEARCH, "--method", "knapsack", "--metric", "kl")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["settings"]["fitness.metric"] == "kl" and report["settings"]["method"] == "knapsack"
    assert report["rows"][0]["evaluations"] == 1
    assert report["settings"]["choose_images"] > 0
    assert "choice score" in (tmp_path / "run" / "report.md").read_text()
    header = (tmp_path / "run" / "logbook.csv").read_text().splitlines()[0]
    assert "hamming" in header and "distinct" in header


@pytest.mark.slow
def test_prune_with_a_given_normalization_records_it(imagefolder, tmp_path, capsys):
    """--normalize MEAN/STD: the job scores, fine-tunes and reports with it, and the model card says so."""
    code, out, err = run(capsys, "prune", "--arch", "tiny", "--data", imagefolder, "--out", tmp_path / "run",
                         "--baseline-epochs", "1", "--normalize", "0.5,0.5,0.5/0.25,0.25,0.25", *TINY_SEARCH)
    assert code == 0, err
    card = json.loads((tmp_path / "run" / "round1.json").read_text())
    assert card["normalization"] == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["settings"]["normalize"] == "0.5,0.5,0.5/0.25,0.25,0.25"
    # the same run with the data's own (CIFAR-10) statistics is another job: resuming into it is refused
    code, _, err = run(capsys, "prune", "--arch", "tiny", "--data", imagefolder, "--out", tmp_path / "run",
                       "--baseline-epochs", "1", *TINY_SEARCH)
    assert code == 2 and "--normalize" in err, err


def test_prune_a_saved_whole_model_with_trust(imagefolder, saved_tiny, tmp_path, capsys):
    code, out, err = run(capsys, "prune", "--model", saved_tiny, "--trust-pickle", "--input-shape", "3,16,16",
                         "--data", imagefolder, "--out", tmp_path / "run", "--no-kd", *TINY_SEARCH)
    assert code == 0, err
    assert (tmp_path / "run" / "round1.pt2").is_file()
    assert (tmp_path / "run" / "report.json").is_file()


def test_train_then_evaluate(imagefolder, tmp_path, capsys):
    weights = tmp_path / "tiny.pt"
    code, out, err = run(capsys, "train", "--arch", "tiny", "--data", imagefolder, "--epochs", "1",
                         "--batch-size", "32", "--out", weights)
    assert code == 0, err
    assert "val top-1" in out
    load_weights(tiny_cnn(num_classes=4), weights)  # a strict, tensors-only state_dict
    top1 = out.split("val top-1 ")[1].split()[0]
    code, out, err = run(capsys, "evaluate", "--arch", "tiny", "--weights", weights, "--data", imagefolder)
    assert code == 0, err
    assert out.startswith(f"top-1 {top1} on 60 val images")


def test_evaluate_a_pt2_round_needs_no_trust(demo, capsys):
    """A round's .pt2 (torch.export) loads without --trust-pickle and scores what its pickled .pt scores."""
    _, out_dir = demo
    code, out, err = run(capsys, "evaluate", "--model", out_dir / "round1.pt2", "--data", "demo:quick")
    assert code == 0, err
    code, pickled, err = run(capsys, "evaluate", "--model", out_dir / "round1.pt", "--trust-pickle", "--data",
                             "demo:quick")
    assert code == 0, err
    assert out.startswith("top-1 ") and out.split()[1] == pickled.split()[1]


@pytest.fixture(scope="module")
def scripted(demo, tmp_path_factory):
    """The demo's round 1 as TorchScript (``export --formats torchscript``; rounds no longer write it)."""
    _, out_dir = demo
    stem = tmp_path_factory.mktemp("scripted") / "round1"
    assert main(["export", "--model", str(out_dir / "round1.pt"), "--trust-pickle", "--out", str(stem),
                 "--formats", "torchscript"]) == 0
    return Path(f"{stem}.torchscript.pt")


def test_inspect_arch_lists_groups_and_units(capsys):
    code, out, err = run(capsys, "inspect", "--arch", "tiny")
    assert code == 0, err
    for group in ("features.0", "features.3", "features.7", "features.10"):
        assert group in out
    assert "4 channel groups" in out and "connection units" in out and "base MACs" in out
    code, out, err = run(capsys, "inspect", "--arch", "tiny", "--input-shape", "3,16,16", "--json")
    assert code == 0, err
    info = json.loads(out)["space"]
    assert [g["name"] for g in info["groups"]] == ["features.0", "features.3", "features.7", "features.10"]
    assert [g["size"] for g in info["groups"]] == [16, 16, 32, 32]
    assert info["input_shape"] == [1, 3, 16, 16] and info["base_macs"] > 0 and info["base_params"] > 0
    assert {u["kind"] for u in info["units"]} == {"sequential"}


def test_inspect_a_pruned_round(demo, scripted, capsys):
    _, out_dir = demo
    card = json.loads((out_dir / "round2.json").read_text())
    code, out, err = run(capsys, "inspect", "--model", out_dir / "round2.pt", "--trust-pickle", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["input_shape"] == card["input_shape"] == [1, 3, 16, 16]  # taken from the card beside the model
    assert {layer["name"]: layer["width"] for layer in info["layers"]} == card["layer_widths"]
    assert info["macs"] == pytest.approx(card["macs"]) and info["params"] == card["params"]
    assert info["bytes"] == card["bytes"] and all(layer["bytes"] > 0 for layer in info["layers"])
    code, out, err = run(capsys, "inspect", "--model", scripted)
    assert code == 0, err
    assert "features.0" in out and "torchscript" in out
    code, out, err = run(capsys, "inspect", "--model", out_dir / "round2.pt2")
    assert code == 1 and len(error_lines(err)) == 1 and "--trust-pickle" in err and "Traceback" not in err


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_a_saved_model(saved_tiny, tmp_path, capsys):
    stem = tmp_path / "exported" / "tiny"
    code, out, err = run(capsys, "export", "--model", saved_tiny, "--trust-pickle", "--input-shape", "3,16,16",
                         "--out", stem)  # default formats: pt, pt2, onnx
    assert code == 0, err
    program = Path(f"{stem}.pt2")
    assert program.is_file() and Path(f"{stem}.pt").is_file() and not Path(f"{stem}.torchscript.pt").exists()
    card = json.loads(Path(f"{stem}.json").read_text())
    assert card["input_shape"] == [1, 3, 16, 16] and card["model"] == "TinyCNN" and "pt2" in card["files"]
    if importlib.util.find_spec("onnx") is not None:
        assert Path(f"{stem}.onnx").is_file() and card["onnx"].startswith("written")
    x = torch.randn(3, 3, 16, 16)  # another batch size than the export's example
    reference = torch.load(saved_tiny, weights_only=False)
    with torch.no_grad():
        assert torch.allclose(torch.export.load(str(program)).module()(x), reference(x), atol=1e-5)
    assert str(program) in out


def test_export_refuses_torchscript_input(scripted, tmp_path, capsys):
    code, out, err = run(capsys, "export", "--model", scripted, "--out", tmp_path / "x",
                         "--formats", "torchscript")
    assert code == 1
    assert len(error_lines(err)) == 1 and "TorchScript" in err
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("argv", [
    ["prune", "--arch", "foo", "--data", "{data}"],
    ["prune", "--arch", "tiny", "--data", "{data}", "--p-c", "1.5"],
    ["prune", "--arch", "tiny", "--data", "{data}", "--population", "1"],
    ["inspect", "--arch", "tiny", "--input-shape", "x"],
    ["export", "--model", "{model}", "--out", "{tmp}/x", "--input-shape", "3,32"],
    ["export", "--model", "{model}", "--out", "{tmp}/x", "--formats", "pt,tflite"],
    ["train", "--arch", "tiny", "--data", "{data}", "--epochs", "0", "--out", "{tmp}/w.pt"],
    ["evaluate", "--arch", "tiny", "--data", "{data}"],
    ["evaluate", "--model", "{model}", "--weights", "{model}", "--data", "{data}"],
    ["prune", "--arch", "tiny"],
    ["prune", "--data", "{data}"],
    ["demo", "--threads", "0"],
    ["frobnicate"],
    [],
], ids=lambda argv: " ".join(argv)[:60] or "no-arguments")
def test_usage_errors_exit_2_with_one_error_line(argv, imagefolder, saved_tiny, tmp_path, capsys):
    argv = [a.format(data=imagefolder, model=saved_tiny, tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert len(error_lines(err)) == 1, err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [
    ["prune", "--arch", "tiny", "--out", "{tmp}/run"],
    ["train", "--arch", "tiny", "--epochs", "1", "--out", "{tmp}/w.pt"],
    ["evaluate", "--model", "{model}", "--trust-pickle"],
])
def test_missing_data_exits_1_with_the_accepted_forms(command, saved_tiny, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, model=saved_tiny) for a in command] + ["--data", tmp_path / "no-such-data"]
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert len(error_lines(err)) == 1 and error_lines(err)[0].startswith(f"error: {tmp_path / 'no-such-data'}")
    assert "must be one of" in err and "ImageFolder" in err and ".tar.gz" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [
    ["evaluate", "--model", "{model}", "--data", "{data}"],
    ["prune", "--model", "{model}", "--data", "{data}", "--out", "{tmp}/run"],
    ["export", "--model", "{model}", "--out", "{tmp}/x"],
    ["inspect", "--model", "{model}"],
])
def test_pickled_model_without_trust_is_a_usage_error(command, imagefolder, saved_tiny, tmp_path, capsys):
    """A missing --trust-pickle is a usage error: exit 2, as the README says of usage errors."""
    argv = [a.format(data=imagefolder, model=saved_tiny, tmp=tmp_path) for a in command]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert len(error_lines(err)) == 1 and "--trust-pickle" in err and "pickle" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.json").exists()


def test_pruning_torchscript_or_pt2_is_refused(demo, scripted, imagefolder, tmp_path, capsys):
    code, out, err = run(capsys, "prune", "--model", scripted, "--data", imagefolder, "--out", tmp_path / "run")
    assert code == 1 and "TorchScript" in error_lines(err)[0]
    _, out_dir = demo
    code, out, err = run(capsys, "prune", "--model", out_dir / "round1.pt2", "--data", imagefolder,
                         "--out", tmp_path / "run")
    assert code == 1 and "torch.export" in error_lines(err)[0] and "--trust-pickle" in err
    assert not (tmp_path / "run").exists()


def test_input_shape_must_match_the_data(imagefolder, saved_tiny, tmp_path, capsys):
    code, out, err = run(capsys, "prune", "--model", saved_tiny, "--trust-pickle", "--input-shape", "3,32,32",
                         "--data", imagefolder, "--out", tmp_path / "run")
    assert code == 2 and "does not match" in error_lines(err)[0]


def test_weights_of_another_architecture_exit_1(imagefolder, tmp_path, capsys):
    weights = tmp_path / "wide.pt"
    torch.save(tiny_cnn(num_classes=4, width=8).state_dict(), weights)
    code, out, err = run(capsys, "evaluate", "--arch", "tiny", "--weights", weights, "--data", imagefolder)
    assert code == 1 and "does not fit" in error_lines(err)[0]


# ------------------------------------------------------------------------------------------------ help

def subparsers() -> dict[str, argparse.ArgumentParser]:
    return dict(cli_parser.build_parser().commands)


def test_the_top_level_help_lists_every_subcommand_and_an_unknown_one_is_refused(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and all(name in out for name in SUBCOMMANDS)
    code, out, err = run(capsys, "prun")
    assert code == 2 and "Traceback" not in err
    assert "invalid choice: 'prun'" in error_lines(err)[0] and all(name in err for name in SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_mentions_every_flag_with_help_and_defaults(command, capsys):
    code, out, err = run(capsys, command, "--help")
    assert code == 0 and err == ""
    parser = subparsers()[command]
    formatter = cli_parser.HelpFormatter(prog=parser.prog)
    flags = [a for a in parser._actions if a.option_strings]
    assert len(flags) > 2
    for action in flags:
        for option in action.option_strings:
            assert option in out, f"{command} --help does not mention {option}"
        assert action.help and action.help.strip(), f"{command} {action.option_strings[0]} has no help text"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert "%(default)" in formatter._get_help_string(action), \
                f"{command} {action.option_strings[0]} does not show its default"
            assert "default" in out


def test_top_level_help_and_version(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and all(command in out for command in SUBCOMMANDS)
    code, out, err = run(capsys, "--version")
    assert code == 0 and out.startswith("evoprune ")


@pytest.mark.slow
def test_python_dash_m_evoprune_help():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "evoprune", "--help"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: evoprune")
    assert all(command in proc.stdout for command in SUBCOMMANDS)


@pytest.mark.parametrize("trust", [[], ["--trust-pickle"]], ids=["untrusted", "trusted"])
def test_a_state_dict_given_as_model_points_to_weights(trust, tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    torch.save(tiny_cnn(num_classes=4).state_dict(), weights)
    code, out, err = run(capsys, "inspect", "--model", weights, *trust)
    assert code == 1
    assert "state_dict" in error_lines(err)[0] and "--weights" in error_lines(err)[0]


# ------------------------------------------------------------------------------------------------ weights files

@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, saved_tiny) -> Path:
    """A text file, a cut-off state_dict, a cut-off whole model and a cut-off TorchScript file."""
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("this is not a model\n" * 10)
    torch.save(tiny_cnn(num_classes=4).state_dict(), d / "full.pt")
    data = (d / "full.pt").read_bytes()
    (d / "cut.pt").write_bytes(data[: len(data) // 2])
    data = saved_tiny.read_bytes()
    (d / "cut-model.pt").write_bytes(data[: len(data) // 3])
    torch.jit.save(torch.jit.trace(tiny_cnn(num_classes=4).eval(), torch.zeros(1, 3, 16, 16)), d / "ts.pt")
    data = (d / "ts.pt").read_bytes()
    (d / "cut-ts.pt").write_bytes(data[: len(data) // 2])
    return d


def fails_with(capsys, argv, code=1) -> str:
    got, out, err = run(capsys, *argv)
    assert got == code, err
    assert len(error_lines(err)) == 1 and "Traceback" not in err, err
    return error_lines(err)[0]


@pytest.mark.parametrize("name, words", [("notes.txt", "not a PyTorch file"), ("cut.pt", "truncated or corrupt")])
@pytest.mark.parametrize("command", ["evaluate", "inspect", "prune"])
def test_a_bad_weights_file_says_what_it_is_without_pickle_advice(command, name, words, bad_files, tmp_path,
                                                                  capsys, monkeypatch):
    monkeypatch.setattr(sources, "load_data", lambda args: pytest.fail("the data were loaded before the weights"))
    argv = [command, "--arch", "tiny", "--weights", bad_files / name]
    argv += [] if command == "inspect" else ["--data", "demo:quick"]
    argv += ["--out", tmp_path / "run"] if command == "prune" else []
    line = fails_with(capsys, argv)
    assert line.startswith(f"error: {bad_files / name}: ") and words in line
    assert "--trust-pickle" not in line and "KeyError" not in line
    assert not (tmp_path / "run").exists()


def test_a_whole_model_given_as_weights_is_pointed_to_model_and_trust(saved_tiny, capsys):
    line = fails_with(capsys, ["evaluate", "--arch", "tiny", "--weights", saved_tiny, "--data", "demo:quick"])
    assert f"--model {saved_tiny} --trust-pickle" in line
    # the advice works as given
    code, out, err = run(capsys, "evaluate", "--model", saved_tiny, "--trust-pickle", "--data", "demo:quick")
    assert code == 0 and out.startswith("top-1 "), err


def test_torchscript_given_as_weights_is_pointed_to_model(bad_files, capsys):
    line = fails_with(capsys, ["inspect", "--arch", "tiny", "--weights", bad_files / "ts.pt"])
    assert f"--model {bad_files / 'ts.pt'}" in line and "TorchScript" in line and "--trust-pickle" not in line


@pytest.mark.parametrize("name, words", [("notes.txt", "not a PyTorch file"), ("cut-model.pt", "truncated or corrupt"),
                                         ("cut-ts.pt", "truncated or corrupt")])
@pytest.mark.parametrize("trust", [[], ["--trust-pickle"]], ids=["untrusted", "trusted"])
def test_a_bad_model_file_says_what_it_is(name, words, trust, bad_files, capsys):
    line = fails_with(capsys, ["inspect", "--model", bad_files / name, *trust])
    assert words in line and "--trust-pickle" not in line and "pickled Python object" not in line


def test_a_state_dict_given_to_export_gets_advice_export_can_use(bad_files, tmp_path, capsys):
    line = fails_with(capsys, ["export", "--model", bad_files / "full.pt", "--out", tmp_path / "x"])
    assert "state_dict" in line and "--weights" not in line and "torch.save(model)" in line
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ inspect --weights

def test_inspect_arch_with_weights_shows_the_loaded_layers(tmp_path, capsys):
    weights = tmp_path / "tiny4.pt"
    torch.save(tiny_cnn(num_classes=4).state_dict(), weights)
    code, out, err = run(capsys, "inspect", "--arch", "tiny", "--weights", weights, "--input-shape", "3,16,16",
                         "--json")
    assert code == 0, err
    info = json.loads(out)
    state = torch.load(weights, weights_only=True)
    widths = {layer["name"]: layer["width"] for layer in info["layers"]}
    assert widths == {name: state[f"{name}.weight"].shape[0] for name in widths}  # the file's widths
    assert widths["classifier"] == 4  # the number of classes comes from the weights
    assert str(weights) in info["source"] and info["format"] == "python"
    assert [g["name"] for g in info["space"]["groups"]] == ["features.0", "features.3", "features.7", "features.10"]


def test_inspect_weights_load_strictly(tmp_path, capsys):
    weights = tmp_path / "narrow.pt"
    torch.save(tiny_cnn(num_classes=4, width=8).state_dict(), weights)
    line = fails_with(capsys, ["inspect", "--arch", "tiny", "--weights", weights])
    assert "does not fit" in line and "--arch" in line
    line = fails_with(capsys, ["inspect", "--arch", "tiny", "--weights", weights, "--num-classes", "10"])
    assert "--num-classes" in line


def test_the_state_dict_advice_of_inspect_model_works(tmp_path, capsys):
    """``inspect --model <state_dict>`` says to pass it as --weights with its --arch; doing so works."""
    weights = tmp_path / "weights.pt"
    torch.save(tiny_cnn(num_classes=4).state_dict(), weights)
    line = fails_with(capsys, ["inspect", "--model", weights])
    assert f"--weights {weights}" in line and "--arch" in line
    code, out, err = run(capsys, "inspect", "--arch", "tiny", "--weights", weights)
    assert code == 0 and "classifier" in out and "channel groups" in out, err


@pytest.mark.parametrize("argv, message", [
    (["inspect", "--model", "{w}", "--weights", "{w}"], "--weights goes with --arch"),
    (["inspect", "--model", "{w}", "--num-classes", "4"], "--num-classes goes with --arch"),
])
def test_inspect_flag_combinations(argv, message, tmp_path, capsys):
    line = fails_with(capsys, [a.format(w=tmp_path / "w.pt") for a in argv], code=2)
    assert message in line


# ------------------------------------------------------------------------------------------------ flags in messages

@pytest.mark.parametrize("flag, value, name", [
    ("--p-c", "1.5", "p_c"), ("--p-mut", "-0.5", "p_mut"), ("--population", "1", "population"),
    ("--elites", "0", "elites"), ("--rounds", "0", "rounds"), ("--generations", "0", "generations"),
    ("--target-macs", "1.5", "target"), ("--score-samples", "3", "score_samples"),
    ("--recal-batches", "-1", "recal_batches"), ("--finetune-epochs", "-2", "finetune_epochs"),
    ("--normalize", "1,2/3", "normalize"), ("--normalize", "0.5/0", "normalize"),
    ("--calib-images", "0", "calib_images"), ("--offspring", "0", "offspring"), ("--screen", "1.5", "screen"),
    ("--survivors", "0", "survivors"), ("--final-pool", "0", "final_pool"),
])
def test_setting_errors_name_the_flag_not_the_python_name(flag, value, name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sources, "load_data", lambda args: pytest.fail("the data were loaded"))
    line = fails_with(capsys, ["prune", "--arch", "tiny", "--data", "demo:quick", "--out", tmp_path / "run",
                               flag, value], code=2)
    assert line.startswith(f"error: {flag} ") and value.lstrip("-") in line
    assert not re.search(rf"(?<![-\w]){name}\b", line), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, flag", [
    (["--recal-batches", "0"], "--reconstruct"),
    (["--recal-batches", "0", "--reconstruct", "none", "--fitness-reconstruct", "lsq"], "--fitness-reconstruct"),
])
def test_reconstruction_without_calibration_images_is_refused_naming_the_flags(extra, flag, tmp_path, capsys,
                                                                              monkeypatch):
    monkeypatch.setattr(sources, "load_data", lambda args: pytest.fail("the data were loaded"))
    line = fails_with(capsys, ["prune", "--arch", "tiny", "--data", "demo:quick", "--out", tmp_path / "run", *extra],
                      code=2)
    assert line.startswith(f"error: {flag} ") and "--recal-batches is 0" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, flag", [
    (["train", "--arch", "tiny", "--data", "demo:quick", "--out", "{tmp}/w.pt", "--epochs", "0"], "--epochs"),
    (["train", "--arch", "tiny", "--data", "demo:quick", "--out", "{tmp}/w.pt", "--batch-size", "0"],
     "--batch-size"),
    (["train", "--arch", "tiny", "--data", "demo:quick", "--out", "{tmp}/w.pt", "--lr", "0"], "--lr"),
    (["evaluate", "--model", "{tmp}/m.pt", "--data", "demo:quick", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "--model", "{tmp}/m.pt", "--data", "demo:quick", "--device", "gpu0"], "--device"),
    (["evaluate", "--model", "{tmp}/m.pt", "--data", "demo:quick", "--normalize", "cifar"], "--normalize"),
])
def test_other_commands_name_their_flags(argv, flag, tmp_path, capsys):
    line = fails_with(capsys, [a.format(tmp=tmp_path) for a in argv], code=2)
    assert line.startswith(f"error: {flag} ")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_engine_flags_are_checked_before_the_data_load(tmp_path, capsys, monkeypatch):
    import importlib.util
    import time
    monkeypatch.setattr(sources, "load_data", lambda args: pytest.fail("the data were loaded"))
    base = ["prune", "--arch", "tiny", "--data", "demo:quick", "--out", tmp_path / "run"]
    line = fails_with(capsys, base + ["--scheduler", "tcp://10.0.0.5:8786"], code=2)
    assert line.startswith("error: --scheduler ") and "dask" in line
    line = fails_with(capsys, base + ["--executor", "processes", "--workers", "0"], code=2)
    assert line.startswith("error: --workers ")
    real = importlib.util.find_spec
    with monkeypatch.context() as m:
        m.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "distributed" else real(name, *a))
        line = fails_with(capsys, base + ["--executor", "dask"], code=2)
    assert line.startswith("error: --executor ") and "evoprune[dask]" in line
    if importlib.util.find_spec("distributed") is not None:  # the dask extra is in [dev]: CI has it
        t0 = time.perf_counter()
        line = fails_with(capsys, base + ["--executor", "dask", "--scheduler", "tcp://127.0.0.1:9"], code=1)
        assert "tcp://127.0.0.1:9" in line and time.perf_counter() - t0 < 30
    assert not (tmp_path / "run").exists()


def test_a_library_config_error_keeps_its_python_name():
    """Outside the command line the message names the Python setting (and says which it is)."""
    from evoprune.errors import ConfigError
    from evoprune.evolve import SearchConfig
    with pytest.raises(ConfigError) as info:
        SearchConfig(p_c=2.0).check()
    assert info.value.setting == "p_c" and str(info.value).startswith("p_c must be a probability")
    assert cli.setting_flag("target") == "--target-macs" and cli.setting_flag("connections") == "--no-connections"


# ------------------------------------------------------------------------------------------ flags from the settings

def test_every_setting_has_a_flag_or_is_api_only():
    """A SearchConfig/JobOptions field gets a flag (options.SEARCH_FLAGS or its field metadata) or is API-only."""
    names = {f.name for f in dataclasses.fields(options.JobOptions)}
    flagged = set(options.job_flags())
    assert names - flagged == options.API_ONLY, "a setting has neither a flag nor a place in options.API_ONLY"
    assert not options.API_ONLY & flagged
    assert set(options.SEARCH_FLAGS) - {f.name for f in dataclasses.fields(SearchConfig)} == {"target_latency_ms",
                                                                                            "target_params"}


def test_the_parser_and_the_flag_names_come_from_the_same_declarations():
    prune = subparsers()["prune"]
    actions = {option: action for action in prune._actions for option in action.option_strings}
    assert set(options.FLAGS.values()) <= set(actions), "FLAGS names a flag 'evoprune prune' does not have"
    defaults = options.JobOptions()
    for name, (spec, default) in options.job_flags().items():
        action = actions[options.FLAGS[name]]
        assert action.help.startswith(spec.help)
        if spec.negated:
            assert isinstance(action, argparse._StoreTrueAction) and getattr(defaults, name) is True
        elif name not in options.TARGET_FLAGS:  # the target flags default to "not given" (one target at most)
            assert action.default == getattr(defaults, name) == default, name
            assert tuple(action.choices or ()) == tuple(spec.choices or ())
        else:
            assert action.default is None
    assert defaults.target == options.DEFAULT_TARGET and defaults.target_kind == "macs"
    assert options.NEGATED == {"connections", "dedupe", "kd", "resume", "snap"}


def test_options_from_args_defaults_latency_target_and_switches():
    prune = subparsers()["prune"]
    base = ["--arch", "tiny", "--data", "demo:quick"]
    assert options.options_from_args(prune.parse_args(base)) == options.JobOptions()
    opts = options.options_from_args(prune.parse_args(base + ["--target-latency-ms", "2.5", "--no-kd", "--no-snap",
                                                              "--p-c", "0.3", "--runtime", "torch"]))
    assert (opts.target, opts.target_kind, opts.kd, opts.snap, opts.p_c) == (2.5, "latency", False, False, 0.3)
    opts = options.options_from_args(prune.parse_args(base + ["--target-macs", "0.4", "--no-resume"]))
    assert (opts.target, opts.target_kind, opts.resume, opts.connections) == (0.4, "macs", False, True)
