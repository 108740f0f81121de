"""The ``evoprune`` command line (also ``python -m evoprune``).

Subcommands::

    evoprune demo      the built-in job on generated data: no download, about 10 s on a laptop CPU
    evoprune prune     prune a built-in architecture (--arch) or any saved whole model (--model) on image data
    evoprune train     train a built-in architecture and save its state_dict
    evoprune evaluate  top-1 of a model on the val split of a data set (or its report half)
    evoprune export    write a saved model as TorchScript / ONNX / .pt plus a JSON model card
    evoprune inspect   what can be pruned in a model, or the layer widths and costs of a (pruned) model

Exit codes: 0 success; 2 usage or configuration error (bad flags, out-of-range settings, a bad --input-shape);
1 runtime failure (data, model, checkpoint or plan problems). evoprune's own errors print one ``error: ...`` line
(plus, for data paths, the forms of data that are accepted) on stderr, never a traceback. Messages name settings
by their flags (``--p-c``), also for errors raised deep inside the library (:attr:`ConfigError.setting`).

``--data demo`` (also ``demo:quick``, ``demo:SEED``, ``demo:quick:SEED``) means the demo's generated data, so the
demo's outputs can be evaluated: see :func:`demo_data_spec`.

The prune job behind ``prune`` is also the one the examples (``examples/vgg16_cifar.py``...) run; see
:func:`prune_job`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

ARCHS = ("vgg16_bn", "vgg11_bn", "resnet18", "resnet18_tv", "tiny")
DEFAULT_INPUT_SHAPE = (3, 32, 32)
PROG = "evoprune"
SPLITS = ("val", "val-report", "val-search")
FINISHED = "evoprune: {out} already holds a finished run (report.md); nothing to do (--no-resume starts over)"


# ----------------------------------------------------------------------------------------------------------------
# Argument parsing helpers
# ----------------------------------------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every flag's help; descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or isinstance(action, argparse._HelpAction):
            return text  # no "(default: None)" / "(default: False)" noise for optional values and switches
        return super()._get_help_string(action)


def _wrap(text: str) -> str:
    """Descriptions are kept raw (for the epilogs' examples), so wrap them here."""
    return textwrap.fill(text, width=79)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error: ...`` line (exit code 2)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


def input_shape(text: str) -> tuple[int, int, int]:
    """``"3,32,32"`` (or ``3x32x32``) -> ``(3, 32, 32)``: channels, height, width of one input image."""
    parts = [p.strip() for p in text.replace("x", ",").replace("X", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid input shape {text!r}: give channels,height,width as three positive integers, e.g. 3,32,32")
    return dims


def formats_list(text: str) -> tuple[str, ...]:
    from .export import FORMATS
    formats = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"invalid format(s) {', '.join(unknown) or repr(text)}: choose a "
                                         f"comma-separated list from {','.join(FORMATS)}")
    return formats


def add_data_arguments(parser: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """``--data`` and ``--download``. Without a default, ``--data`` falls back to ``$EVOPRUNE_DATA``."""
    default = default if default is not None else os.environ.get("EVOPRUNE_DATA")
    parser.add_argument("--data", metavar="PATH", default=default,
                        help="image data: a torchvision CIFAR-10 folder, an ImageFolder tree (train/<class>/*, "
                             "val/<class>/*) or a .tar/.tar.gz/.tgz of one; or 'demo' for the generated data of "
                             "'evoprune demo' ('demo:quick' for 'demo --quick', 'demo:SEED' / 'demo:quick:SEED' for "
                             "its --seed) "
                             f"({'default: %(default)s' if default else 'required unless $EVOPRUNE_DATA is set'})")
    parser.add_argument("--download", action="store_true",
                        help="download CIFAR-10 with torchvision into --data if it holds no data (needs network)")


TRUST_HELP = ("allow --model to be a pickled Python object (torch.save(model)); unpickling runs code from the file, "
              "so only pass it for files you trust")


def add_model_source(parser: argparse.ArgumentParser, *, arch_help: str, model_help: str,
                     torchscript_ok: bool = True) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--arch", choices=ARCHS, help=arch_help)
    source.add_argument("--model", metavar="FILE.pt", help=model_help)
    parser.add_argument("--trust-pickle", action="store_true",
                        help=TRUST_HELP + (". TorchScript files need no trust" if torchscript_ok else ""))


def add_prune_arguments(parser: argparse.ArgumentParser, *, default_weights: str | None = None,
                        default_data: str | None = None) -> None:
    """The flags of ``evoprune prune`` for a built-in architecture (also used by the examples): data, teacher
    weights or baseline training, and the search flags of :func:`evoprune.job.add_search_arguments`."""
    from . import job
    add_data_arguments(parser, default=default_data)
    parser.add_argument("--weights", metavar="PT", default=default_weights,
                        help="teacher state_dict for the architecture (tensors only); without it a baseline is "
                             "trained first and cached in --out")
    parser.add_argument("--baseline-epochs", type=int, default=4, metavar="N",
                        help="epochs of baseline training when no --weights are given (default: %(default)s)")
    job.add_search_arguments(parser)


# ----------------------------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------------------------

def _command(sub, name: str, summary: str, description: str, epilog: str | None = None) -> Parser:
    return sub.add_parser(name, formatter_class=HelpFormatter, help=summary, description=_wrap(description),
                          epilog=epilog)


def build_parser() -> Parser:
    from ._version import __version__

    parser = Parser(prog=PROG, formatter_class=HelpFormatter,
                    description=_wrap("Evolve which neurons and connections of a trained CNN to keep (DEAP genetic "
                                      "algorithm), then remove the rest for real (torch-pruning)."),
                    epilog="exit codes: 0 success, 2 usage/configuration error, 1 runtime failure\n"
                           "run 'evoprune COMMAND --help' for the flags of a command")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)

    # demo ---------------------------------------------------------------------------------------------------
    p = _command(sub, "demo", "the built-in job on generated data (no download)",
                 "Train a tiny CNN on generated images, then run a small 2-round search and write the compact "
                 "models and the full report. Needs no data and no download.",
                 "writes into --out: round{k}.pt, round{k}.torchscript.pt, round{k}.json, report.md, report.json,\n"
                 "logbook.csv and, with matplotlib (pip install 'evoprune[plot]'), pareto.png\n\n"
                 "top-1 figures are on the val-report half of the generated val images; to check one:\n"
                 "  evoprune evaluate --model runs/demo/round2.torchscript.pt --data demo --split val-report\n"
                 "(after 'demo --quick' use --data demo:quick; after 'demo --seed 3' use --data demo:3 --seed 3)")
    p.add_argument("--out", metavar="DIR", default="runs/demo", help="output directory")
    p.add_argument("--quick", action="store_true",
                   help="even smaller data and search, for a smoke test (a few seconds)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the data, training and search")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads; the demo's tiny network runs fastest on one")
    p.set_defaults(handler=cmd_demo)

    # prune --------------------------------------------------------------------------------------------------
    p = _command(sub, "prune", "prune a built-in architecture or a saved model on image data",
                 "Prune a model with the genetic algorithm over several rounds, fine-tuning between rounds, and "
                 "write the compact models and the report into --out.",
                 "examples:\n"
                 "  evoprune prune --arch vgg16_bn --data cifar10.tar.gz --weights vgg16.pt --out runs/vgg16\n"
                 "  evoprune prune --model mynet.pt --trust-pickle --input-shape 3,32,32 --data cifar10/ "
                 "--out runs/mynet\n\n"
                 "A search killed half-way resumes from the checkpoint in --out (see --no-resume); a resume with\n"
                 "other settings is refused before any work, and a finished run is not redone.\n"
                 "Fitness on SCOOP workers: python -m scoop -n 4 path/to/evoprune/__main__.py prune ...")
    add_model_source(p, arch_help="built-in architecture to prune (with --weights, or a baseline is trained)",
                     model_help="a whole saved model to prune (torch.save(model); needs --trust-pickle)",
                     torchscript_ok=False)
    p.add_argument("--input-shape", type=input_shape, metavar="C,H,W",
                   help="with --model: the input shape it expects; checked against the data's images "
                        "(default: the data's image shape)")
    add_prune_arguments(p)
    p.set_defaults(handler=cmd_prune)

    # train --------------------------------------------------------------------------------------------------
    p = _command(sub, "train", "train a built-in architecture",
                 "Train a built-in architecture from scratch on --data (SGD, OneCycle, augmentation), save its "
                 "state_dict atomically and print its val top-1.")
    p.add_argument("--arch", choices=ARCHS, required=True, help="architecture to train")
    add_data_arguments(p)
    p.add_argument("--epochs", type=int, default=30, metavar="N", help="training epochs")
    p.add_argument("--out", metavar="FILE.pt", required=True, help="where to save the state_dict")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the OneCycle schedule")
    p.add_argument("--batch-size", type=int, default=128, metavar="N", help="training batch size")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="random seed (initialisation, shuffling, augmentation)")
    p.set_defaults(handler=cmd_train)

    # evaluate -----------------------------------------------------------------------------------------------
    p = _command(sub, "evaluate", "top-1 accuracy on the val split",
                 "Print the top-1 accuracy of a model on the val split of --data, or on the half of it that "
                 "'evoprune prune' and 'evoprune demo' report top-1 on (--split val-report).",
                 "examples:\n"
                 "  evoprune evaluate --arch vgg16_bn --weights vgg16.pt --data cifar10/\n"
                 "  evoprune evaluate --model runs/vgg16/round2.torchscript.pt --data cifar10/ --split val-report\n"
                 "  evoprune evaluate --model runs/demo/round2.torchscript.pt --data demo --split val-report\n"
                 "    (the demo's data: --data demo:quick after 'demo --quick'; --data demo:3 --seed 3 after\n"
                 "    'demo --seed 3')")
    add_model_source(p, arch_help="built-in architecture (needs --weights)",
                     model_help="a saved model: TorchScript, or a pickled whole model with --trust-pickle")
    p.add_argument("--weights", metavar="PT", help="with --arch: the state_dict to evaluate (tensors only)")
    add_data_arguments(p)
    p.add_argument("--split", choices=SPLITS, default="val",
                   help="val: every val image; val-report: the half of val that prune and demo report top-1 on "
                        "(their report.json, report.md and summary); val-search: the half their GA scores plans on")
    p.add_argument("--seed", type=int, metavar="N",
                   help="with --split val-report/val-search: the --seed of the prune or demo run whose halves to "
                        "use (default 0)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="evaluation batch size")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.set_defaults(handler=cmd_evaluate)

    # export -------------------------------------------------------------------------------------------------
    p = _command(sub, "export", "write a saved model as TorchScript/ONNX + card",
                 "Convert a saved Python model into deployment formats, check each against the original and write "
                 "a JSON model card (STEM.json).",
                 "writes STEM.pt, STEM.torchscript.pt, STEM.onnx (with the onnx extra installed) and STEM.json")
    p.add_argument("--model", metavar="FILE.pt", required=True,
                   help="the model to export: a whole saved model (torch.save(model); needs --trust-pickle)")
    p.add_argument("--input-shape", type=input_shape, metavar="C,H,W",
                   help="input shape for tracing and checking (default: the input shape in the model's card "
                        "FILE.json if there is one, else 3,32,32)")
    p.add_argument("--out", metavar="STEM", required=True, help="output path without extension")
    p.add_argument("--formats", type=formats_list, default="pt,torchscript,onnx", metavar="LIST",
                   help="comma-separated formats among pt, torchscript, onnx")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)
    p.set_defaults(handler=cmd_export)

    # inspect ------------------------------------------------------------------------------------------------
    p = _command(sub, "inspect", "show what can be pruned, or layer widths",
                 "For --arch: the pruning space (channel groups and their sizes, connection units, base MACs and "
                 "params). For --arch with --weights (a state_dict) and for --model: per-layer widths, MACs, "
                 "params and bytes, plus the pruning space when it is a Python model.",
                 "examples:\n"
                 "  evoprune inspect --arch vgg16_bn\n"
                 "  evoprune inspect --arch vgg16_bn --weights vgg16.pt\n"
                 "  evoprune inspect --model runs/demo/round2.torchscript.pt")
    add_model_source(p, arch_help="built-in architecture", model_help="a saved model (e.g. a pruned round{k}.pt)")
    p.add_argument("--weights", metavar="PT",
                   help="with --arch: a state_dict to load into it (tensors only, strictly); shows its layers")
    p.add_argument("--input-shape", type=input_shape, metavar="C,H,W",
                   help="input shape (default: the model card's for --model if there is one, else 3,32,32)")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="with --arch: number of classes (default: the classifier width in --weights, else 10)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    p.set_defaults(handler=cmd_inspect)
    return parser


def _check_combinations(parser: Parser, args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot express; usage errors (exit code 2)."""
    from .errors import ConfigError
    sub = parser._subparsers._group_actions[0].choices[args.command]  # the subcommand's parser, for its prog
    if hasattr(args, "data") and not args.data:
        sub.error("--data is required (or set $EVOPRUNE_DATA)")
    if getattr(args, "data", None):
        try:
            demo = demo_data_spec(args.data)
        except ConfigError as exc:
            sub.error(str(exc))
        if demo is not None and args.download:
            sub.error("--download goes with a CIFAR-10 path; --data demo is generated, not downloaded")
    arch, model = getattr(args, "arch", None), getattr(args, "model", None)
    if args.command in ("prune", "evaluate", "inspect"):
        if model and getattr(args, "weights", None):
            sub.error("--weights goes with --arch; a --model file already holds its weights")
        if arch and args.trust_pickle:
            sub.error("--trust-pickle goes with --model")
    if args.command == "prune" and arch and args.input_shape:
        sub.error("--input-shape goes with --model; with --arch the data's image shape is used")
    if args.command == "evaluate" and arch and not args.weights:
        sub.error("--arch needs --weights (a state_dict to evaluate)")
    if args.command == "evaluate" and args.split == "val" and args.seed is not None:
        sub.error("--seed goes with --split val-report or val-search (it picks the halves of val)")
    if args.command == "inspect" and model and args.num_classes is not None:
        sub.error("--num-classes goes with --arch")


# ----------------------------------------------------------------------------------------------------------------
# Entry point and error handling
# ----------------------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``evoprune`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_combinations(parser, args)
    except SystemExit as exc:  # --help, --version and usage errors
        return _exit_status(exc.code)
    return guarded(lambda: args.handler(args))


def guarded(fn: Callable[[], int | None]) -> int:
    """Run ``fn`` and turn evoprune's errors into one ``error: ...`` line on stderr and an exit code:
    :class:`~evoprune.errors.ConfigError` -> 2, every other :class:`~evoprune.errors.EvoPruneError` -> 1. A
    ``ConfigError`` that names its ``setting`` is printed with the setting's flag (``p_c`` -> ``--p-c``)."""
    from .errors import ConfigError, EvoPruneError
    try:
        return fn() or EXIT_OK
    except ConfigError as exc:
        _print_error(exc.named(setting_flag(exc.setting)))
        return EXIT_USAGE
    except EvoPruneError as exc:
        _print_error(exc)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:
        return _exit_status(exc.code)


def setting_flag(setting: str | None) -> str | None:
    """The command-line flag of a library setting (``p_c`` -> ``--p-c``, ``target`` -> ``--target-macs``,
    ``connections`` -> ``--no-connections``), or None for a setting no flag sets."""
    from .job import FLAGS
    return FLAGS.get(setting) if setting else None


def _print_error(exc) -> None:
    sys.stdout.flush()
    print(f"error: {exc}", file=sys.stderr)


def _exit_status(code) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILURE


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces: data, models, the prune job
# ----------------------------------------------------------------------------------------------------------------

def demo_data_spec(text: str) -> tuple[bool, int] | None:
    """``(quick, seed)`` when ``--data`` names the demo's generated data, else None (a path).

    ``demo`` is the data of ``evoprune demo`` with its defaults, ``demo:quick`` those of ``demo --quick``, and
    ``demo:SEED`` / ``demo:quick:SEED`` those of ``--seed SEED``: the same train and val images, image for image.
    A file or folder that exists under that name wins (write ``./demo`` to be explicit). A malformed spec
    (``demo:fast``) raises :class:`~evoprune.errors.ConfigError`.
    """
    from .errors import ConfigError
    if not isinstance(text, str) or (text != "demo" and not text.startswith("demo:")) or Path(text).exists():
        return None
    quick, seed = False, None
    for part in text.split(":")[1:]:
        if part == "quick" and not quick and seed is None:
            quick = True
        elif seed is None and part.lstrip("-").isdigit():
            seed = int(part)
        else:
            raise ConfigError(f"--data {text!r}: the demo's data are 'demo', 'demo:quick', 'demo:SEED' or "
                              "'demo:quick:SEED' (SEED: the demo's --seed)")
    return quick, seed or 0


def demo_data_name(quick: bool, seed: int) -> str:
    """The ``--data`` value that reproduces the data of ``evoprune demo`` run with ``quick`` and ``seed``."""
    return "demo" + (":quick" if quick else "") + (f":{seed}" if seed else "")


def demo_data(quick: bool, seed: int):
    """The demo's generated data (4 classes, 16x16): the same images for the same ``quick`` and ``seed``."""
    from .data import synthetic
    (n_train, n_val), _, _ = demo_options(quick, seed)
    return synthetic(n_train, n_val, classes=4, size=16, seed=seed)


def load_data(args):
    from .data import load_cifar10
    demo = demo_data_spec(args.data)
    if demo is not None:
        data = demo_data(*demo)
        print(f"evoprune: --data {args.data}: the demo's generated data ({len(data.train)} train / {len(data.val)} "
              "val images, 16x16, 4 classes)", file=sys.stderr)
        return data
    return load_cifar10(args.data, download=args.download)


def data_source(args) -> str:
    """``--data`` as recorded for resuming: the demo spec in its canonical form, or the absolute path."""
    demo = demo_data_spec(args.data)
    if demo is not None:
        return demo_data_name(*demo)
    return str(Path(args.data).expanduser().resolve())


def _abspath(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def read_weights(path: str) -> dict:
    """The state_dict given as ``--weights`` (tensors only). Errors say what the file is and which flags fit it:
    a whole pickled model belongs in ``--model FILE --trust-pickle``, a TorchScript file in ``--model FILE``."""
    from .errors import CheckpointError
    from .storage import load_state_dict
    try:
        return load_state_dict(path)
    except CheckpointError as exc:
        if exc.reason == "pickle":
            raise CheckpointError(
                f"{path}: holds pickled Python objects, not only tensors (a whole model saved with torch.save(model)?"
                "), so it is not loaded as --weights (unpickling could run code from the file). --weights takes a "
                "state_dict: torch.save(model.state_dict(), path). If it is a whole model you trust, pass it as "
                f"--model {path} --trust-pickle instead of --arch and --weights.", reason="pickle") from None
        if exc.reason == "torchscript":
            raise CheckpointError(
                f"{path}: is a TorchScript module, not a state_dict; evaluate and inspect take it as --model {path} "
                "(instead of --arch and --weights).", reason="torchscript") from None
        raise


def _classes_in(state: dict, arch: str) -> int | None:
    """The number of classes a state_dict for ``arch`` was saved with: the width of the architecture's last
    Linear layer in ``state`` (None if it is not there)."""
    import torch

    from .models import build
    linear = [name for name, m in build(arch, num_classes=10).named_modules() if isinstance(m, torch.nn.Linear)]
    weight = state.get(f"{linear[-1]}.weight") if linear else None
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def load_model_file(path: str, *, trust: bool, purpose: str):
    """A whole model from ``path``: TorchScript, or a pickled ``nn.Module`` if ``trust``. ``purpose`` (prune,
    evaluate, export, inspect) says what it is for: errors then name the flags that fit that command."""
    import torch

    from .errors import CheckpointError, ModelError
    from .storage import load_module
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 flags torch.jit.load as deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            model = load_module(path, trust=trust)
    except CheckpointError as exc:
        if exc.reason == "state_dict" and purpose == "export":
            raise ModelError(f"{path}: holds a state_dict (weights only), not a whole model; export needs the whole "
                             "model: save it with torch.save(model) where it was made and pass that file with "
                             "--trust-pickle.") from None
        if exc.reason == "state_dict":
            raise ModelError(f"{path}: holds a state_dict (weights only), not a whole model: pass it as --weights "
                             f"{path} with the --arch it was saved from.") from None
        if exc.reason == "untrusted":
            raise CheckpointError(
                f"{path}: is a pickled Python object, and loading it would run code from the file. If you trust "
                "its source, pass --trust-pickle; otherwise export it as TorchScript where it was made.",
                reason="untrusted") from None
        raise
    if purpose == "prune" and isinstance(model, torch.jit.ScriptModule):
        raise ModelError(f"{path}: is a TorchScript module; pruning needs the Python model (its module classes) "
                         "to trace and rewrite it. Save it with torch.save(model) and pass --trust-pickle, or use "
                         "--arch with --weights.")
    if purpose == "export" and isinstance(model, torch.jit.ScriptModule):
        raise ModelError(f"{path}: is already TorchScript; export (and its model card's MACs count) needs the Python "
                         "model: pass the pickled .pt it was made from, with --trust-pickle.")
    return model.eval()


def _example_inputs(shape):
    import torch
    return torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))


def _card_input_shape(path: str) -> tuple[int, ...] | None:
    """The input shape recorded in the model card beside ``path`` (``stem.json``), if any."""
    p = Path(path)
    stem = p.name[: -len(".pt")] if p.name.endswith(".pt") else p.stem
    stem = stem[: -len(".torchscript")] if stem.endswith(".torchscript") else stem
    card = p.with_name(stem + ".json")
    try:
        shape = json.loads(card.read_text())["input_shape"]
        dims = tuple(int(d) for d in shape[1:])
        return dims if len(dims) == 3 and min(dims) >= 1 else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _check_outputs(model, data, where: str) -> None:
    """The model's output width must match the data's classes."""
    import torch

    from .data import normalize
    from .errors import DataError
    from .space import check_forward
    x = normalize(data.val.images[:2])
    out = check_forward(model.eval(), x, f" ({where} and the data's images do not fit)")
    classes = len(data.train.classes)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != classes:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"{where} outputs {got} for a batch of 2, but the data have {classes} classes: the model "
                        "must return one logit per class")


