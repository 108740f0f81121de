"""The ``evoprune`` argument parser: its subcommands, their flags and help texts, and the flag combinations argparse
cannot express (:func:`check_combinations`). Usage errors are one ``error: ...`` line and exit code 2.

The search/job flags of ``prune`` (and the examples, which build their parser from :class:`Parser`,
:class:`HelpFormatter` and :func:`add_prune_arguments`) come from the settings' declarations in
:mod:`evoprune.cli.options`. The handlers that run each subcommand are in :mod:`evoprune.cli.commands`.
"""
from __future__ import annotations

import argparse
import os
import textwrap

from .._version import __version__
from ..deploy.exporter import FORMATS
from ..errors import ConfigError
from ..models import MODELS
from . import sources
from .options import add_search_arguments, setting_flag

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

ARCHS = tuple(MODELS)  # the built-in architectures --arch names
PROG = "evoprune"
SPLITS = ("val", "val-report", "val-search")


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
    """``"pt,onnx"`` -> ``("pt", "onnx")``: export formats among :data:`evoprune.deploy.exporter.FORMATS`."""
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
                        help=TRUST_HELP + (". .pt2 and TorchScript files need no trust" if torchscript_ok else ""))


def add_prune_arguments(parser: argparse.ArgumentParser, *, default_weights: str | None = None,
                        default_data: str | None = None) -> None:
    """The flags of ``evoprune prune`` for a built-in architecture (also used by the examples): data, teacher
    weights or baseline training, and the search flags of :func:`evoprune.cli.options.add_search_arguments`."""
    add_data_arguments(parser, default=default_data)
    parser.add_argument("--weights", metavar="PT", default=default_weights,
                        help="teacher state_dict for the architecture (tensors only); without it a baseline is "
                             "trained first and cached in --out")
    parser.add_argument("--baseline-epochs", type=int, default=4, metavar="N",
                        help="epochs of baseline training when no --weights are given (default: %(default)s)")
    add_search_arguments(parser)


# ----------------------------------------------------------------------------------------------------------------
# The parser
# ----------------------------------------------------------------------------------------------------------------

def _command(sub, name: str, summary: str, description: str, epilog: str | None = None) -> Parser:
    return sub.add_parser(name, formatter_class=HelpFormatter, help=summary, description=_wrap(description),
                          epilog=epilog)


def build_parser() -> Parser:
    """The `evoprune` parser: the global flags here, each subcommand's in its `_<name>_command` below."""
    parser = Parser(prog=PROG, formatter_class=HelpFormatter,
                    description=_wrap("Evolve which neurons and connections of a trained CNN to keep (DEAP genetic "
                                      "algorithm), then remove the rest for real (torch-pruning)."),
                    epilog="exit codes: 0 success, 2 usage/configuration error, 1 runtime failure\n"
                           "run 'evoprune COMMAND --help' for the flags of a command")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    parser.commands = sub.choices  # subcommand -> its parser (for check_combinations' errors, with its prog)

    _demo_command(sub)
    _prune_command(sub)
    _train_command(sub)
    _evaluate_command(sub)
    _export_command(sub)
    _inspect_command(sub)
    return parser


def _demo_command(sub) -> None:
    p = _command(sub, "demo", "the built-in job on generated data (no download)",
                 "Train a tiny CNN on generated images, then run a small 2-round search and write the compact "
                 "models and the full report. Needs no data and no download.",
                 "writes into --out: round{k}.pt, round{k}.pt2, round{k}.onnx (onnx extra), round{k}.json, report.md,\n"
                 "report.json, logbook.csv and, with matplotlib (pip install 'evoprune[plot]'), pareto.png\n\n"
                 "top-1 figures are on the val-report half of the generated val images; to check one:\n"
                 "  evoprune evaluate --model runs/demo/round2.pt2 --data demo --split val-report\n"
                 "(after 'demo --quick' use --data demo:quick; after 'demo --seed 3' use --data demo:3 --seed 3)")
    p.add_argument("--out", metavar="DIR", default="runs/demo", help="output directory")
    p.add_argument("--quick", action="store_true",
                   help="even smaller data and search, for a smoke test (a few seconds)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the data, training and search")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch CPU threads; the demo's tiny network runs fastest on one")


def _prune_command(sub) -> None:
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


def _train_command(sub) -> None:
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


