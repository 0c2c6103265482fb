"""The command registry (:func:`command`, :data:`COMMANDS`) and the commands on finished runs and the training
tools: tune, size-model, lr-find, overfit, compare. ``cli`` registers the main journey's commands into the same
registry and builds the parser; each block is the flags, then one call into the public API.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .config import RunConfig, apply_overrides
from .errors import UnetlabError
from .flags import add_config_flags, config_overrides

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int | None]]] = {}


def command(name: str, help: str, add: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register ``run(args)`` as subcommand ``name`` whose flags ``add(parser)`` declares."""

    def deco(run):
        COMMANDS[name] = (help, add or (lambda p: None), run)
        return run

    return deco


def config_from_args(args: argparse.Namespace, base: RunConfig | None = None) -> RunConfig:
    """The RunConfig from ``--config`` YAML (or ``base``) with every given flag applied on top."""
    cfg = base if base is not None else (RunConfig.load(args.config) if getattr(args, "config", None)
                                         else RunConfig())
    overrides = config_overrides(args)
    if getattr(args, "data", None):
        overrides["root"] = args.data
    return apply_overrides(cfg, overrides)


# --- commands on finished runs, training tools ---------------------------------------------------------------


def _add_tune(p):
    p.add_argument("run_dir", help="run folder written by `unetlab train` (with split.json)")
    p.add_argument("--data", help="the dataset folder it was trained on (default: the one in its config.yaml)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--metric", choices=["ap_mean", "f1"], default="ap_mean",
                   help="what tuning maximises per image: ap_mean, the DSB score (default), or f1 at IoU 0.5")


@command("tune", "Tune a finished run's instance post-processing again on its validation images, "
                 "then score its test split (unless it was trained with --score-test false)", _add_tune)
def _run_tune(args):
    from .training.tuning import retune_run

    r = retune_run(args.run_dir, data=args.data, device=args.device, metric=args.metric)
    pp, val, test = r["postprocess"], r["postprocess"]["validation_objects"], r["test"] or {}
    prominence = "" if pp["prominence"] is None else f", prominence {pp['prominence']}"
    print(f"{args.run_dir}: threshold {pp['threshold']:.2f}{prominence}, min size "
          f"{pp['min_size']}; validation AP@0.5 {val['ap50']:.3f}, DSB score {val['dsb_score']:.3f}"
          + (f"; test AP@0.5 {test['ap50']:.3f}, DSB score {test['dsb_score']:.3f}" if "ap50" in test else ""))
    return 0


def _add_size_model(p):
    p.add_argument("run_dir", help="run folder written by `unetlab train` (with split.json and an instance target)")
    p.add_argument("--data", help="the dataset folder it was trained on (default: the one in its config.yaml)")
    p.add_argument("--crops", type=int, default=1024, help="rescaled training crops to fit on (default 1024)")
    p.add_argument("--val-crops", type=int, default=256,
                   help="rescaled validation crops that choose the ridge penalty (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops' positions and zooms (default 0)")


@command("size-model", "Fit a finished run's size model (size_model.json) for --diameter auto from its training "
                       "images; its test images are not read", _add_size_model)
def _run_size_model(args):
    from .training.sizefit import fit_size_model_for_run

    sm = fit_size_model_for_run(args.run_dir, args.data, crops=args.crops, val_crops=args.val_crops,
                                seed=args.seed)
    err = sm.fit.get("val_median_abs_log_error")
    print(f"{args.run_dir}/size_model.json: {sm.fit.get('train_crops')} training crops, ridge alpha {sm.alpha:g}"
          + (f", median |log error| on validation crops {err:.3f}" if err is not None else ""))
    return 0


def _add_lr_find(p):
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--config", help="YAML config; flags override its keys")
    p.add_argument("--steps", type=int, default=100, help="batches in the sweep (default 100)")
    p.add_argument("--lr-min", type=float, default=1e-6, help="first learning rate (default 1e-6)")
    p.add_argument("--lr-max", type=float, default=1.0, help="last learning rate (default 1)")
    p.add_argument("--out", metavar="PNG", help="draw loss against learning rate into this PNG")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_config_flags(p, skip=("root", "lr"))


@command("lr-find", "Sweep the learning rate over training batches and suggest one (with a loss plot)",
         _add_lr_find)
def _run_lr_find(args):
    from .files import check_output_file
    from .training.tools import lr_find, plot_lr_find

    if args.out:  # before the sweep, not after it
        check_output_file(args.out, ".png", args.overwrite)
    result = lr_find(config_from_args(args), steps=args.steps, lr_min=args.lr_min, lr_max=args.lr_max)
    if args.out:
        plot_lr_find(result, args.out)
    stop = ", stopped when the loss diverged" if result.diverged else ""
    print(f"suggested learning rate {result.suggestion:.2e} ({result.method}; loss lowest at "
          f"{result.lr_at_min:.2e}{stop}){'; plot ' + args.out if args.out else ''}")
    return 0


def _add_overfit(p):
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--config", help="YAML config; flags override its keys")
    p.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2,3e-2",
                   help="comma-separated learning rates to try (default 1e-4,3e-4,1e-3,3e-3,1e-2,3e-2)")
    p.add_argument("--steps", type=int, default=200, help="most steps per learning rate (default 200)")
    p.add_argument("--tolerance", type=float, default=0.1, help="loss that counts as memorised (default 0.1)")
    add_config_flags(p, skip=("root", "lr"))


@command("overfit", "Check that the model can memorise one batch (exit 1 when no learning rate gets there)",
         _add_overfit)
def _run_overfit(args):
    from .training.tools import format_table, overfit_check

    try:
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError:
        raise UnetlabError(f"bad --lrs {args.lrs!r} (expected e.g. 1e-3,1e-2)") from None
    rows = overfit_check(config_from_args(args), lrs=lrs, steps=args.steps, tolerance=args.tolerance)
    print(format_table(rows, ["lr", "start_loss", "best_loss", "steps_to_tolerance", "passed", "diverged",
                              "seconds"]))
    passed = [r for r in rows if r["passed"]]
    if not passed:
        print(f"no learning rate reached loss {args.tolerance} in {args.steps} steps: check masks, targets and "
              f"loss (or allow more --steps)")
        return 1
    fastest = min(passed, key=lambda r: r["steps_to_tolerance"])
    print(f"memorised one batch: fastest at lr {fastest['lr']:g} ({fastest['steps_to_tolerance']} steps)")
    return 0


def _add_compare(p):
    p.add_argument("configs", nargs="+", metavar="CONFIG.yaml", help="YAML configs to train and compare")
    p.add_argument("--data", help="dataset folder (default: the configs' data.root, which must agree)")
    p.add_argument("--out", required=True, help="folder for the runs, compare.csv and compare.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing compare folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(p, skip=("root",))


@command("compare", "Train several configs on the same split and seed; table and bar chart of the results",
         _add_compare)
def _run_compare(args):
    from .training.tools import COMPARE_COLUMNS, compare, format_table

    rows = compare(args.configs, args.data, args.out, overrides=config_overrides(args),
                   overwrite=args.overwrite, progress=not args.no_progress and None)
    print(format_table(rows, COMPARE_COLUMNS))
    print(f"table {args.out}/compare.csv, chart {args.out}/compare.png")
    return 0
