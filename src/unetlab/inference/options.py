"""Every prediction setting in one place: :class:`PredictOptions`, shared by the API and ``unetlab predict``.

Each field carries its command-line help in its metadata (``help``, and where the flag differs from the
field: ``flag``, ``choices``, ``metavar``, ``cli_type``, ``cli_default``, ``from_cli``); ``flag=None`` marks a
setting of the Python API only. The CLI builds its predict flags from these fields with
:func:`unetlab.flags.add_dataclass_flags`, so the flags and the options cannot drift apart.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..config import PostprocessConfig, coerce
from ..errors import UnetlabError
from .rescale import parse_diameter
from .streaming import STREAM_THRESHOLD


def _opt(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field with ``default`` and its command-line description in the metadata."""
    return field(default=default, metadata={"help": help, **cli})


def _megapixels_to_pixels(mpx: float) -> int | None:
    """``--stream-threshold`` is in megapixels with 0 meaning never; the option is in pixels with None."""
    return int(mpx * 1e6) if mpx > 0 else None


def _channel_list(text: str | None) -> list[int] | None:
    """``--channels 0,2`` (or ``[0, 2]``) as a list of channel indices; not given: None."""
    return coerce(text, list[int] | None, "--channels")


def _no_progress(flag: bool) -> bool | None:
    """``--no-progress`` given: no bar (False); not given: automatic (None)."""
    return False if flag else None


