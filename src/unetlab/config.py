"""The run configuration: one dataclass tree, loaded from YAML and overridden by command-line flags.

Every leaf key is also a command-line flag: ``train.lr`` is ``--lr``, ``data.patch_size`` is ``--patch-size``
(leaf names are unique across sections). ``RunConfig`` is saved as ``config.yaml`` in every run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import UnetlabError

log = logging.getLogger(__name__)


@dataclass
class AugmentConfig:
    """Joint image/mask augmentations; each has its own probability (0 disables it)."""

    flip: float = 0.5  # horizontal and vertical flips, each with this probability
    rotate90: float = 0.5
    affine: float = 0.0
    affine_degrees: float = 15.0
    affine_scale: tuple[float, float] = (0.9, 1.1)
    affine_shift: float = 0.05  # fraction of size
    elastic: float = 0.0
    elastic_grid: int = 3  # the paper's coarse grid
    elastic_sigma: float = 10.0  # displacement std in pixels
    brightness: float = 0.0
    brightness_range: float = 0.1  # additive, in normalised units
    contrast: float = 0.0
    contrast_range: tuple[float, float] = (0.8, 1.2)
    gamma: float = 0.0
    gamma_range: tuple[float, float] = (0.8, 1.25)
    noise: float = 0.0
    noise_std: float = 0.03
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    # random zoom of whole patches (objects drawn 0.5x-2x their size); None: 0.5 for instance targets
    # (boundary, distance), where object size matters most, else 0
    zoom: float | None = None
    zoom_range: tuple[float, float] = (0.5, 2.0)


@dataclass
class DataConfig:
    """Where the data is, how it is read, split and cut into patches."""

    root: str = ""
    layout: str | None = None  # auto-detected when None
    include: str | None = None  # only these samples: a text file of names (one per line), a glob or 're:<regex>'
    invert_mask: bool = False
    mask_dir: str | None = None  # paired layout: a mask folder with another name
    classes: list[str] | None = None  # multiclass: the subset of classes to train
    channels: list[int] | None = None  # channel selection, e.g. [0, 2]
    channel_code: str | None = None  # loading code, see unetlab.data.channels
    normalization: str = "percentile"  # percentile | minmax | dtype | none
    norm_low: float = 1.0
    norm_high: float = 99.8
    target: str = "binary"  # binary | boundary | distance | flow
    val_fraction: float = 0.2
    val: str | None = None  # glob or 're:<regex>' on sample names
    val_groups: list[str] | None = None
    fold: str | None = None  # "K/N" k-fold by group
    split_file: str | None = None  # reuse a split.json
    # a test split, held out before train/validation: never trained on, never chooses a checkpoint or tunes
    # post-processing; scored once at the end (summary.json "test")
    test: str | None = None  # glob or 're:<regex>' on sample names (their groups are held out)
    test_groups: list[str] | None = None
    test_fraction: float = 0.0  # a seeded random share of the groups
    patch_size: int = 256
    foreground_fraction: float = 0.5  # share of patches centred on a foreground pixel
    # instance targets only; random zoom varies around the normalised size, validation rescales by the true
    # sizes, and `predict --diameter auto` brings new images to it
    size_normalize: bool = False  # zoom each image so its median object has the training median size (Cellpose)
    samples_per_epoch: int | None = None  # default: enough patches to cover the training images once
    num_workers: int | None = None  # None: automatic (0 on CPU, up to 4 beside a GPU)
    cache: bool = True  # keep decoded images in memory
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """Which network to build; ``preset`` names an entry of :mod:`unetlab.models.presets`."""

    preset: str = "unet"
    in_channels: int | None = None  # from the data when None
    out_channels: int | None = None  # from the task when None
    depth: int = 4
    base_width: int = 32
    widths: list[int] | None = None
    norm: str = "batch"  # batch | group | instance | layer | none
    padding: str = "same"  # same | valid
    dropout: float = 0.0
    upsample: str = "bilinear"  # bilinear | transpose | pixelshuffle


@dataclass
class TrainConfig:
    """How to optimise: loss, optimiser, schedule, precision, checkpoints and safety nets."""

    epochs: int = 40
    batch_size: int = 8
    lr: float | str = 1e-3  # a number or "auto" (lr-find)
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | adam | sgd | adamw8bit
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str = "warmup_cosine"  # warmup_cosine | onecycle | step | plateau | constant
    warmup_epochs: float = 1.0
    step_size: int = 30
    step_gamma: float = 0.1
    loss: str = "bce_dice"  # bce | bce_dice | ce | ce_dice | dice | focal
    class_weights: list[float] | None = None
    border_weight: bool = False  # the U-Net border weight map (w0, sigma) on the loss
    w0: float = 10.0
    sigma: float = 5.0
    contact_weight: float = 0.0  # w0 of a weight map on object pixels and gaps where two objects meet (0 off)
    grad_clip: float | None = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool | None = None  # None: on CUDA only (measured slower for CPU training)
    val_every: int = 1
    save_every: int = 1
    monitor: str = "val_dice"
    early_stopping: int | None = None  # patience in evaluations
    max_minutes: float | None = field(default=None, metadata={"help": (
        "stop training when another epoch would pass this many minutes (checked after each epoch); "
        "none: no limit")})
    collapse_patience: int = 3
    max_recoveries: int = 3
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    tensorboard: bool = True
    teacher: str | None = None
    init: str | None = None  # start from this run's (or pretrained model's) weights and network: fine-tuning
    distill_weight: float = 0.5
    distill_temperature: float = 1.0
    grad_accumulation: int = 1
    sync_batchnorm: bool = False
    tune_postprocess: bool = True  # tune threshold/min size on validation images after training


@dataclass
class PostprocessConfig:
    """Turning probabilities into masks and instance labels."""

    threshold: float = 0.5
    min_size: int = 10
    fill_holes: bool = True
    markers: str = "auto"  # auto | interior | distance | flow | none
    # how far a distance peak must rise above the saddle to a higher neighbour to seed an object of its own:
    # in units of the predicted normalised distance (distance target) or in pixels (Euclidean distance of the
    # interior or mask: boundary and binary targets); None: 0.05 for the distance target, 1.0 otherwise
    prominence: float | None = None


@dataclass
class RunConfig:
    """Everything a run needs; saved as ``config.yaml`` in the run folder."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)

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
        return _from_dict(cls, d or {}, "")

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
        return cls.from_dict(d)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# keys older versions wrote into config.yaml: read and dropped with a warning, so old runs still load