def _evaluate_command(sub) -> None:
    p = _command(sub, "evaluate", "top-1 accuracy on the val split",
                 "Print the top-1 accuracy of a model on the val split of --data, or on the half of it that "
                 "'evoprune prune' and 'evoprune demo' report top-1 on (--split val-report).",
                 "examples:\n"
                 "  evoprune evaluate --arch vgg16_bn --weights vgg16.pt --data cifar10/\n"
                 "  evoprune evaluate --model runs/vgg16/round2.pt2 --data cifar10/ --split val-report\n"
                 "  evoprune evaluate --model runs/demo/round2.pt2 --data demo --split val-report\n"
                 "    (the demo's data: --data demo:quick after 'demo --quick'; --data demo:3 --seed 3 after\n"
                 "    'demo --seed 3')")
    add_model_source(p, arch_help="built-in architecture (needs --weights)",
                     model_help="a saved model: TorchScript, or a pickled whole model with --trust-pickle")
    p.add_argument("--weights", metavar="PT", help="with --arch: the state_dict to evaluate (tensors only)")
    add_data_arguments(p)
    p.add_argument("--normalize", default="data", metavar="{data,train,MEAN/STD}",
                   help="input normalisation, as the model was trained and pruned with: data (the data's mean/std, "
                        "CIFAR-10's), train (computed from the training images) or MEAN/STD per channel "
                        "(default: %(default)s)")
    p.add_argument("--split", choices=SPLITS, default="val",
                   help="val: every val image; val-report: the half of val that prune and demo report top-1 on "
                        "(their report.json, report.md and summary); val-search: the half their GA scores plans on")
    p.add_argument("--seed", type=int, metavar="N",
                   help="with --split val-report/val-search: the --seed of the prune or demo run whose halves to "
                        "use (default 0)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="evaluation batch size")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def _export_command(sub) -> None:
    p = _command(sub, "export", "write a saved model as torch.export/ONNX + card",
                 "Convert a saved Python model into deployment formats, check each against the original and write "
                 "a JSON model card (STEM.json; it keeps the input normalisation of the source's card).",
                 "writes STEM.pt, STEM.pt2 (torch.export), STEM.onnx (with the onnx extra installed) and STEM.json;\n"
                 "--formats pt,pt2,onnx,torchscript adds TorchScript (deprecated in torch >= 2.9)")
    p.add_argument("--model", metavar="FILE.pt", required=True,
                   help="the model to export: a whole saved model (torch.save(model); needs --trust-pickle)")
    p.add_argument("--input-shape", type=input_shape, metavar="C,H,W",
                   help="input shape for tracing and checking (default: the input shape in the model's card "
                        "FILE.json if there is one, else 3,32,32)")
    p.add_argument("--out", metavar="STEM", required=True, help="output path without extension")
    p.add_argument("--formats", type=formats_list, default="pt,pt2,onnx", metavar="LIST",
                   help="comma-separated formats among pt, pt2, onnx, torchscript (default: %(default)s)")
    p.add_argument("--trust-pickle", action="store_true", help=TRUST_HELP)


def _inspect_command(sub) -> None:
    p = _command(sub, "inspect", "show what can be pruned, or layer widths",
                 "For --arch: the pruning space (channel groups and their sizes, connection units, base MACs and "
                 "params). For --arch with --weights (a state_dict) and for --model: per-layer widths, MACs, "
                 "params and bytes, plus the pruning space when it is a Python model.",
                 "examples:\n"
                 "  evoprune inspect --arch vgg16_bn\n"
                 "  evoprune inspect --arch vgg16_bn --weights vgg16.pt\n"
                 "  evoprune inspect --model runs/demo/round2.pt --trust-pickle")
    add_model_source(p, arch_help="built-in architecture", model_help="a saved model (e.g. a pruned round{k}.pt)")
    p.add_argument("--weights", metavar="PT",
                   help="with --arch: a state_dict to load into it (tensors only, strictly); shows its layers")
    p.add_argument("--input-shape", type=input_shape, metavar="C,H,W",
                   help="input shape (default: the model card's for --model if there is one, else 3,32,32)")
    p.add_argument("--num-classes", type=int, metavar="N",
                   help="with --arch: number of classes (default: the classifier width in --weights, else 10)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")


def check_combinations(parser: Parser, args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot express; usage errors (exit code 2)."""
    sub = parser.commands[args.command]  # the subcommand's parser, for its prog
    if hasattr(args, "data") and not args.data:
        sub.error("--data is required (or set $EVOPRUNE_DATA)")
    if getattr(args, "data", None):
        try:
            demo_spec = sources.demo_data_spec(args.data)
        except ConfigError as exc:
            sub.error(exc.named(setting_flag(exc.setting)))
        if demo_spec is not None and args.download:
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