def _check_device(device: str) -> None:
    """``--device``: a torch device that is there (ConfigError naming the flag otherwise)."""
    import torch

    from .errors import ConfigError
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for, but torch sees no CUDA device here; use --device cpu")


def _check_positive(**flags) -> None:
    """``--flag-name`` values that must be > 0 (ConfigError naming the flag)."""
    from .errors import ConfigError
    for name, value in flags.items():
        if not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def baseline(model, data, out_dir, epochs: int, opts, *, progress: bool = True):
    """Train ``model`` for ``epochs`` (or load the copy cached in ``out_dir`` by an earlier run) and return it."""
    from .models import load_weights
    from .storage import torch_save
    from .train import train
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


def prune_job(build_model: Callable, args: argparse.Namespace, *, title: str) -> int:
    """The job of ``evoprune prune --arch`` and of the examples: data, teacher (``--weights``) or a cached
    baseline, then :func:`evoprune.job.run` into ``--out``. Raises evoprune errors; wrap it in :func:`guarded`.

    Before loading anything it checks ``--out``: a run there made with other settings is refused, a finished one
    with the same settings is not redone (exit 0). A bad ``--weights`` file is refused before the data load."""
    from . import job
    from .errors import ConfigError
    from .models import fit_weights
    opts = job.options_from_args(args)
    if args.baseline_epochs < 1:
        raise ConfigError(f"--baseline-epochs must be >= 1, got {args.baseline_epochs}")
    source = {"arch" if getattr(args, "arch", None) else "model_builder":
              getattr(args, "arch", None) or getattr(build_model, "__name__", type(build_model).__name__),
              "weights": _abspath(args.weights), "baseline_epochs": None if args.weights else args.baseline_epochs,
              "data": data_source(args)}
    if job.finished(args.out, opts, source=source):
        print(FINISHED.format(out=args.out), file=sys.stderr)
        return EXIT_OK
    state = read_weights(args.weights) if args.weights else None
    data = load_data(args)
    classes = len(data.train.classes)
    model = build_model(num_classes=classes)
    if state is not None:
        fit_weights(model, state, args.weights, hint=f"Pass the --arch it was saved from (the number of classes, "
                                                      f"{classes}, comes from --data).")
    else:
        model = baseline(model, data, args.out, args.baseline_epochs, opts)
    result = job.run(model.eval(), data, args.out, opts, title=title, source=source)
    print(_summary_lines(result, Path(args.out)))
    return EXIT_OK


