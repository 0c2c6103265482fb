"""The run configuration: one dataclass tree, loaded from YAML and overridden by command-line flags.

Every leaf key is also a command-line flag: ``train.lr`` is ``--lr``, ``data.patch_size`` is ``--patch-size``
(leaf names are unique across sections). ``RunConfig`` is saved as ``config.yaml`` in every run folder.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import UnetlabError

log = logging.getLogger(__name__)


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A config field with ``default`` and its help line (the command-line flag's and docs/flags.md's)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable config defaults need a default_factory")
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class AugmentConfig:
    """Joint image/mask augmentations; each has its own probability (0 disables it)."""

    flip: float = _f(0.5, "probability of a horizontal flip, and again of a vertical one")
    rotate90: float = _f(0.5, "probability of a random quarter turn")
    affine: float = _f(0.0, "probability of a random rotation, scaling and shift (the --aug-affine-* ranges)")
    affine_degrees: float = _f(15.0, "largest affine rotation in degrees, either way")
    affine_scale: tuple[float, float] = _f((0.9, 1.1), "range of the affine scale factor, e.g. 0.9,1.1")
    affine_shift: float = _f(0.05, "largest affine shift, as a fraction of the patch size")
    elastic: float = _f(0.0, "probability of an elastic deformation (the U-Net paper's augmentation)")
    elastic_grid: int = _f(3, "control points per side of the elastic deformation's grid (the paper's: 3)")
    elastic_sigma: float = _f(10.0, "standard deviation of the elastic displacements, in pixels")
    brightness: float = _f(0.0, "probability of a random brightness shift")
    brightness_range: float = _f(0.1, "largest brightness shift, added in normalised intensity units")
    contrast: float = _f(0.0, "probability of a random contrast change")
    contrast_range: tuple[float, float] = _f((0.8, 1.2), "range of the contrast factor, e.g. 0.8,1.2")
    gamma: float = _f(0.0, "probability of a random gamma change")
    gamma_range: tuple[float, float] = _f((0.8, 1.25), "range of the gamma exponent, e.g. 0.8,1.25")
    noise: float = _f(0.0, "probability of added Gaussian noise")
    noise_std: float = _f(0.03, "standard deviation of the noise, in normalised intensity units")
    blur: float = _f(0.0, "probability of a Gaussian blur")
    blur_sigma: tuple[float, float] = _f((0.5, 1.5), "range of the blur's sigma in pixels, e.g. 0.5,1.5")
    object_intensity: float = _f(0.0, "probability of scaling each labelled object's brightness by its own "
                                 "random factor (dim nuclei next to bright ones)")
    object_intensity_range: tuple[float, float] = _f((0.4, 1.5), "range of the per-object brightness factor, "
                                                     "e.g. 0.4,1.5")
    background: float = _f(0.0, "probability of adding a smooth, uneven background (a low-frequency offset)")
    background_range: float = _f(0.3, "largest background offset, in normalised intensity units")
    zoom: float | None = _f(None, "probability of a random zoom of the whole patch (objects drawn at "
                            "--aug-zoom-range times their size); none: 0.5 for instance targets (boundary, "
                            "distance, flow), where object size matters most, else 0")
    zoom_range: tuple[float, float] = _f((0.5, 2.0), "range of the zoom factor, e.g. 0.5,2")


# the AugmentConfig fields that are probabilities (in [0, 1]; the others are their ranges)
AUGMENT_PROBABILITIES = ("flip", "rotate90", "affine", "elastic", "brightness", "contrast", "gamma", "noise", "blur",
                         "object_intensity", "background", "zoom")


@dataclass
class DataConfig:
    """Where the data is, how it is read, split and cut into patches."""

    root: str = _f("", "dataset folder (any layout `unetlab inspect` recognises)")
    layout: str | None = _f(None, "force a dataset layout (paired, kaggle_dsb, timelapse, multiclass, ...); "
                            "none: detected", metavar="NAME")
    include: str | None = _f(None, "only these samples: a text file of names (one per line), a glob or "
                             "'re:<regex>'", metavar="PATTERN")
    invert_mask: bool = _f(False, "the masks mark the background, not the objects")
    mask_dir: str | None = _f(None, "paired layout: the mask folder's name when it is not masks/")
    classes: list[str] | None = _f(None, "multiclass: the classes to train, in this order, e.g. "
                                   "membranes,mitochondrion; none: all")
    channels: list[int] | None = _f(None, "keep these image channels, in this order, e.g. 0 or 0,2; none: all")
    channel_code: str | None = _f(None, "build the input channels from the image's, e.g. 'mean(0,1),2?0.2' "
                                  "(see unetlab.data.channels)", metavar="CODE")
    normalization: str = _f("percentile", "per-image intensity normalisation: percentile, minmax, dtype or none")
    norm_low: float = _f(1.0, "percentile normalisation: the low percentile, mapped to 0")
    norm_high: float = _f(99.8, "percentile normalisation: the high percentile, mapped to 1")
    target: str = _f("binary", "what the network learns: binary (masks), boundary (interior/boundary/background), "
                     "distance or flow (instance targets for touching objects)")
    val_fraction: float = _f(0.2, "share of the groups (or images) held out for validation")
    val: str | None = _f(None, "validation samples by name: a glob or 're:<regex>' (their groups go too)",
                         metavar="PATTERN")
    val_groups: list[str] | None = _f(None, "validation groups (positions, experiments) by name or glob, e.g. "
                                      "Pos008,Pos009 (time-lapse groups are expA/Pos008: '*/Pos008' names it in "
                                      "every experiment)")
    fold: str | None = _f(None, "k-fold cross-validation by group: 'K/N' validates on fold K of N, e.g. 1/5",
                          metavar="K/N")
    split_file: str | None = _f(None, "reuse the train/validation/test split of this split.json",
                                  metavar="JSON")
    # the test split is held out before train/validation: never trained on, never chooses a checkpoint or tunes
    # post-processing; scored once at the end (summary.json "test")
    test: str | None = _f(None, "test samples by name, a glob or 're:<regex>' (their groups are held out): "
                          "scored once at the end, never trained or tuned on", metavar="PATTERN")
    test_groups: list[str] | None = _f(None, "test groups by name or glob, e.g. Pos010,Pos011 (or '*/Pos010')")
    test_fraction: float = _f(0.0, "a seeded random share of the groups held out as the test split")
    patch_size: int = _f(256, "training patch size in pixels")
    foreground_fraction: float = _f(0.5, "share of patches centred on a foreground pixel")
    # instance targets only; random zoom varies around the normalised size, validation rescales by the true
    # sizes, and `predict --diameter auto` brings new images to it
    size_normalize: bool = _f(False, "zoom each image so its median object has the training median size "
                              "(Cellpose's rule; instance targets only)")
    samples_per_epoch: int | None = _f(None, "patches per epoch; none: enough to cover the training images once")
    num_workers: int | None = _f(None, "data loader worker processes; none: automatic (0 on CPU, up to 4 beside "
                                 "a GPU)")
    cache: bool = _f(True, "keep decoded images in memory")
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """Which network to build; ``preset`` names an entry of :mod:`unetlab.models.presets`."""

    preset: str = _f("unet", "network preset (`unetlab models` lists them): unet, unet-slim, unet-paper, ...")
    in_channels: int | None = _f(None, "input channels; none: from the data")
    out_channels: int | None = _f(None, "output channels; none: from the target and classes")
    depth: int = _f(4, "down-sampling steps of the U-Net")
    base_width: int = _f(32, "channels of the first level (doubled at each level down)")
    widths: list[int] | None = _f(None, "channels of every level instead of --base-width, e.g. 16,32,64,128,256")
    norm: str = _f("batch", "normalisation layers: batch, group, instance, layer or none")
    padding: str = _f("same", "convolution padding: same (output size = input size) or valid (the paper's)")
    dropout: float = _f(0.0, "dropout probability at the bottom of the U-Net (end of the contracting path)")
    upsample: str = _f("bilinear", "up-sampling in the decoder: bilinear, transpose or pixelshuffle")


@dataclass
class TrainConfig:
    """How to optimise: loss, optimiser, schedule, precision, checkpoints and safety nets."""

    epochs: int = _f(40, "training epochs")
    batch_size: int = _f(8, "patches per optimiser step (per process)")
    lr: float | str = _f(1e-3, "learning rate: a number, or auto (an lr-find sweep first)",
                         metavar="X|auto")
    weight_decay: float = _f(1e-4, "weight decay of the optimiser")
    optimizer: str = _f("adamw", "adamw, adam, sgd or adamw8bit")
    momentum: float = _f(0.9, "sgd momentum")
    nesterov: bool = _f(False, "sgd: Nesterov momentum")
    schedule: str = _f("warmup_cosine", "learning-rate schedule: warmup_cosine, onecycle, step, plateau or "
                       "constant")
    warmup_epochs: float = _f(1.0, "warmup_cosine: epochs of linear warm-up")
    step_size: int = _f(30, "step schedule: epochs between learning-rate drops")
    step_gamma: float = _f(0.1, "step schedule: factor of each drop")
    loss: str = _f("bce_dice", "bce, bce_dice, ce, ce_dice, dice or focal (distance and flow targets have their "
                   "own)")
    class_weights: list[float] | None = _f(None, "loss weight per class, e.g. 1,2 (binary: background,cell; 1,2 "
                                           "gives fatter masks)")
    border_weight: bool = _f(False, "weigh the loss with the U-Net paper's border weight map (--w0, --sigma)")
    w0: float = _f(10.0, "border weight map: weight of the gaps between objects (the paper's: 10)")
    sigma: float = _f(5.0, "border and contact weight maps: width of the gaps in pixels (the paper's: 5)")
    contact_weight: float = _f(0.0, "w0 of a weight map on object pixels and gaps where two objects meet; 0: off")
    grad_clip: float | None = _f(1.0, "clip the gradient norm to this; none: no clipping")
    ema: float = _f(0.0, "keep an exponential moving average of the weights with this decay per optimiser step "
                    "(0: off; 0.999 is usual): validation, the best checkpoint and predict use the average")
    precision: str = _f("auto", "autocast precision: auto, fp32, bf16 or fp16")
    channels_last: bool | None = _f(None, "channels-last memory format; none: on CUDA only (slower for CPU "
                                    "training)")
    val_every: int = _f(1, "validate every this many epochs")
    save_every: int = _f(1, "write checkpoints/last.pt every this many epochs")
    monitor: str = _f("val_dice", "the metrics.csv column that chooses checkpoints/best.pt")
    early_stopping: int | None = _f(None, "stop after this many validations without improvement; none: never")
    max_minutes: float | None = _f(None, "stop training when another epoch would pass this many minutes (checked "
                                   "after each epoch); none: no limit")
    collapse_patience: int = _f(3, "validations at Dice 0 (or at the all-foreground Dice) with a flat loss before "
                                   "the run counts as collapsed and is restored")
    max_recoveries: int = _f(3, "most restores after a collapse or a non-finite loss")
    seed: int = _f(0, "random seed of the split, patches and weights")
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    deterministic: bool = _f(False, "deterministic algorithms (slower; same results run to run)")
    tensorboard: bool = _f(True, "write TensorBoard events to RUN_DIR/tensorboard")
    teacher: str | None = _f(None, "a run folder whose predictions the model also learns from (distillation)",
                               metavar="RUN")
    init: str | None = _f(None, "fine-tune: start from this run's or pretrained model's network and weights "
                          "(its channels, target and classes too)", metavar="RUN|NAME")
    distill_weight: float = _f(0.5, "distillation: share of the loss that follows the teacher")
    distill_temperature: float = _f(1.0, "distillation: softmax temperature of teacher and student")
    grad_accumulation: int = _f(1, "batches summed per optimiser step")
    sync_batchnorm: bool = _f(False, "several GPUs: synchronise batch-norm statistics across them")
    score_test: bool = _f(True, "score the held-out test split at the end of training and in unetlab tune "
                          "(false: it stays unseen while you choose between runs; score it later with predict "
                          "--split test and evaluate)")
    tune_postprocess: bool = _f(True, "tune threshold, minimum size and prominence on the validation images "
                                "after training (instance targets; unetlab tune RUN tunes a binary run)")


@dataclass
class PostprocessConfig:
    """Turning probabilities into masks and instance labels."""

    threshold: float = _f(0.5, "foreground probability threshold")
    min_size: int = _f(10, "drop objects smaller than this many pixels")
    fill_holes: bool = _f(True, "fill holes inside objects")
    markers: str = _f("auto", "watershed seeds that split touching objects: auto, interior, distance, flow or none")
    # in units of the predicted normalised distance (distance target) or in pixels (Euclidean distance of the
    # interior or mask: boundary and binary targets)
    prominence: float | None = _f(None, "how far a distance peak must rise above the saddle to a higher one to "
                                  "seed an object of its own; larger splits less; none: 0.05 for the distance "
                                  "target, 1.0 otherwise")


@dataclass
class RunConfig:
    """Everything a run needs; saved as ``config.yaml`` in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)

    def __post_init__(self) -> None:
        # the dotted keys a YAML file or a flag set (not saved): what a fine-tune may not take from its --init
        self.given: set[str] = set()

    def set_by_user(self, key: str) -> bool:
        """True when the dotted ``key`` (``data.channels``) was given in a YAML file or a flag, or differs from
        its default (a value set in Python)."""
        *path, name = key.split(".")
        obj: Any = self
        ref: Any = RunConfig()
        for part in path:
            obj, ref = getattr(obj, part), getattr(ref, part)
        return key in self.given or getattr(obj, name) != getattr(ref, name)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) for YAML/JSON."""
        return _plain(asdict(self))

    def save(self, path: str | Path) -> None:
        """Write the config as YAML atomically."""
        from .files import write_text

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        write_text(path, text)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RunConfig:
        """Build from a nested dict; unknown keys are an error naming the key."""
        cfg = _from_dict(cls, d or {}, "")
        cfg.given = set(_leaf_paths(d or {}))
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Read a YAML config file."""
        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise UnetlabError("config file not found", path) from None
        except yaml.YAMLError as exc:
            raise UnetlabError(f"not valid YAML ({str(exc).splitlines()[0]})", path) from None
        if d is not None and not isinstance(d, dict):
            raise UnetlabError("config must be a mapping of sections", path)
        if not d:
            log.warning("%s is empty: every setting is the default", path)
        return cls.from_dict(d)