@dataclass
class PredictOptions:
    """How :func:`unetlab.predict` tiles, runs and post-processes, and which outputs it writes."""

    tile: int = _opt(512, "tile size in pixels (default 512)")
    overlap: float = _opt(0.25, "tile overlap as a fraction (default 0.25)")
    batch_size: int = _opt(4, "tiles per forward pass (default 4)")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N (with --backend onnx: onnxruntime's CUDA provider)")
    precision: str = _opt("auto", "autocast precision (default auto: bf16 or fp16 on a GPU, bf16 on CPUs "
                          "with native bf16, else fp32; fp32 with --backend onnx); the one used is logged and "
                          "recorded in predictions.json", choices=("auto", "fp32", "bf16", "fp16"))
    channels: list[int] | None = _opt(
        None, "the image channels the model takes, in order, e.g. 0 or 0,2 (default: the channels it was trained "
        "on, e.g. channel 0 of an RGB image for the nuclei model)", metavar="C[,C...]", cli_type=str,
        from_cli=_channel_list)
    probabilities: bool = _opt(False, "also write float32 probability TIFFs")
    instances: bool = _opt(False, "also write instance labels (labels/NAME.tif), one row per object with its "
                           "measurements (objects.csv), counts per image (counts.csv) and outline overlays "
                           "(overlays/NAME.png)")
    ome_zarr: bool = _opt(False, "also write the instance labels as OME-Zarr (labels/NAME.ome.zarr, NGFF 0.4 with "
                          "the input's pixel size), beside the TIFF")
    overlays: bool = _opt(False, "write outline overlay PNGs (overlays/NAME.png; --instances writes them too)")
    tta: bool = _opt(False, "average the 8 flips/rotations (either backend)")
    rle: str | Path | None = _opt(None, "write a Kaggle run-length submission CSV", metavar="CSV")
    rle_style: str = _opt("dsb", "run-length CSV style: dsb (ImageId,EncodedPixels) or sartorius "
                          "(id,predicted) (default dsb)", choices=("dsb", "sartorius"))
    rois: bool = _opt(False, "write ImageJ/Fiji ROI zips of the object outlines")
    backend: str = _opt("torch", "run the network with PyTorch or an exported ONNX file (default torch)",
                        choices=("torch", "onnx"))
    onnx: str | Path | None = _opt(None, "with --backend onnx: the file `unetlab export MODEL --format onnx` wrote "
                                   "(none: MODEL/model.onnx)", metavar="FILE")
    compile: bool = _opt(False, "torch.compile the network (slow first call)")
    overwrite: bool = _opt(False, "replace outputs in a non-empty --out")
    resume: bool = _opt(False, "skip images whose outputs already exist")
    skip_bad: bool = _opt(False, "go on past unreadable images, listing them")
    split: str | None = _opt(None, "with a dataset folder as --input: only the run's validation, training or "
                             "held-out test samples", choices=("val", "train", "test"))
    diameter: float | str | None = _opt(
        "auto", "object diameter in pixels in these images, so they are rescaled to the training size; 'auto' "
        "(default) measures it per image when predicting --instances with an instance model (boundary, "
        "distance or flow target), and for every prediction of a size-normalised one; 'none' predicts at the "
        "images' own size", metavar="PX|auto|none", cli_type=str, from_cli=parse_diameter)
    threshold: float | None = _opt(
        None, "foreground probability threshold for masks and objects (default: the run's, tuned on its "
        "validation images and stored in its config.yaml)", metavar="P")
    min_size: int | None = _opt(None, "drop objects smaller than this many pixels (default: the run's)",
                                metavar="PX")
    prominence: float | None = _opt(
        None, "how far a distance peak must rise above the saddle to a higher one to seed an object of its own "
        "(distance target: in units of the normalised distance; boundary/binary: pixels); larger splits less "
        "(default: the run's)", metavar="H")
    stream_threshold: int | None = _opt(
        STREAM_THRESHOLD, "TIFFs larger than this many megapixels are read, predicted and written band by "
        "band from disk (default 64; 0 = never)", metavar="MPX", cli_type=float, cli_default=64.0,
        from_cli=_megapixels_to_pixels)
    progress: bool | None = _opt(None, "no progress bar", flag="--no-progress", cli_default=False,
                                 from_cli=_no_progress)
    postprocess: PostprocessConfig | None = _opt(None, "post-processing settings (default: the run's)",
                                                 flag=None)


def effective_postprocess(o: PredictOptions, run_postprocess: PostprocessConfig) -> PostprocessConfig:
    """The post-processing a prediction uses: ``o.postprocess`` or the run's, with the ``threshold``,
    ``min_size`` and ``prominence`` that ``o`` sets on top; a value out of range is a one-line error."""
    pp = o.postprocess or run_postprocess
    if o.threshold is not None and not 0.0 < o.threshold < 1.0:
        raise UnetlabError(f"--threshold must lie between 0 and 1 (a probability), not {o.threshold}")
    if o.min_size is not None and o.min_size < 0:
        raise UnetlabError(f"--min-size must be 0 or more pixels, not {o.min_size}")
    if o.prominence is not None and not o.prominence > 0:
        raise UnetlabError(f"--prominence must be positive, not {o.prominence}")
    changes = {k: getattr(o, k) for k in ("threshold", "min_size", "prominence") if getattr(o, k) is not None}
    return replace(pp, **changes) if changes else pp


def resolve_options(options: PredictOptions | None = None, overrides: dict[str, Any] | None = None
                    ) -> PredictOptions:
    """``options`` (default: all defaults) with keyword ``overrides`` on top; unknown keys: TypeError."""
    base = PredictOptions() if options is None else options
    if not isinstance(base, PredictOptions):
        raise TypeError(f"predict() options must be a PredictOptions, not {type(base).__name__}")
    overrides = overrides or {}
    known = [f.name for f in fields(PredictOptions)]
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TypeError(f"predict() got an unexpected keyword argument {key!r}: not a prediction option "
                            f"({hint}known: {', '.join(known)})")
    o = replace(base, **overrides) if overrides else base
    for name, ok, rule in (("tile", isinstance(o.tile, int) and o.tile >= 16, "a whole number of pixels >= 16"),
                           ("batch_size", isinstance(o.batch_size, int) and o.batch_size >= 1, "at least 1"),
                           ("overlap", isinstance(o.overlap, (int, float)) and 0 <= o.overlap < 1, "in [0, 1)")):
        if not ok:
            raise UnetlabError(f"--{name.replace('_', '-')} must be {rule}, not {getattr(o, name)!r}")
    return o