def _summary_lines(result, out: Path) -> str:
    """Baseline vs final accuracy (and on which images), MACs and params, and the files this run wrote."""
    from .job import describe_files

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


def _latency_line(result) -> str:
    """Measured latency before and after, on the runtime the run targeted."""
    base, last, s = result.baseline, result.rows[-1], result.settings
    where = f"{s.get('runtime')}, {s.get('threads')} thread(s)"
    text = (f"latency : {base['latency_ms']:.3f} -> {last['latency_ms']:.3f} ms at batch 1 "
            f"({base['latency_ms'] / last['latency_ms']:.2f}x faster)")
    if base["latency_batch"] != 1:
        text += (f", {base['latency_batch_ms']:.3f} -> {last['latency_batch_ms']:.3f} ms at batch "
                 f"{base['latency_batch']}")
    return f"{text}, measured on {where}; budget {last['budget']:.3f} ms at batch {base['latency_batch']}"


# ----------------------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------------------

def demo_options(quick: bool, seed: int = 0):
    """The data sizes, baseline epochs and :class:`~evoprune.job.JobOptions` of ``evoprune demo``."""
    from .job import JobOptions
    if quick:
        sizes, epochs = (800, 400), 3
        opts = JobOptions(rounds=2, population=6, elites=2, generations=1, target=0.3, finetune_epochs=0.5,
                          recal_batches=2, score_samples=200, seed=seed, resume=False)
    else:
        sizes, epochs = (2000, 1000), 4
        opts = JobOptions(rounds=2, population=10, elites=3, generations=3, target=0.25, finetune_epochs=1.0,
                          recal_batches=4, score_samples=500, seed=seed, resume=False)
    return sizes, epochs, opts