def _leaf_paths(d: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted leaf keys of a nested config dict (``data.augment.flip``)."""
    out = []
    for k, v in d.items():
        out += _leaf_paths(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of the dataclass ``cls`` (cached)."""
    return typing.get_type_hints(cls)


# keys older versions wrote into config.yaml: read and dropped with a warning, so old runs still load
RETIRED_KEYS = {"postprocess.min_distance": "watershed markers now use postprocess.prominence"}


def _from_dict(cls: type, d: dict[str, Any], prefix: str) -> Any:
    hints = type_hints(cls)
    names = {f.name for f in fields(cls)}
    retired = [k for k in d if f"{prefix}{k}" in RETIRED_KEYS]
    for k in retired:
        log.warning("config key '%s%s' is no longer used (%s)", prefix, k, RETIRED_KEYS[f"{prefix}{k}"])
    d = {k: v for k, v in d.items() if k not in retired}
    unknown = [k for k in d if k not in names]
    if unknown:
        raise UnetlabError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in d.items():
        t = hints[k]
        if is_dataclass(t):
            if not isinstance(v, dict):
                raise UnetlabError(f"config section '{prefix}{k}' must be a mapping")
            kwargs[k] = _from_dict(t, v, f"{prefix}{k}.")
        else:
            kwargs[k] = coerce(v, t, f"{prefix}{k}")
    return cls(**kwargs)


def split_list(text: str) -> list[str]:
    """Items of a list flag: "1,2", "1, 2" or YAML-style "[1, 2]" / "(1, 2)".

    Brackets are list syntax only when they enclose the whole value, so glob patterns such as ``[ab]*`` or
    ``*Pos00[89]`` keep theirs.
    """
    text = text.strip()
    if len(text) >= 2 and (text[0], text[-1]) in (("[", "]"), ("(", ")")):
        inner = text[1:-1]
        # "[ab]" on its own is a one-item list; a glob such as "[ab]x[cd]" is not enclosed by one pair
        if text[0] == "(" or "[" not in inner and "]" not in inner:
            text = inner
    return [item.strip() for item in text.split(",") if item.strip() != ""]


def coerce(value: Any, typ: Any, key: str = "") -> Any:
    """Convert ``value`` (often a string from the command line) to the annotated type ``typ``."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except (UnetlabError, ValueError, TypeError) as exc:
                errors.append(str(exc))
        raise UnetlabError(f"bad value {value!r} for '{key}'")
    if origin in (list, tuple):
        items = value
        if isinstance(value, str):
            items = split_list(value)
        if not isinstance(items, (list, tuple)):
            items = [items]
        inner = args[0] if args else str
        out = [coerce(v, inner, key) for v in items]
        return tuple(out) if origin is tuple else out
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise UnetlabError(f"bad value {value!r} for '{key}' (expected {getattr(typ, '__name__', typ)})") from None
    return value


def leaf_keys() -> dict[str, tuple[str, str, Any, Any]]:
    """Map flag name (``patch_size``) -> (section, field, type, default) for every leaf of RunConfig.

    ``augment`` leaves are exposed as ``aug_<name>`` (e.g. ``--aug-elastic 0.5``).
    """
    out: dict[str, tuple[str, str, Any, Any]] = {}
    root = RunConfig()
    for sec in fields(RunConfig):
        sec_obj = getattr(root, sec.name)
        for f in fields(sec_obj):
            t = type_hints(type(sec_obj))[f.name]
            if is_dataclass(t):
                sub = getattr(sec_obj, f.name)
                for g in fields(sub):
                    out[f"aug_{g.name}"] = (f"{sec.name}.{f.name}", g.name, type_hints(type(sub))[g.name],
                                            getattr(sub, g.name))
                continue
            if f.name in out:
                raise RuntimeError(f"duplicate config leaf {f.name}")
            out[f.name] = (sec.name, f.name, t, getattr(sec_obj, f.name))
    return out


def changed_leaves(old: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """The leaves whose values differ between two configs, as (flag name, old value, new value)."""
    out = []
    for name, (section, field_name, _t, _d) in leaf_keys().items():
        a, b = old, new
        for part in section.split("."):
            a, b = getattr(a, part), getattr(b, part)
        va, vb = getattr(a, field_name), getattr(b, field_name)
        if _plain(va) != _plain(vb):
            out.append((name, va, vb))
    return out


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return a copy of ``cfg`` with leaf keys (``lr``, ``train.lr`` or ``data.augment.flip``) replaced."""
    given = set(cfg.given)
    cfg = RunConfig.from_dict(cfg.to_dict())
    cfg.given = given
    leaves = leaf_keys()
    for key, value in overrides.items():
        if "." in key:
            *path, name = key.split(".")
        elif key in leaves:
            path, name = leaves[key][0].split("."), leaves[key][1]
        else:
            raise UnetlabError(f"unknown config key '{key}'")
        obj = cfg
        for p in path:
            if not hasattr(obj, p):
                raise UnetlabError(f"unknown config key '{key}'")
            obj = getattr(obj, p)
        if not dataclasses.is_dataclass(obj) or name not in {f.name for f in fields(obj)}:
            raise UnetlabError(f"unknown config key '{key}'")
        setattr(obj, name, coerce(value, type_hints(type(obj))[name], key))
        given.add(".".join([*path, name]))
    return cfg
