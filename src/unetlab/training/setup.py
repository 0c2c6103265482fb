"""Getting a run ready: the run folder, the data split, model and loss, and the training patches and loader.

Everything here happens before the first step, and the workbench tools (:mod:`unetlab.training.tools`) build
their data, model and loss with the same functions, so they see exactly what the trainer sees.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import distributed as D
from .._version import __version__
from ..config import AUGMENT_PROBABILITIES, DataConfig, RunConfig, changed_leaves
from ..data.channels import channels_out
from ..data.dataset import (
    EpochSampler,
    PatchDataset,
    SampleCache,
    default_samples_per_epoch,
    readable_samples,
    resolve_num_workers,
)
from ..data.io import read_image
from ..data.layouts import load_from_config
from ..data.split import hold_out_test, load_split, save_split, split_samples
from ..data.targets import INSTANCE_KINDS, target_channels
from ..errors import ErrorKind, UnetlabError
from ..files import remove_entries, remove_stale_temporaries
from ..runfolder import Run, checkpoint_path, load_run
from .losses import build_loss, distance_loss, flow_loss

log = logging.getLogger(__name__)


# --- the run folder ------------------------------------------------------------------------------------------


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, main: bool, cfg: RunConfig | None = None) -> None:
    """Check the run folder for a new or resumed run (``main``: also create or clear it, as rank 0 does); a
    resume's ``cfg`` may change only what :func:`check_resume_config` allows."""
    if resume:
        if not checkpoint_path(out, "last").exists():
            raise UnetlabError("nothing to resume: no checkpoints/last.pt", out,
                               "start again without --resume, with --overwrite to replace the folder")
        if cfg is not None:
            check_resume_config(RunConfig.load(out / "config.yaml"), cfg, out)
        if main:  # a run killed while writing a checkpoint leaves its temporary file behind
            remove_stale_temporaries(out)
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UnetlabError("run folder already exists", out,
                               "use --resume to continue it or --overwrite to start again")
        if not any((out / n).exists() for n in RUN_FOLDER_MARKS):
            raise UnetlabError("--overwrite replaces a run folder, and this folder is not one (no config.yaml, "
                               "no checkpoints/)", out, "choose another --out")
    if main:
        if out.exists() and overwrite:  # nothing of the earlier run outlives it (its size model, say)
            remove_entries(out)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)


RUN_FOLDER_MARKS = ("config.yaml", "checkpoints")  # what makes a folder a run folder

# what a resumed run may set anew: how and how long it runs, what it reports and where its data now is; every
# other setting (network, data, optimiser, schedule, batch) is fixed by its checkpoint and config.yaml
RESUME_FREE_KEYS = ("epochs", "max_minutes", "device", "precision", "num_workers", "cache", "root", "monitor",
                    "early_stopping", "val_every", "save_every", "tensorboard", "score_test", "tune_postprocess",
                    "threshold", "min_size", "fill_holes", "markers", "prominence")


def check_resume_config(saved: RunConfig, cfg: RunConfig, run_dir: Path) -> None:
    """Refuse a resume whose flags change what the run is (one line naming them and the way to do it instead);
    log the settings it does change."""
    absolute_paths(cfg)  # a path given again as it was (relative, say) is not a change
    changed = changed_leaves(saved, cfg)
    fixed = [c for c in changed if c[0] not in RESUME_FREE_KEYS]
    if fixed:
        what = ", ".join(f"{_flag(k, b)} (was {_value(a)})" for k, a, b in fixed)
        raise UnetlabError(f"--resume continues the run as it was set up; it cannot change {what}", run_dir,
                           f"drop {'that flag' if len(fixed) == 1 else 'those flags'}, or start a new run from its "
                           f"weights with --init {run_dir} --out NEW_RUN")
    for k, a, b in changed:
        log.info("resume: %s (was %s)%s", _flag(k, b), _value(a),
                 "; the learning-rate schedule is stretched to the new length from here" if k == "epochs" else "")


def finished_note(epoch: int, epochs: int) -> str:
    """What the resume line adds when the checkpoint has done all the run's epochs ('' otherwise)."""
    if epoch < epochs:
        return ""
    return f": all {epochs} epochs are done, so only the run's last steps run again (--epochs N trains on)"