RETIRED_KEYS = {"postprocess.min_distance": "watershed markers now use postprocess.prominence"}


def _from_dict(cls: type, d: dict[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
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
            t = _hints(type(sec_obj))[f.name]
            if is_dataclass(t):
                sub = getattr(sec_obj, f.name)
                for g in fields(sub):
                    out[f"aug_{g.name}"] = (f"{sec.name}.{f.name}", g.name, _hints(type(sub))[g.name],
                                            getattr(sub, g.name))
                continue
            if f.name in out:
                raise RuntimeError(f"duplicate config leaf {f.name}")
            out[f.name] = (sec.name, f.name, t, getattr(sec_obj, f.name))
    return out


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Return a copy of ``cfg`` with leaf keys (``lr``, ``train.lr`` or ``data.augment.flip``) replaced."""
    cfg = RunConfig.from_dict(cfg.to_dict())
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
        setattr(obj, name, coerce(value, _hints(type(obj))[name], key))
    return cfg


# --- command-line flags built from the dataclasses (one builder for train, augment-preview, predict) ---

CONFIG_SECTIONS = {"data": "data", "model": "model", "train": "training", "postprocess": "post-processing"}


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """The trailing ``# comment`` of each field of the dataclass ``cls`` (its command-line help)."""
    import inspect

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    pattern = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$")
    return {m.group(1): m.group(2) for m in map(pattern.match, source.splitlines()) if m}


def _section_class(section: str) -> type:
    obj: Any = RunConfig
    for part in section.split("."):
        obj = _hints(obj)[part]
    return obj


def add_config_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = (), only: str | None = None) -> None:
    """One flag per config leaf (``--lr``, ``--patch-size``, ``--aug-elastic`` ...) of section ``only``
    (default: all), except ``skip``; only given flags override (see :func:`config_overrides`)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (section, _field, typ, default) in leaf_keys().items():
        if name in skip or (only is not None and section != only):
            continue
        sec = section.split(".")[0]
        g = groups.get(section)
        if g is None:
            title = "augmentation" if section.endswith("augment") else CONFIG_SECTIONS.get(sec, sec)
            g = groups[section] = p.add_argument_group(f"{title} options (config '{section}')")
        flag = "--" + name.replace("_", "-")
        shown = default if not isinstance(default, (list, tuple)) else ",".join(map(str, default))
        note = field_comments(_section_class(section)).get(_field, "")
        text = f"{note} (default {shown})" if note else f"(default {shown})"
        text = text.replace("%", "%%")
        if typ is bool:
            g.add_argument(flag, dest=f"cfg__{name}", nargs="?", const="true", default=argparse.SUPPRESS,
                           metavar="BOOL", help=text)
        else:
            g.add_argument(flag, dest=f"cfg__{name}", default=argparse.SUPPRESS, metavar="V", help=text)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The leaf overrides given on the command line through :func:`add_config_flags` (``{"lr": "1e-3"}``)."""
    return {k[5:]: v for k, v in vars(args).items() if k.startswith("cfg__")}


def add_dataclass_flags(p: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass ``cls``, with the type, default, choices and help of the field and
    its metadata (``help``, and optionally ``flag`` (None: no flag), ``choices``, ``metavar``, ``cli_type``,
    ``cli_default``); a field whose command-line default is False becomes a switch."""
    hints = _hints(cls)
    for f in fields(cls):
        meta = f.metadata
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        if flag is None:
            continue
        default = meta.get("cli_default", f.default)
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": meta["help"]}
        if default is False:
            kw["action"] = "store_true"
        else:
            typ = meta.get("cli_type") or next(a for a in (*typing.get_args(hints[f.name]), hints[f.name])
                                               if a is not type(None))
            if typ in (int, float):
                kw["type"] = typ
            kw.update({k: meta[k] for k in ("choices", "metavar") if k in meta})
        p.add_argument(flag, **kw)


def dataclass_from_args(args: argparse.Namespace, cls: type) -> Any:
    """An instance of ``cls`` from the flags :func:`add_dataclass_flags` declared, each value passed through
    its field's ``from_cli`` converter when it has one."""
    values = {}
    for f in fields(cls):
        if f.name in vars(args) and f.metadata.get("flag", "") is not None:
            convert = f.metadata.get("from_cli")
            values[f.name] = convert(getattr(args, f.name)) if convert else getattr(args, f.name)
    return cls(**values)