def cmd_demo(args) -> int:
    import torch
    from .errors import ConfigError
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _demo(args, t0)
    finally:
        torch.set_num_threads(threads)


def _demo(args, t0: float) -> int:
    import torch

    from . import job
    from .models import tiny_cnn
    from .train import evaluate, train
    (n_train, n_val), epochs, opts = demo_options(args.quick, args.seed)
    data = demo_data(args.quick, args.seed)
    print(f"evoprune demo: generated {n_train} train / {n_val} val images, 16x16, 4 classes; training a tiny CNN "
          f"for {epochs} epochs", file=sys.stderr)
    torch.manual_seed(args.seed)
    model = tiny_cnn(num_classes=4)
    train(model, data.train, epochs, batch_size=64, lr=0.05, seed=args.seed, progress=True)
    _, report_set = job.val_splits(data.val, opts.seed)  # the images every top-1 of the run is reported on
    print(f"evoprune demo: baseline top-1 {evaluate(model, report_set):.4f} (val-report half, {len(report_set)} "
          f"images); searching ({opts.rounds} rounds x {opts.generations} generations, population "
          f"{opts.population}, target {opts.target:.0%} of the MACs)", file=sys.stderr)
    out = Path(args.out)
    result = job.run(model.eval(), data, out, opts, title="evoprune demo: TinyCNN on generated images",
                     source={"data": demo_data_name(args.quick, args.seed)})
    print(f"evoprune demo: done in {time.perf_counter() - t0:.1f} s")
    print(_summary_lines(result, out))
    last = result.rows[-1]["round"]
    seed = f" --seed {args.seed}" if args.seed else ""
    print(f"check a round: evoprune evaluate --model {out / f'round{last}.torchscript.pt'} --data "
          f"{demo_data_name(args.quick, args.seed)} --split val-report{seed}")
    return EXIT_OK


