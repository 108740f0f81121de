"""The ``evoprune`` command line (also ``python -m evoprune``): :func:`main`, one handler per subcommand that calls
the library and the job, and :func:`guarded`, which turns evoprune's errors into one line and an exit code. The
parser (subcommands, flags, help, usage errors) is :mod:`evoprune.cli.parser`.

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
by their flags (``--p-c``), also for errors raised deep inside the library (:attr:`ConfigError.setting`, looked up
in :data:`evoprune.cli.options.FLAGS`).

``--data demo`` (also ``demo:quick``, ``demo:SEED``, ``demo:quick:SEED``) means the demo's generated data, so the
demo's outputs can be evaluated: see :func:`evoprune.cli.sources.demo_data_spec`.

The prune job behind ``prune`` is also the one the examples (``examples/vgg16_cifar.py``...) run; see
:func:`evoprune.cli.job.prune_job`. The search/job flags are declared with the settings, in :mod:`evoprune.cli.options`.
"""
from __future__ import annotations

import json
import sys
from typing import Callable, Sequence

import torch

from ..data import normalized, parse_normalization
from ..deploy.exporter import export
from ..errors import ConfigError, EvoPruneError, ModelError
from ..models import MODELS, build, fit_weights
from ..storage import torch_save
from ..train import check_training_args, evaluate, train
from ..validators import check_device
from . import demo, inspect_model, job, sources
from .options import setting_flag
from .parser import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, build_parser, check_combinations

# ----------------------------------------------------------------------------------------------------------------
# Entry point and error handling
# ----------------------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``evoprune`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_combinations(parser, args)
    except SystemExit as exc:  # --help, --version and usage errors
        return _exit_status(exc.code)
    return guarded(lambda: HANDLERS[args.command](args))


def guarded(fn: Callable[[], int | None]) -> int:
    """Run ``fn`` and turn evoprune's errors into one ``error: ...`` line on stderr and an exit code:
    :class:`~evoprune.errors.ConfigError` -> 2, every other :class:`~evoprune.errors.EvoPruneError` -> 1. A
    ``ConfigError`` that names its ``setting`` is printed with the setting's flag (``p_c`` -> ``--p-c``)."""
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
# Subcommands
# ----------------------------------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        demo.run_demo(args.out, quick=args.quick, seed=args.seed)
    finally:
        torch.set_num_threads(threads)
    return EXIT_OK


def cmd_prune(args) -> int:
    if args.arch:
        job.prune_job(MODELS[args.arch], args, title=f"evoprune: {args.arch}")
    else:
        job.prune_saved_model(args)
    return EXIT_OK


def cmd_train(args) -> int:
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_positive(lr=args.lr)
    _check_device(args.device)
    check_training_args(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=0.9,
                        weight_decay=5e-4, schedule="onecycle", label_smoothing=0.1, kd_alpha=0.5,
                        kd_temperature=4.0, max_batches=None)
    data = sources.load_data(args)
    torch.manual_seed(args.seed)
    model = build(args.arch, num_classes=len(data.train.classes))
    history = train(model, data.train, args.epochs, val_set=data.val, lr=args.lr, batch_size=args.batch_size,
                    device=args.device, seed=args.seed)
    top1 = history["val_acc"][-1]
    torch_save(model.cpu().state_dict(), args.out)
    print(f"val top-1 {top1:.4f} ({len(data.val)} images); state_dict saved to {args.out}")
    return EXIT_OK


def cmd_evaluate(args) -> int:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_device(args.device)
    parse_normalization(args.normalize)  # before the data are loaded
    if args.arch:
        state = sources.read_weights(args.weights)  # a bad file is refused before the data are loaded
        data = sources.load_data(args)
        classes = len(data.train.classes)
        model = fit_weights(build(args.arch, num_classes=classes), state, args.weights,
                            hint=f"Pass the --arch it was saved from (the number of classes, {classes}, comes "
                                 "from --data).")
        where = f"{args.arch} with {args.weights}"
    else:
        model = sources.load_model_file(args.model, trust=args.trust_pickle, purpose="evaluate")
        data = sources.load_data(args)
        where = args.model
    data = normalized(data, args.normalize)
    sources.check_outputs(model, data, where)
    images, seed = data.val, args.seed or 0
    if args.split != "val":
        search_half, report_half = job.val_splits(data.val, seed)
        images = report_half if args.split == "val-report" else search_half
    top1 = evaluate(model, images, batch_size=args.batch_size, device=args.device)
    if args.split == "val":
        print(f"top-1 {top1:.4f} on {len(images)} val images ({where})")
    else:
        use = "report top-1 on" if args.split == "val-report" else "score plans on"
        print(f"top-1 {top1:.4f} on {len(images)} {args.split} images, the half of the {len(data.val)} val images "
              f"that prune and demo {use} with --seed {seed} ({where})")
    return EXIT_OK


#: Model-card entries ``evoprune export`` copies from the source model's card: how inputs are normalised and where
#: the model came from (the round, its row and the split its top-1 is on).
CARRIED_CARD_KEYS = ("normalization", "round", "row", "top1_split", "split_seed")


def cmd_export(args) -> int:
    model = sources.load_model_file(args.model, trust=args.trust_pickle, purpose="export")
    shape = args.input_shape or sources.card_input_shape(args.model) or sources.DEFAULT_INPUT_SHAPE
    # what the source's card says about its inputs and provenance travels with the model
    carried = {k: v for k, v in sources.source_card(args.model).items() if k in CARRIED_CARD_KEYS}
    try:
        written = export(model, args.out, sources.example_inputs(shape), formats=args.formats,
                         extra={**carried, "source": str(args.model)})
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:  # tracing / saving failures
        raise ModelError(f"{args.model}: cannot be exported ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    for fmt, path in written.items():
        print(f"{fmt:12s} {path}")
    return EXIT_OK



def cmd_inspect(args) -> int:
    if args.arch:
        info = inspect_model.arch_info(args.arch, weights=args.weights, num_classes=args.num_classes,
                                       shape=args.input_shape)
    else:
        info = inspect_model.file_info(args.model, trust=args.trust_pickle, shape=args.input_shape)
    print(json.dumps(info, indent=2) if args.json else inspect_model.format_info(info))
    return EXIT_OK


def _check_device(device: str) -> None:
    """``--device``: a torch device that is there (ConfigError naming the flag otherwise)."""
    try:
        check_device(device)
    except ConfigError as exc:
        raise ConfigError(exc.named("--device")) from None


def _check_positive(**flags) -> None:
    """``--flag-name`` values that must be > 0 (ConfigError naming the flag)."""
    for name, value in flags.items():
        if not value > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")


HANDLERS: dict[str, Callable] = {"demo": cmd_demo, "prune": cmd_prune, "train": cmd_train, "evaluate": cmd_evaluate,
                                 "export": cmd_export, "inspect": cmd_inspect}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