@contextmanager
def bad_file_hint(skip_bad: bool) -> Iterator[None]:
    """On a file the run cannot read (or whose mask does not fit), add how to list every such file and how to
    go on without them; the error stays one line of the same kind."""
    try:
        yield
    except UnetlabError as exc:
        if skip_bad or exc.kind is ErrorKind.OTHER or exc.path is None or "--skip-bad" in str(exc):
            raise
        raise exc.with_hint("`unetlab inspect DATA` lists every bad file; --skip-bad leaves them out") from None


def remove_unstarted_run(out: Path, existed: bool) -> None:
    """Undo the folder of a new run that stopped before its first checkpoint, so the command can run again."""
    if not out.is_dir() or any((out / "checkpoints").glob("*.pt")):
        return
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in out.iterdir():  # the folder was there (empty) before: keep it, empty again
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# --- data, model and loss ------------------------------------------------------------------------------------


def center_crop(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Crop the last two axes of ``t`` to (h, w) around the centre (targets of valid-padding networks)."""
    H, W = t.shape[-2:]
    if (H, W) == (h, w):
        return t
    y, x = (H - h) // 2, (W - w) // 2
    return t[..., y : y + h, x : x + w]


@dataclass
class Setup:
    """Everything built from the config before the first step."""

    cfg: RunConfig
    info: dict
    train_samples: list
    val_samples: list
    model: nn.Module
    patch_in: int
    bad: list[str] = field(default_factory=list)  # files left out (skip_bad), one line each
    test_samples: list = field(default_factory=list)  # held out: never trained on, never tunes anything


def check_counts(cfg: RunConfig) -> None:
    """One line for settings no run can have: fewer than one epoch or sample per batch, a negative seed, a class
    named twice, a validation share outside [0, 1), a patch under 16 px, an augmentation probability outside
    [0, 1]."""
    t, d = cfg.train, cfg.data
    for flag, value in (("--epochs", t.epochs), ("--batch-size", t.batch_size)):
        if value < 1:
            raise UnetlabError(f"{flag} must be at least 1, not {value}")
    if t.seed < 0:
        raise UnetlabError(f"--seed must be 0 or more, not {t.seed}")
    if d.classes and len(set(d.classes)) < len(d.classes):
        twice = sorted({c for c in d.classes if d.classes.count(c) > 1})
        raise UnetlabError(f"--classes names {', '.join(twice)} twice: each class is one output channel")
    if not 0 <= d.val_fraction < 1:
        raise UnetlabError(f"--val-fraction must be in [0, 1), not {d.val_fraction}")
    if d.patch_size < 16:
        raise UnetlabError(f"--patch-size must be at least 16 pixels, not {d.patch_size}")
    for name in AUGMENT_PROBABILITIES:
        value = getattr(d.augment, name)
        if value is not None and not 0 <= value <= 1:
            raise UnetlabError(f"--aug-{name.replace('_', '-')} is a probability, in [0, 1], not {value}")


def absolute_paths(cfg: RunConfig) -> None:
    """Make the config's paths that exist absolute (dataset, include list, split file, teacher, --init run), so
    the config.yaml a run saves means the same from any working directory (a resume from elsewhere)."""
    for section, key in (("data", "root"), ("data", "include"), ("data", "split_file"), ("train", "teacher"),
                         ("train", "init")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and Path(value).exists():
            setattr(obj, key, str(Path(value).resolve()))


def warn_teacher_leak(teacher: str | None, held_out: list) -> None:
    """Warn when a --teacher run trained on images this run validates or tests on: their scores then measure
    what the teacher memorised too (its split.json says which images it trained on)."""
    split = Path(teacher) / "split.json" if teacher else None
    if split is None or not split.is_file():
        return
    taught = set(load_split(split).get("train") or [])
    seen = [s.name for s in held_out if s.name in taught]
    if seen:
        log.warning("--teacher %s trained on %d of this run's %d validation/test images (e.g. %s): their scores "
                    "flatter the student; hold them out of both, e.g. --split-file %s", teacher, len(seen),
                    len(held_out), seen[0], split)


def build_setup(cfg: RunConfig, run_dir: Path | None, resume: bool, dist_info: D.DistInfo,
                skip_bad: bool = False) -> Setup:
    """Read and split the data, decide channels/classes, build the model (and save split and model info).

    With ``skip_bad``, unpaired files and samples whose image or mask cannot be read (or does not fit) are
    left out with a warning instead of stopping the run.
    """
    from ..models import build_model, ignored_settings

    check_counts(cfg)
    absolute_paths(cfg)
    start = take_from_init(cfg) if cfg.train.init and not resume else None  # may set the target
    if cfg.data.size_normalize and cfg.data.target not in INSTANCE_KINDS:
        raise UnetlabError(f"--size-normalize needs an instance target ({', '.join(INSTANCE_KINDS)}), not "
                           f"--target {cfg.data.target}", hint="only these targets' objects can be measured "
                           "again at prediction, where --diameter auto rescales each image")
    data = load_from_config(cfg.data)
    bad: list[str] = []
    if data.problems:
        if not skip_bad:
            more = f" (and {len(data.problems) - 1} more)" if len(data.problems) > 1 else ""
            raise UnetlabError(f"{data.problems[0]}{more}",
                               hint="`unetlab inspect DATA` lists them; --skip-bad leaves them out")
        bad += data.problems
    if not data.samples:
        raise UnetlabError("no image/mask pairs found", cfg.data.root)
    if skip_bad:
        data.samples, unreadable = readable_samples(data.samples, cfg.data)
        bad += unreadable
        if not data.samples:
            raise UnetlabError(f"no usable image/mask pairs: all {len(unreadable)} are bad", cfg.data.root,
                               f"e.g. {unreadable[0]}" if unreadable else None)
    if bad:
        log.warning("--skip-bad: leaving out %d bad file(s):\n  %s", len(bad), "\n  ".join(bad))
    split_cfg = cfg.data
    if resume and run_dir is not None and (run_dir / "split.json").exists():
        split_cfg = replace(cfg.data, split_file=str(run_dir / "split.json"))
    rest, test_s = hold_out_test(data.samples, split_cfg, seed=cfg.train.seed)
    train_s, val_s = split_samples(replace(data, samples=rest), split_cfg, seed=cfg.train.seed)
    if test_s:
        log.info("test split: %d image(s) held out (%s%s), scored once at the end", len(test_s),
                 ", ".join(s.name for s in test_s[:3]), " ..." if len(test_s) > 3 else "")
    if run_dir is not None and dist_info.is_main and not resume:
        save_split(run_dir / "split.json", train_s, val_s, test_s)
        warn_teacher_leak(cfg.train.teacher, [*val_s, *test_s])
    multiclass = data.task == "multiclass"
    first = read_image(train_s[0].image)
    image_channels = first.shape[0]
    in_ch = channels_out(image_channels, cfg.data)
    out_ch = len(data.classes) if multiclass else target_channels(cfg.data.target)
    info = {
        "in_channels": in_ch,
        "out_channels": out_ch,
        "image_channels": image_channels,
        "task": data.task,
        "classes": list(data.classes),
        "target": "classes" if multiclass else cfg.data.target,
        "layout": data.layout,
        "unetlab_version": __version__,
    }
    init = initial_weights(cfg, info, start) if start is not None else None
    ignored = ignored_settings(cfg.model.preset, lambda k: cfg.set_by_user(f"model.{k}"))
    if ignored and dist_info.is_main and not resume:
        log.warning("--preset %s fixes its own network: %s ignored", cfg.model.preset,
                    ", ".join(_flag(k, getattr(cfg.model, k)) for k in ignored))
    model = build_model(replace(cfg.model, in_channels=in_ch, out_channels=out_ch))
    if init is not None:
        model.load_state_dict(init)
    patch_in = int(model.valid_input_size(cfg.data.patch_size)) if model.padding == "valid" else cfg.data.patch_size
    return Setup(cfg, info, train_s, val_s, model, patch_in, bad, test_s)


# what a fine-tune takes from the model it starts from unless the user set it: the channels it was trained on
# (both keys, or neither), the target and classes it predicts, the normalisation of its inputs and whether
# its images were drawn at one object size (size_normalize: the size its weights know)
INIT_INPUT_KEYS = ("channels", "channel_code")
INIT_OUTPUT_KEYS = ("target", "classes")
INIT_ADOPTED_KEYS = ("normalization", "norm_low", "norm_high", "size_normalize")


def _value(value: object) -> str:
    """A setting's value as the command line writes it (``0,2`` for a list)."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _flag(key: str, value: object) -> str:
    """``--channels 0,2`` as the command line writes the setting ``key`` = ``value``."""
    return f"--{key.replace('_', '-')} {_value(value)}"


def _channels_text(n: int, data: DataConfig) -> str:
    """``1 channel (channel 0)``: what ``n`` input channels made by ``data``'s selection are."""
    how = (f"channel code {data.channel_code}" if data.channel_code else
           f"channel{'s' * (len(data.channels) > 1)} {','.join(map(str, data.channels))}" if data.channels
           else "all of the image's channels")
    return f"{n} channel{'s' * (n != 1)} ({how})"


def take_from_init(cfg: RunConfig) -> Run:
    """Load the run or pretrained model ``train.init`` and take its channels, target, classes and normalisation
    into ``cfg.data`` wherever the user did not set them; a target or classes set otherwise is a one-line error
    naming the fix."""
    start, name = load_run(cfg.train.init), cfg.train.init
    theirs = start.config.data
    for key in INIT_OUTPUT_KEYS:
        mine = getattr(cfg.data, key)
        if cfg.set_by_user(f"data.{key}") and mine != getattr(theirs, key):
            raise UnetlabError(
                f"--init {name} was trained with {_flag(key, getattr(theirs, key))}; drop {_flag(key, mine)} (a "
                f"fine-tune predicts what its model predicts) or train without --init")
    keys = INIT_OUTPUT_KEYS + INIT_ADOPTED_KEYS
    if not any(cfg.set_by_user(f"data.{k}") for k in INIT_INPUT_KEYS):
        keys += INIT_INPUT_KEYS
    taken = [k for k in keys if not cfg.set_by_user(f"data.{k}") and getattr(theirs, k) != getattr(cfg.data, k)]
    for key in taken:
        setattr(cfg.data, key, getattr(theirs, key))
    if taken:
        log.info("--init %s: taking %s from it", name, " ".join(_flag(k, getattr(theirs, k)) for k in taken))
    return start


def initial_weights(cfg: RunConfig, info: dict, start: Run | None = None) -> dict:
    """Weights of the run or pretrained model ``train.init`` (``start`` when already loaded) for fine-tuning;
    its network replaces ``cfg.model`` (so the weights fit), and its channels and target must match this run's."""
    start = start if start is not None else load_run(cfg.train.init)
    name, want = cfg.train.init, start.info.get("in_channels")
    if want != info["in_channels"]:
        fix = (f"drop {' '.join(_flag(k, getattr(cfg.data, k)) for k in INIT_INPUT_KEYS if getattr(cfg.data, k))} "
               f"or choose {want}" if cfg.data.channels or cfg.data.channel_code else f"choose {want} with --channels")
        raise UnetlabError(f"--init {name} was trained on {_channels_text(want, start.config.data)}; this run "
                           f"gives it {_channels_text(info['in_channels'], cfg.data)}: {fix}, e.g. --channels "
                           f"{','.join(map(str, start.config.data.channels or range(want)))}")
    for key in ("out_channels", "target"):
        if start.info.get(key) != info[key]:
            raise UnetlabError(f"--init {name} has {key} {start.info.get(key)!r} but this run needs {info[key]!r}",
                               start.path, hint="fine-tune a model trained for the same target and classes")
    if start.config.model != cfg.model:
        log.info("--init %s: training its network (%s) from its weights", name, start.config.model.preset)
    cfg.model = replace(start.config.model)
    return start.model.state_dict()


def make_loss_fn(cfg: RunConfig, info: dict) -> Callable:
    """The loss for this task/target (binary BCE+Dice, CE for classes/boundary, the distance or flow pair)."""
    if info["target"] == "distance":
        return distance_loss
    if info["target"] == "flow":
        return flow_loss
    return build_loss(cfg.train, 1 if info["out_channels"] == 1 else info["out_channels"])


def border_weight_fn(cfg: RunConfig) -> Callable | None:
    """The per-image weight map function: the border weight map when ``cfg.train.border_weight`` is on, the
    contact weight map when ``cfg.train.contact_weight`` > 0, else None."""
    t = cfg.train
    if t.border_weight and t.contact_weight > 0:
        raise UnetlabError("choose one weight map: --border-weight or --contact-weight")
    if t.contact_weight < 0:
        raise UnetlabError(f"--contact-weight must be 0 (off) or positive (got {t.contact_weight})")
    from .weightmap import border_weight_map, contact_weight_map

    if t.contact_weight > 0:
        return partial(contact_weight_map, w0=t.contact_weight, sigma=t.sigma)
    if t.border_weight:
        return partial(border_weight_map, w0=t.w0, sigma=t.sigma)
    return None


# --- training patches ----------------------------------------------------------------------------------------


def check_loaded(cache: SampleCache, image_channels: int) -> list[str]:
    """Read every sample of ``cache`` (kept when caching) and check its channels; the names of empty masks."""
    empty = []
    for i in range(len(cache)):
        item = cache[i]
        if item.image.shape[0] != image_channels:
            raise UnetlabError(
                f"image has {item.image.shape[0]} channel(s), the first training image has {image_channels}",
                cache.samples[i].image, "give all images the same channels, or --skip-bad leaves it out")
        if not item.labels.any():
            empty.append(cache.samples[i].name)
    return empty


def make_train_loader(dataset: PatchDataset, sampler: EpochSampler, cfg: RunConfig, device: torch.device,
                      dist_info: D.DistInfo) -> DataLoader:
    """The training DataLoader: patches cut and augmented in ``cfg.data.num_workers`` worker processes (None or
    negative: :func:`default_num_workers`), which fork after the images are decoded so they share the cache."""
    workers = resolve_num_workers(cfg.data.num_workers, device.type, dist_info.local_world_size)
    if workers > 0:
        dataset.precompute()  # decoded images, foreground indices and weight maps: made once, shared
    return DataLoader(
        dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=workers, drop_last=True,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        pin_memory=device.type == "cuda",
    )


def build_train_data(cfg: RunConfig, s: Setup, device: torch.device,
                     dist_info: D.DistInfo) -> tuple[PatchDataset, EpochSampler, DataLoader]:
    """The training patches, their epoch sampler and loader; every training sample is read (and cached) now,
    so bad files fail before any training, and all-empty masks stop the run."""
    dataset = PatchDataset(
        s.train_samples, cfg.data, s.patch_in, 1, multiclass=s.info["task"] == "multiclass",
        weight_fn=border_weight_fn(cfg), seed=cfg.train.seed,
    )
    empty = check_loaded(dataset.cache, s.info["image_channels"])
    if len(empty) == len(s.train_samples):
        raise UnetlabError(
            f"all {len(empty)} training masks are empty (no foreground pixels): nothing to learn",
            cfg.data.root, "masks must mark objects with non-zero values; --invert-mask if they mark the "
            "background")
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        log.warning("%d of %d training masks are empty (negative controls, fine when intended): %s",
                    len(empty), len(s.train_samples), shown)
    length = cfg.data.samples_per_epoch or default_samples_per_epoch(dataset.cache, cfg.data.patch_size)
    # several ranks: a whole number of global batches, so every rank runs the same steps
    wanted, length = length, D.distributed_samples_per_epoch(length, cfg.train.batch_size, dist_info.world_size,
                                                             cfg.train.grad_accumulation)
    if cfg.data.samples_per_epoch and length != wanted and dist_info.is_main:
        log.info("--samples-per-epoch %d: %d patches per epoch, a whole number of batches (%d per batch%s)", wanted,
                 length, cfg.train.batch_size, f" on each of {dist_info.world_size} ranks" if dist_info.enabled else "")
    dataset.length = length
    sampler = EpochSampler(length, dist_info.rank, dist_info.world_size)
    return dataset, sampler, make_train_loader(dataset, sampler, cfg, device, dist_info)


__all__ = ["Setup", "build_setup", "build_train_data", "center_crop", "check_loaded", "make_loss_fn",
           "make_train_loader", "prepare_run_dir", "remove_unstarted_run"]