def cmd_prune(args) -> int:
    from .models import MODELS
    if args.arch:
        return prune_job(MODELS[args.arch], args, title=f"evoprune: {args.arch}")
    from . import job
    from .errors import ConfigError
    opts = job.options_from_args(args)
    source = {"model": _abspath(args.model), "data": data_source(args)}
    if job.finished(args.out, opts, source=source):
        print(FINISHED.format(out=args.out), file=sys.stderr)
        return EXIT_OK
    model = load_model_file(args.model, trust=args.trust_pickle, purpose="prune")
    data = load_data(args)
    shape = tuple(data.train.images.shape[1:])
    if args.input_shape and tuple(args.input_shape) != shape:
        raise ConfigError(f"--input-shape {','.join(map(str, args.input_shape))} does not match the data's images "
                          f"({','.join(map(str, shape))}); resize the data or fix --input-shape")
    _check_outputs(model, data, args.model)
    result = job.run(model, data, args.out, opts, title=f"evoprune: {Path(args.model).name}", source=source)
    print(_summary_lines(result, Path(args.out)))
    return EXIT_OK


def cmd_train(args) -> int:
    import torch

    from .models import build
    from .storage import torch_save
    from .train import check_training_args, train
    from .errors import ConfigError
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_positive(lr=args.lr)
    _check_device(args.device)
    check_training_args(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=0.9,
                        weight_decay=5e-4, schedule="onecycle", label_smoothing=0.1, kd_alpha=0.5,
                        kd_temperature=4.0, max_batches=None)
    data = load_data(args)
    torch.manual_seed(args.seed)
    model = build(args.arch, num_classes=len(data.train.classes))
    history = train(model, data.train, args.epochs, val_set=data.val, lr=args.lr, batch_size=args.batch_size,
                    device=args.device, seed=args.seed)
    top1 = history["val_acc"][-1]
    torch_save(model.cpu().state_dict(), args.out)
    print(f"val top-1 {top1:.4f} ({len(data.val)} images); state_dict saved to {args.out}")
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from .errors import ConfigError
    from .job import val_splits
    from .models import build, fit_weights
    from .train import evaluate
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_device(args.device)
    if args.arch:
        state = read_weights(args.weights)  # a bad file is refused before the data are loaded
        data = load_data(args)
        classes = len(data.train.classes)
        model = fit_weights(build(args.arch, num_classes=classes), state, args.weights,
                            hint=f"Pass the --arch it was saved from (the number of classes, {classes}, comes "
                                 "from --data).")
        where = f"{args.arch} with {args.weights}"
    else:
        model = load_model_file(args.model, trust=args.trust_pickle, purpose="evaluate")
        data = load_data(args)
        where = args.model
    _check_outputs(model, data, where)
    images, seed = data.val, args.seed or 0
    if args.split != "val":
        search_half, report_half = val_splits(data.val, seed)
        images = report_half if args.split == "val-report" else search_half
    top1 = evaluate(model, images, batch_size=args.batch_size, device=args.device)
    if args.split == "val":
        print(f"top-1 {top1:.4f} on {len(images)} val images ({where})")
    else:
        use = "report top-1 on" if args.split == "val-report" else "score plans on"
        print(f"top-1 {top1:.4f} on {len(images)} {args.split} images, the half of the {len(data.val)} val images "
              f"that prune and demo {use} with --seed {seed} ({where})")
    return EXIT_OK


