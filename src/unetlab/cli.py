"""Command line: parses flags into the config or a function's arguments and calls one public function.

Each subcommand is a pair registered with :func:`~unetlab.cli_commands.command`: ``add(parser)`` declares its flags and
``run(args)`` calls the public API. User mistakes (:class:`UnetlabError`) print one line and exit with 2;
internal errors exit with 1 and show the traceback only under ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .cli_commands import COMMANDS, command, config_from_args
from .config import RunConfig, apply_overrides
from .errors import UnetlabError
from .flags import add_config_flags, add_dataclass_flags, config_overrides, dataclass_from_args

log = logging.getLogger("unetlab")


# --- commands ------------------------------------------------------------------------------------------------
# Each block: the flags, then the call into the public API. Keep logic out of this file.
# (Helpers add their command blocks above the "end of commands" marker.)


def _add_train(p):
    p.add_argument("--data", help="dataset folder (any layout `unetlab inspect` recognises)")
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--config", help="YAML config; flags override its keys")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out images/masks that cannot be read or do not fit, listing them")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(p, skip=("root",))


@command("train", "Train a U-Net on a folder of images and masks", _add_train)
def _run_train(args):
    from .runfolder import load_run_config
    from .training import train

    if args.resume:
        base = load_run_config(args.resume)
        cfg = config_from_args(args, base)
        result = train(cfg, args.resume, resume=True, progress=not args.no_progress and None,
                       skip_bad=args.skip_bad)
    else:
        if not args.out:
            raise UnetlabError("--out RUN_DIR is required (or --resume RUN_DIR)")
        cfg = config_from_args(args)
        if not cfg.data.root:
            raise UnetlabError("--data DIR is required")
        result = train(cfg, args.out, overwrite=args.overwrite, progress=not args.no_progress and None,
                       skip_bad=args.skip_bad)
    if getattr(result, "rank", 0) != 0:
        return 0
    if result.run_dir is not None:
        print(f"best {result.monitor or cfg.train.monitor} {result.best_metric:.4f} at epoch {result.best_epoch}; "
              f"run folder {result.run_dir}")
    if result.bad:
        print(f"{len(result.bad)} bad file(s) left out:")
        for b in result.bad:
            print(f"  {b}")
    return 0


def _add_predict(p):
    from .inference.options import PredictOptions

    p.add_argument("--model", required=True,
                   help="run folder written by `unetlab train`, or a pretrained model's name (`unetlab models`)")
    p.add_argument("--input", required=True, help="an image file or a folder of images")
    p.add_argument("--out", required=True, help="output folder")
    add_dataclass_flags(p, PredictOptions)


@command("predict", "Predict masks (and instance labels, counts) for new images with a trained run",
         _add_predict)
def _run_predict(args):
    from .inference.options import PredictOptions
    from .inference.predict import format_predict_summary, predict

    s = predict(args.model, args.input, args.out, options=dataclass_from_args(args, PredictOptions))
    if s["rank"] == 0:
        print(format_predict_summary(s))
    return 0


def _add_demo(p):
    p.add_argument("--out", default="unetlab_demo", help="folder for the synthetic data, run and predictions")
    p.add_argument("--minutes", type=float, default=2.0, help="training time budget in minutes (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the training (default 0)")


@command("demo", "Generate synthetic cells, train a small U-Net, predict and score held-out images",
         _add_demo)
def _run_demo(args):
    from .demo import format_demo_result, run_demo

    r = run_demo(args.out, minutes=args.minutes, overwrite=args.overwrite, seed=args.seed)
    print(format_demo_result(r))
    return 0


def _add_weightmap(p):
    p.add_argument("mask", help="a mask or instance label image")
    p.add_argument("--out", required=True, help="PNG to write (colour-mapped weights)")
    p.add_argument("--w0", type=float, default=10.0, help="border weight (paper: 10)")
    p.add_argument("--sigma", type=float, default=5.0, help="border width in pixels (paper: 5)")
    p.add_argument("--no-class-balance", action="store_true", help="leave out the class-frequency term w_c")
    p.add_argument("--contacts", action="store_true",
                   help="the contact weight map of --contact-weight instead (object pixels too, no w_c)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


@command("weightmap", "Draw the U-Net border weight map of a mask as a colour-mapped PNG", _add_weightmap)
def _run_weightmap(args):
    from .files import check_output_file
    from .training.weightmap import write_weight_map_png

    check_output_file(args.out, ".png", args.overwrite)
    stats = write_weight_map_png(args.mask, args.out, args.w0, args.sigma,
                                 not (args.no_class_balance or args.contacts), objects=args.contacts)
    print(f"{args.out}: weights min {stats['min']:.3f}  mean {stats['mean']:.3f}  max {stats['max']:.3f}")
    return 0


def _add_augment_preview(p):
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--n", type=int, default=8, help="number of random draws")
    p.add_argument("--out", default="augment_preview.png", help="PNG to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (default 0)")
    p.add_argument("--index", type=int, default=0, help="which sample of the dataset to show")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_config_flags(p, only="data.augment")  # the very flags `train` has for config 'data.augment'


@command("augment-preview", "Show one image and its mask under random augmentations (a PNG grid)",
         _add_augment_preview)
def _run_augment_preview(args):
    from .data.augment import preview_dataset_augmentations
    from .files import check_output_file

    check_output_file(args.out, ".png", args.overwrite)
    cfg = apply_overrides(RunConfig(), config_overrides(args)).data.augment
    print(preview_dataset_augmentations(args.data, cfg, args.out, n=args.n, seed=args.seed, index=args.index))
    return 0


def _add_evaluate(p):
    p.add_argument("--pred", required=True, help="folder of predicted masks/labels (or a run-length CSV)")
    p.add_argument("--truth", required=True, help="folder of true masks/labels, a dataset folder or an RLE CSV")
    p.add_argument("--invert-mask", action="store_true", help="the truth masks mark the background")
    p.add_argument("--instances", action="store_true", help="also match objects (AP at IoU 0.5..0.95, DSB score)")
    p.add_argument("--iou-thresholds", default=None, help="comma-separated IoU thresholds (default 0.5,0.55..0.95)")
    p.add_argument("--out", default=None, help="write the report to this .json and per-image rows beside it as .csv")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--classes", default=None,
                   help="multiclass truth: the classes the model predicts, in its order (e.g. membranes,mitochondrion)")


@command("evaluate", "Compare predicted masks with ground truth (Dice, IoU, object AP)", _add_evaluate)
def _run_evaluate(args):
    from .evaluation.evaluate import evaluate, format_summary, parse_iou_thresholds

    report = evaluate(args.pred, args.truth, invert_mask=args.invert_mask, instances=args.instances,
                      out=args.out, iou_thresholds=parse_iou_thresholds(args.iou_thresholds),
                      overwrite=args.overwrite, classes=args.classes.split(",") if args.classes else None)
    print(format_summary(report))
    return 0


def _add_inspect(p):
    p.add_argument("data", help="dataset folder")
    p.add_argument("--layout", default=None, help="force a layout (default: detected)")
    p.add_argument("--mask-dir", default=None, help="mask folder with another name (paired layout)")
    p.add_argument("--classes", default=None, help="multiclass: comma-separated subset of classes")
    p.add_argument("--invert-mask", action="store_true", help="masks mark background, not objects")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.epilog = ("layouts, detected in this order: timelapse (<exp>_raw_data/PosNNN + <exp>_masks/PosNNN), "
                "kaggle_dsb (<id>/images + <id>/masks), pennfudan (PNGImages + PedMasks), multiclass "
                "(masks_<class>/ folders, or class-index masks + codes.txt), paired (images/ + masks/, or "
                "img + img_masks in one folder), rle_csv (CSV of run-length masks + image folder)")


@command("inspect", "Describe a dataset folder and list its problems (exit code 2 when there are any)",
         _add_inspect)
def _run_inspect(args):
    import json

    from .data.inspect import format_report, inspect_dataset

    classes = [c for c in args.classes.split(",") if c] if args.classes else None
    report = inspect_dataset(args.data, args.layout, mask_dir=args.mask_dir, classes=classes,
                             invert_mask=args.invert_mask)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    if report["problems"]:
        first, n = report["problems"][0]["message"], len(report["problems"])
        more = f" (and {n - 1} more problem{'s' * (n > 2)}, listed above)" if n > 1 else ""
        print(f"unetlab inspect: error: {first}{more}", file=sys.stderr)
        return 2
    return 0


def _add_patchify(p):
    p.add_argument("data", help="dataset folder")
    p.add_argument("--size", type=int, required=True, help="patch size in pixels")
    p.add_argument("--stride", type=int, default=None, help="step between patches (default: size)")
    p.add_argument("--out", required=True, help="output folder (images/ + masks/)")
    p.add_argument("--layout", default=None, help="force a dataset layout (default: detected)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty folder")


@command("patchify", "Cut a dataset into overlapping image/mask patches (the last one ends at the border; "
                     "only images smaller than a patch are mirror-padded)",
         _add_patchify)
def _run_patchify(args):
    from .data.patches import patchify

    n = patchify(args.data, args.size, args.stride or args.size, args.out, layout=args.layout,
                 overwrite=args.overwrite)
    print(f"{n} patches written to {args.out}")
    return 0


def _add_subimages(p):
    p.add_argument("data", help="dataset folder")
    p.add_argument("--margin", type=int, default=16, help="pixels kept around each object")
    p.add_argument("--out", required=True, help="output folder (images/ + masks/)")
    p.add_argument("--layout", default=None, help="force a dataset layout (default: detected)")
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty folder")


@command("subimages", "Cut one sub-image per object (or connected component) with its mask", _add_subimages)
def _run_subimages(args):
    from .data.patches import cut_subimages

    n = cut_subimages(args.data, args.margin, args.out, layout=args.layout, overwrite=args.overwrite)
    print(f"{n} sub-images written to {args.out}")
    return 0


def _add_models(p):
    p.add_argument("--json", action="store_true", help="print the table as JSON")


@command("models", "List the pretrained models (trained on, test scores) and the presets to train",
         _add_models)
def _run_models(args):
    import json

    from .models.presets import format_presets_table, list_presets
    from .runfolder import format_pretrained_table, pretrained_models

    rows, cards = list_presets(), pretrained_models()
    if args.json:
        print(json.dumps({"pretrained": cards, "presets": rows}, indent=1))
    else:
        print("Pretrained models (unetlab predict --model NAME ...):\n" + format_pretrained_table(cards)
              + "\n\nPresets (unetlab train --preset NAME ...):\n" + format_presets_table(rows))
    return 0


def _add_export(p):
    p.add_argument("run_dir", help="run folder written by `unetlab train` (or a pretrained model's name)")
    p.add_argument("--format", dest="fmt", choices=["onnx", "torchscript", "bioimageio"], default="onnx",
                   help="onnx or torchscript: one model file; bioimageio: a BioImage.IO model package (rdf.yaml, "
                        "TorchScript and ONNX weights, test input/output, README, cover) as a folder or a .zip")
    p.add_argument("--out", default=None, help="file, or for bioimageio a folder or .zip, to write (default: "
                                               "RUN_DIR/model.onnx, model.pt or bioimageio.zip)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file or folder")
    g = p.add_argument_group("bioimageio package")
    g.add_argument("--name", help="model name (default: from the run folder and target)")
    g.add_argument("--author", action="append", help="author name; repeat for several (default: 'unetlab user')")
    g.add_argument("--license", default="CC-BY-4.0", help="SPDX license id (default CC-BY-4.0)")
    g.add_argument("--sample", help="image file to use as the test input (default: a synthetic image)")
    g.add_argument("--tag", action="append", default=[], help="extra tag; repeat for several")


@command("export", "Export a trained model to ONNX, TorchScript or a BioImage.IO model package", _add_export)
def _run_export(args):
    if args.fmt == "bioimageio":
        from .inference.bioimageio import export_bioimageio

        out = export_bioimageio(args.run_dir, args.out, overwrite=args.overwrite, name=args.name,
                                authors=args.author, license=args.license, sample=args.sample, tags=args.tag,
                                opset=args.opset)
    else:
        from .inference.export import export_run

        out = export_run(args.run_dir, args.fmt, args.out, overwrite=args.overwrite, opset=args.opset)
    print(out)
    return 0


@command("flags", "Every command's flags and their help as one Markdown page (docs/flags.md)",
         lambda p: p.add_argument("--out", metavar="MD", help="write the page to this file instead of printing it"))
def _run_flags(args):
    from .files import write_text
    from .flags import parser_markdown

    text = parser_markdown(build_parser())
    write_text(args.out, text) if args.out else print(text, end="")
    return 0


# --- end of commands -----------------------------------------------------------------------------------------

_COMMAND_ORDER = ("demo", "train", "predict", "evaluate", "inspect")  # the main journey first in --help


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser with one subparser per registered command; with ``only``, only that command's flags
    are declared (so ``unetlab models`` does not import what ``predict``'s flags need)."""
    parser = argparse.ArgumentParser(prog="unetlab", description="Train and run U-Nets on microscopy images.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for PyTorch (default: $UNETLAB_THREADS, else PyTorch's choice); "
                             "1 is often fastest on a machine shared with other jobs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    first = [n for n in _COMMAND_ORDER if n in COMMANDS]
    for name in first + [n for n in COMMANDS if n not in first]:
        help_text, add, _run = COMMANDS[name]
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            add(p)
    return parser


def _one_line(exc: BaseException) -> str:
    """The text of ``exc`` on one line (library messages sometimes span several)."""
    return " ".join(str(exc).split())


def _resume_hint(args: argparse.Namespace) -> str:
    """How to continue an interrupted command that can resume ('' for the others)."""
    if args.command == "train" and (getattr(args, "resume", None) or getattr(args, "out", None)):
        return f"continue with: unetlab train --resume {args.resume or args.out}"
    if args.command == "predict":
        return "continue with the same command and --resume (images already done are skipped)"
    return ""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``unetlab`` console script."""
    from ._runtime import set_threads, tune_allocator

    tune_allocator()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # the first command name given (the options before it take no names as values): only its flags are built
    parser = build_parser(only=next((a for a in argv if a in COMMANDS), ""))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else (logging.WARNING if args.quiet else logging.INFO),
        format="%(message)s",
        stream=sys.stderr,
    )
    if not args.command:
        parser.print_help()
        return 2
    _help, _add, run = COMMANDS[args.command]
    try:
        set_threads(args.threads)
        rc = run(args)
        return int(rc or 0)
    except UnetlabError as exc:
        if args.debug:
            raise
        print(f"unetlab {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        hint = _resume_hint(args)
        print(f"unetlab {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`unetlab evaluate ... | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # internal error: one line unless --debug
        if args.debug:
            raise
        print(
            f"unetlab {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