def cmd_export(args) -> int:
    from .errors import ModelError
    from .export import export
    model = load_model_file(args.model, trust=args.trust_pickle, purpose="export")
    shape = args.input_shape or _card_input_shape(args.model) or DEFAULT_INPUT_SHAPE
    formats = args.formats
    try:
        written = export(model, args.out, _example_inputs(shape), formats=formats,
                         extra={"source": str(args.model)})
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:  # tracing / saving failures
        raise ModelError(f"{args.model}: cannot be exported ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    for fmt, path in written.items():
        print(f"{fmt:12s} {path}")
    return EXIT_OK


def cmd_inspect(args) -> int:
    from .models import build, fit_weights
    if args.arch and args.weights:
        shape = args.input_shape or DEFAULT_INPUT_SHAPE
        state = read_weights(args.weights)
        classes = args.num_classes or _classes_in(state, args.arch) or 10
        hint = "Pass the --arch it was saved from" + (" and its --num-classes." if args.num_classes else ".")
        model = fit_weights(build(args.arch, num_classes=classes), state, args.weights, hint=hint).eval()
        info = {"source": f"--arch {args.arch} --weights {args.weights}", **model_info(model, shape)}
        info["space"] = _space_or_reason(model, shape)
    elif args.arch:
        shape = args.input_shape or DEFAULT_INPUT_SHAPE
        model = build(args.arch, num_classes=args.num_classes or 10).eval()
        info = {"source": f"--arch {args.arch}", "space": space_info(model, shape)}
    else:
        model = load_model_file(args.model, trust=args.trust_pickle, purpose="inspect")
        shape = args.input_shape or _card_input_shape(args.model) or DEFAULT_INPUT_SHAPE
        info = {"source": str(args.model), **model_info(model, shape)}
        info["space"] = _space_or_reason(model, shape)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------------------
# inspect: facts about a model and its pruning space
# ----------------------------------------------------------------------------------------------------------------

def space_info(model, shape) -> dict:
    """The pruning space of ``model`` for one input of ``shape``, as plain data."""
    from .space import PruningSpace
    space = PruningSpace.from_model(model, _example_inputs(shape), with_cost=False)
    return {
        "model": space.model_name, "input_shape": list(space.input_shape),
        "base_macs": float(space.base_macs), "base_params": int(space.base_params),
        "fingerprint": space.fingerprint,
        "genes": {"neurons": space.layout.n_neurons, "connections": space.layout.n_connections,
                  "total": len(space.layout)},
        "groups": [{"name": g.name, "size": g.size, "members": list(g.members),
                    "consumers": [c.module for c in g.consumers]} for g in space.groups],
        "units": [{"name": u.name, "kind": u.kind, "modules": list(u.modules)} for u in space.units],
    }


def _space_or_reason(model, shape):
    import torch

    from .errors import ModelError
    if isinstance(model, torch.jit.ScriptModule):
        return {"error": "TorchScript module: the pruning space needs the Python model"}
    try:
        return space_info(model, shape)
    except ModelError as exc:
        return {"error": str(exc)}


_LAYER_TYPES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear")


def model_info(model, shape) -> dict:
    """Per-layer widths, MACs, params and bytes of ``model`` (a Python or TorchScript module) for ``shape``."""
    import torch
    import torch_pruning as tp

    from .export import model_bytes
    from .space import check_forward
    x = _example_inputs(shape)
    out = check_forward(model, x, "; pass the right --input-shape")
    scripted = isinstance(model, torch.jit.ScriptModule)
    layer_macs, total_macs = {}, None
    if not scripted:
        total_macs, _, flops, _ = tp.utils.count_ops_and_params(model, x, layer_wise=True)
        layer_macs = {m: v for m, v in flops.items()}
    layers = []
    for name, m in model.named_modules():
        kind = getattr(m, "original_name", None) if scripted else type(m).__name__
        if kind not in _LAYER_TYPES:
            continue
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        width = weight.shape[1] if kind.startswith("ConvTranspose") else weight.shape[0]
        own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        macs = layer_macs.get(m)
        layers.append({"name": name, "type": kind, "width": int(width),
                       "macs": None if macs is None else float(macs),
                       "params": int(sum(p.numel() for p in m.parameters(recurse=False))),
                       "bytes": int(sum(t.numel() * t.element_size() for t in own))})
    return {
        "model": getattr(model, "original_name", None) if scripted else type(model).__name__,
        "format": "torchscript" if scripted else "python",
        "input_shape": list(x.shape), "output_shape": list(out.shape) if isinstance(out, torch.Tensor) else None,
        "macs": None if total_macs is None else float(total_macs),
        "params": int(sum(p.numel() for p in model.parameters())),
        "bytes": int(model_bytes(model)),
        "layers": layers,
    }


def _mmacs(x) -> str:
    return "?" if x is None else f"{x / 1e6:,.3f}"


def format_info(info: dict) -> str:
    lines = []
    if "layers" in info:
        shape = "x".join(map(str, info["input_shape"]))
        lines += [f"{info['source']}: {info['model']} ({info['format']} module), input {shape}",
                  f"  MACs {_mmacs(info['macs'])} M   params {info['params']:,}   bytes {info['bytes']:,}", "",
                  f"  {'layer':<28} {'type':<8} {'width':>6} {'MMACs':>10} {'params':>10} {'bytes':>10}"]
        for layer in info["layers"]:
            lines.append(f"  {layer['name']:<28} {layer['type']:<8} {layer['width']:>6} {_mmacs(layer['macs']):>10} "
                         f"{layer['params']:>10,} {layer['bytes']:>10,}")
        if info["format"] == "torchscript":
            lines.append("  (TorchScript: per-layer MACs need the Python model)")
        lines.append("")
    space = info.get("space")
    if space is None:
        pass
    elif "error" in space:
        lines.append(f"pruning space: none ({space['error']})")
    else:
        shape = "x".join(map(str, space["input_shape"]))
        lines += [f"pruning space of {space['model']} for input {shape} (fingerprint {space['fingerprint']})",
                  f"  base MACs {_mmacs(space['base_macs'])} M, params {space['base_params']:,}",
                  f"  genes: {space['genes']['neurons']:,} neuron + {space['genes']['connections']} connection = "
                  f"{space['genes']['total']:,}", "",
                  f"  {len(space['groups'])} channel groups (name, channels, coupled layers):"]
        for g in space["groups"]:
            lines.append(f"    {g['name']:<28} {g['size']:>5}  {', '.join(g['members'])}")
        lines += ["", f"  {len(space['units'])} connection units (name, kind, bypassed modules):"]
        for u in space["units"]:
            lines.append(f"    {u['name']:<28} {u['kind']:<10} {', '.join(u['modules'])}")
        if not space["units"]:
            lines.append("    none")
    return "\n".join(lines).rstrip()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
