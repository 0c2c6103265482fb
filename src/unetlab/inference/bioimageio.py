"""Export a run folder as a BioImage.IO model package (model description format 0.5): ``unetlab export --format
bioimageio``.

The package (a folder, or a ``.zip`` of the same files) holds ``rdf.yaml``, TorchScript and ONNX weights, a test
input and the test output the described pipeline gives for it, a README and a cover image. Files are only
written here, never executed: TorchScript and ONNX are graphs, not pickles, and no Python code is packaged.

Preprocessing is described with the spec's own operators, chosen to match :func:`unetlab.data.io.normalize`:
``percentile``/``minmax`` is ``scale_range`` per sample and per channel over ``y, x`` (linear percentiles, as
numpy's), no ``clip`` (unetlab keeps values outside [0, 1]). Where the two differ (see :data:`MISMATCHES`) the
package's test tensors follow the spec's pipeline, and the README says so.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from .._version import __version__
from ..config import DataConfig
from ..data.channels import parse_channel_code
from ..errors import UnetlabError
from ..files import atomic_output, write_atomic, write_bytes, write_error, write_text
from ..models import count_parameters, model_geometry
from ..runfolder import PRETRAINED_DIR, Run, load_run, resolve_run_dir
from .bioimageio_readme import cover_png, readme_text
from .export import export_model

log = logging.getLogger(__name__)

RDF_NAME = "rdf.yaml"  # the name bioimageio.spec looks for first (bioimageio.yaml is an alternative)
FILES = {"torchscript": "weights_torchscript.pt", "onnx": "weights.onnx", "input": "test_input.npy",
         "output": "test_output.npy", "sample_input": "sample_input.tif", "sample_output": "sample_output.tif",
         "readme": "README.md", "cover": "cover.png"}
INPUT_ID, OUTPUT_ID = "image", "probabilities"
EPS = 1e-6  # unetlab's normalize_percentile eps, used for scale_range too
DEFAULT_LICENSE = "CC-BY-4.0"
DEFAULT_AUTHORS = ("unetlab user",)
UNET_CITATION = {"text": "Ronneberger, Fischer and Brox. U-Net: Convolutional Networks for Biomedical Image "
                         "Segmentation. MICCAI 2015.", "doi": "10.1007/978-3-319-24574-4_28"}
# Where unetlab's normalisation and the spec's scale_range differ (also written into every package README).
MISMATCHES = (
    "unetlab divides by max(p_high - p_low, 1e-6); the spec's scale_range by (p_high - p_low + 1e-6). The two "
    "differ by a relative 1e-6 / (p_high - p_low): nothing for real intensity ranges, visible only for "
    "(nearly) constant images.",
    "unetlab computes the percentiles of images over 1 megapixel on every 4th row and column; scale_range uses "
    "every pixel, so on such images the percentiles (and the outputs) can differ slightly.",
)
_DTYPE_NOTE = ("unetlab's 'dtype' normalisation divides each image by 65535 if its maximum is above 255, else by "
               "255; the spec has no data-dependent gain, so this package divides every image by {gain}.")


def export_bioimageio(run_dir: str | Path, out: str | Path | None = None, *, overwrite: bool = False,
                      name: str | None = None, description: str | None = None,
                      authors: Sequence[str | dict] | None = None, license: str = DEFAULT_LICENSE,
                      cite: Sequence[dict] | None = None, tags: Sequence[str] = (),
                      sample: np.ndarray | str | Path | None = None, test_size: int = 128,
                      opset: int = 17, git_repo: str | None = None) -> Path:
    """Write the run's model as a BioImage.IO package to the folder ``out``, or a zip if it ends in ``.zip``.

    ``out`` defaults to ``RUN_DIR/bioimageio.zip``. ``sample`` (a raw (C, H, W) image or an image file) becomes
    the test input, cropped to at most 256 px; without it a synthetic fluorescence image of ``test_size`` px.
    """
    spec = _bioimageio_spec()
    run_dir = resolve_run_dir(run_dir)
    out = Path(out) if out is not None else _default_out(run_dir)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise UnetlabError("output exists", out, hint="pass --overwrite to replace it")
    if out.suffix.lower() == ".zip" and out.is_dir() and not out.is_symlink():
        raise UnetlabError("is a folder, not a zip file", out, hint="remove it or choose another --out")
    run = load_run(run_dir)
    model = run.model.cpu().float().eval()
    cfg = run.config.data
    sources = _source_channels(cfg, int(run.info["image_channels"]), int(run.info["in_channels"]))
    geometry = axis_geometry(model)
    x = _test_input(sample, run, sources, geometry, test_size)
    pre, notes = preprocessing_steps(cfg, x)
    post = postprocessing_steps(run.activation)
    y = run_described_pipeline(model, x, pre, post)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))  # beside out: renames
    except OSError as exc:
        raise _one_line(exc, out) from exc
    try:
        os.chmod(stage, 0o755)
        export_model(model, "torchscript", stage / FILES["torchscript"], x.shape[1])
        export_model(model, "onnx", stage / FILES["onnx"], x.shape[1], opset=opset)
        write_bytes(stage / FILES["input"], _npy(x))
        write_bytes(stage / FILES["output"], _npy(y))
        write_bytes(stage / FILES["cover"], cover_png(x[0], y[0]))
        write_atomic(stage / FILES["sample_input"], lambda p: _tiff(p, x[0]))  # the same pair, for viewers
        write_atomic(stage / FILES["sample_output"], lambda p: _tiff(p, y[0]))
        meta = {"name": name or _default_name(run_dir, run), "description": description or _default_description(run),
                "authors": [a if isinstance(a, dict) else {"name": str(a)} for a in (authors or DEFAULT_AUTHORS)],
                "license": license, "cite": list(cite) if cite else [UNET_CITATION], "tags": _tags(run, tags)}
        if git_repo:
            meta["git_repo"] = git_repo
        names = _channel_names(run, sources)
        write_text(stage / FILES["readme"], readme_text(run, meta, pre, post, geometry, sources, names, notes, x.shape,
                                                        y.shape, FILES, (INPUT_ID, OUTPUT_ID)))
        rdf = build_rdf(run, meta, pre, post, geometry, sources, stage, spec)
        write_text(stage / RDF_NAME, yaml.safe_dump(rdf, sort_keys=False, allow_unicode=True))
        _validate(stage, spec)
        _publish(stage, out, overwrite)
    except OSError as exc:
        raise _one_line(exc, out) from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("wrote BioImage.IO model package %s", out)
    return out


def _one_line(exc: OSError, out: Path) -> Exception:
    """A full disk or a folder without permission is one user error line; other OS errors stay as they are."""
    return write_error(exc, out) or exc


def _bioimageio_spec() -> Any:
    try:
        import bioimageio.spec as spec
    except ImportError:
        raise UnetlabError("BioImage.IO export needs the bioimageio.spec package",
                           hint="pip install 'unetlab[bioimageio]'") from None
    return spec


def _default_out(run_dir: Path) -> Path:
    # A pretrained model's folder is part of the installed package: write into the working folder instead.
    if run_dir.resolve().parent == PRETRAINED_DIR.resolve():
        return Path(f"{run_dir.name}.bioimageio.zip")
    return run_dir / "bioimageio.zip"


# --- what the package describes ---------------------------------------------------------------------------------


def axis_geometry(model: nn.Module) -> tuple[int, int, int]:
    """``(min, step, offset)`` per spatial axis: the model takes ``min + n * step`` pixels and returns that many
    plus ``offset`` (0 for same padding; negative for valid padding, whose output is already cropped)."""
    g = model_geometry(model)
    step = g.size_multiple
    if g.padding == "same":
        return step, step, 0  # the network pads to a multiple of step itself; unetlab's tiles are multiples too
    low = g.min_input
    offset = int(g.output_size(low)) - low
    for n in range(low, low + 4 * step, step):
        if int(g.valid_input_size(n)) != n or int(g.output_size(n)) - n != offset:
            raise UnetlabError(f"the valid-padding network's sizes are not min + n * {step} with a fixed output "
                               "offset, which BioImage.IO cannot describe", hint="export a same-padding model")
    return low, step, offset


def _source_channels(cfg: DataConfig, image_channels: int, in_channels: int) -> list[int]:
    """Which channels of the training images, in order, are the model's input channels."""
    idx = list(range(image_channels))
    if cfg.channels:
        idx = [idx[c] for c in cfg.channels]
    if cfg.channel_code:
        terms = parse_channel_code(cfg.channel_code)
        merged = [t for t in terms if len(t.inputs) != 1]
        if merged:
            raise UnetlabError(f"channel code {cfg.channel_code!r} merges channels after normalisation "
                               f"({merged[0].op}), which BioImage.IO preprocessing cannot describe",
                               hint="export a model trained on plain channel selections")
        idx = [idx[t.inputs[0][0]] for t in terms]  # dropout is off at inference: each term takes one channel
    if len(idx) != in_channels:
        raise UnetlabError(f"the run's channel settings give {len(idx)} channels, the model takes {in_channels}")
    return idx


def preprocessing_steps(cfg: DataConfig, x: np.ndarray) -> tuple[list[dict], list[str]]:
    """The spec's preprocessing matching the run's normalisation, and notes on where the two differ."""
    mode = cfg.normalization
    if mode in ("percentile", "minmax"):
        low, high = (float(cfg.norm_low), float(cfg.norm_high)) if mode == "percentile" else (0.0, 100.0)
        if not (0.0 <= low < high <= 100.0 and high > 1.0):
            raise UnetlabError(f"percentiles {low}/{high} cannot be described by BioImage.IO's scale_range "
                               "(needs 0 <= low < high <= 100 and high > 1)")
        kwargs = {"axes": ["y", "x"], "min_percentile": low, "max_percentile": high, "eps": EPS}
        return [{"id": "scale_range", "kwargs": kwargs}], list(MISMATCHES)
    if mode == "dtype":
        gain = 1.0 / (65535.0 if float(x.max()) > 255 else 255.0)
        return [{"id": "scale_linear", "kwargs": {"gain": gain, "offset": 0.0}}], [_DTYPE_NOTE.format(gain=gain)]
    if mode == "none":
        return [], []
    raise UnetlabError(f"unknown normalisation '{mode}'")


def postprocessing_steps(activation: str) -> list[dict]:
    """Sigmoid or softmax over channels, as unetlab's predictor applies to the logits."""
    if activation == "sigmoid":
        return [{"id": "sigmoid"}]
    return [{"id": "softmax", "kwargs": {"axis": "channel"}}]


def apply_preprocessing(x: np.ndarray, steps: list[dict]) -> np.ndarray:
    """The described preprocessing, as the spec defines it, on a (B, C, H, W) float32 array."""
    x = np.asarray(x, np.float32)
    for step in steps:
        kw = step.get("kwargs", {})
        if step["id"] == "scale_range":  # per sample and channel; out = (x - lo) / (hi - lo + eps)
            lo = np.percentile(x, kw["min_percentile"], axis=(2, 3), keepdims=True, method="linear")
            hi = np.percentile(x, kw["max_percentile"], axis=(2, 3), keepdims=True, method="linear")
            x = (x - lo) / (hi - lo + kw["eps"])
        elif step["id"] == "scale_linear":
            x = x * kw["gain"] + kw["offset"]
        else:
            raise ValueError(f"unknown preprocessing {step['id']!r}")
    return x.astype(np.float32)


def run_described_pipeline(model: nn.Module, x: np.ndarray, pre: list[dict], post: list[dict]) -> np.ndarray:
    """Preprocessing as described -> model -> postprocessing as described: the package's test output."""
    with torch.no_grad():
        logits = model(torch.from_numpy(apply_preprocessing(x, pre))).float()
    for step in post:
        logits = torch.sigmoid(logits) if step["id"] == "sigmoid" else torch.softmax(logits, dim=1)
    return logits.numpy().astype(np.float32)


def _test_input(sample: np.ndarray | str | Path | None, run: Run, sources: list[int],
                geometry: tuple[int, int, int], test_size: int) -> np.ndarray:
    """A raw (1, C, H, W) float32 test input of a size the model takes: the sample's centre, or synthetic."""
    low, step, _ = geometry

    def fit(n: int, up: bool) -> int:
        k = max(0, -(-(n - low) // step) if up else (n - low) // step)
        return low + k * step

    if sample is None:
        from ..data.synthetic import make_synthetic_cells

        size = fit(max(int(test_size), low), up=True)
        planes = [make_synthetic_cells((size, size), seed=i)[0] for i in range(len(sources))]
        return np.stack(planes)[None].astype(np.float32)
    if isinstance(sample, (str, Path)):
        from ..data.io import read_image

        source, img = Path(sample), read_image(sample)
    else:
        source, img = None, np.asarray(sample, np.float32)
    img = img[None] if img.ndim == 2 else img
    if img.ndim != 3:
        raise UnetlabError(f"the sample must be a (C, H, W) image, not shape {img.shape}", source)
    if img.shape[0] == int(run.info["image_channels"]):
        img = img[sources]
    elif img.shape[0] != len(sources):
        raise UnetlabError(f"the sample has {img.shape[0]} channel(s); the model was trained on images with "
                           f"{run.info['image_channels']}", source)
    if min(img.shape[1:]) < low:
        raise UnetlabError(f"the sample is {img.shape[1]}x{img.shape[2]} px; the model needs at least {low}", source)
    h, w = (fit(min(n, max(256, low)), up=False) for n in img.shape[1:])
    y0, x0 = (img.shape[1] - h) // 2, (img.shape[2] - w) // 2
    return np.ascontiguousarray(img[None, :, y0:y0 + h, x0:x0 + w], dtype=np.float32)


def _channel_names(run: Run, sources: list[int]) -> tuple[list[str], list[str]]:
    names_in = [f"channel{c}" for c in sources]
    target, k = run.info.get("target", "binary"), run.out_channels
    names_out = {"binary": ["foreground"], "distance": ["foreground", "distance"],
                 "flow": ["foreground", "flow_y", "flow_x"], "boundary": ["background", "interior", "boundary"]}.get(target)
    if target == "classes" or names_out is None or len(names_out) != k:
        classes = [str(c) for c in run.info.get("classes", [])]
        names_out = classes if len(classes) == k and len(set(classes)) == k else [f"class{i}" for i in range(k)]
    return names_in, names_out


def _default_name(run_dir: Path, run: Run) -> str:
    text = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", f"unetlab {run_dir.name} {run.info.get('target', 'binary')}")
    return (text if len(text) >= 5 else f"{text} model")[:64]


_TARGETS = {"binary": "a foreground probability", "distance": "foreground and normalised distance-to-boundary "
            "probabilities (for splitting touching objects)", "flow": "a foreground probability and flows towards "
            "object centres (for splitting touching objects)", "boundary": "background / interior / boundary "
            "class probabilities", "classes": "per-class probabilities"}


def _default_description(run: Run) -> str:
    m = run.config.model
    return (f"2-D U-Net ({m.preset}, depth {getattr(run.model, 'depth', m.depth)}, {m.padding} padding) trained "
            f"with unetlab; predicts {_TARGETS.get(run.info.get('target', 'binary'), 'probabilities')} per pixel "
            f"of {run.info['image_channels']}-channel microscopy images.")[:512]


def _tags(run: Run, extra: Sequence[str]) -> list[str]:
    target = run.info.get("target", "binary")
    task = "instance-segmentation" if target in ("boundary", "distance", "flow") else "semantic-segmentation"
    tags = ["unetlab", "unet", "pytorch", "2d", "segmentation", task, *extra]
    return list(dict.fromkeys(str(t) for t in tags))


def build_rdf(run: Run, meta: dict, pre: list[dict], post: list[dict], geometry: tuple[int, int, int],
              sources: list[int], stage: Path, spec: Any) -> dict:
    """The ``rdf.yaml`` content for the files in ``stage`` (their sha256 included)."""
    low, step, offset = geometry
    names_in, names_out = _channel_names(run, sources)
    space_in = [{"type": "space", "id": a, "size": {"min": low, "step": step}} for a in ("y", "x")]
    space_out = [{"type": "space", "id": a, "size": {"tensor_id": INPUT_ID, "axis_id": a, "offset": offset}}
                 for a in ("y", "x")]
    import onnx

    opset = max(o.version for o in onnx.load(str(stage / FILES["onnx"])).opset_import if o.domain in ("", "ai.onnx"))
    comment = f"exported by unetlab {__version__} from the run's checkpoint (best.pt, else last.pt)"
    return {
        "format_version": spec.model.v0_5.ModelDescr.implemented_format_version,
        "type": "model",
        **{k: meta[k] for k in ("name", "description", "authors", "cite", "license")},
        **({"git_repo": meta["git_repo"]} if "git_repo" in meta else {}),
        "tags": meta["tags"],
        "documentation": _file(stage, FILES["readme"]),
        "covers": [_file(stage, FILES["cover"])],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "inputs": [{
            "id": INPUT_ID, "description": "raw image, channels as the model was trained on (not normalised)",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": names_in}, *space_in],
            "test_tensor": _file(stage, FILES["input"]), "sample_tensor": _file(stage, FILES["sample_input"]),
            "data": {"type": "float32"}, "preprocessing": pre}],
        "outputs": [{
            "id": OUTPUT_ID, "description": f"{run.activation} of the network's logits",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": names_out}, *space_out],
            "test_tensor": _file(stage, FILES["output"]), "sample_tensor": _file(stage, FILES["sample_output"]),
            "data": {"type": "float32", "range": [0.0, 1.0]},
            "postprocessing": post}],
        "weights": {
            "torchscript": {**_file(stage, FILES["torchscript"]), "comment": comment,
                            "pytorch_version": torch.__version__.split("+")[0]},
            "onnx": {**_file(stage, FILES["onnx"]), "parent": "torchscript", "opset_version": int(opset),
                     "comment": "converted from the same PyTorch model; checked to agree within 1e-4"}},
        "config": {
            "bioimageio": {"architecture_type": "unet", "model_parameter_count": count_parameters(run.model)},
            "unetlab": {"version": __version__, "run": run.path.name if run.path else None,
                        "task": run.info.get("task"), "target": run.info.get("target"),
                        "classes": list(run.info.get("classes", [])), "diameter": run.info.get("diameter"),
                        "image_channels": run.info.get("image_channels"), "input_channels_of_images": sources,
                        "activation": run.activation, "data": _plain_data_config(run.config.data),
                        "model": vars(run.config.model).copy(),
                        "postprocess": vars(run.config.postprocess).copy()}},
    }


def _plain_data_config(cfg: DataConfig) -> dict:
    keys = ("normalization", "norm_low", "norm_high", "channels", "channel_code", "target", "patch_size", "layout")
    return {k: getattr(cfg, k) for k in keys}


def _file(stage: Path, name: str) -> dict:
    return {"source": name, "sha256": hashlib.sha256((stage / name).read_bytes()).hexdigest()}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _tiff(path: Path, array: np.ndarray) -> None:
    import tifffile

    tifffile.imwrite(path, array, photometric="minisblack", compression="zlib")


def _validate(stage: Path, spec: Any) -> None:
    """Check the written rdf.yaml with bioimageio.spec before anything is published. Offline: with
    ``perform_io_checks=False`` no URL is looked up (the files' sha256 were just computed from them)."""
    ctx = spec.ValidationContext(root=stage, file_name=RDF_NAME, perform_io_checks=False)
    descr = spec.build_description(yaml.safe_load((stage / RDF_NAME).read_text()), context=ctx)
    summary = descr.validation_summary
    if summary.status == "failed":
        errors = [f"{'.'.join(map(str, e.loc))}: {e.msg}" for d in summary.details for e in d.errors]
        raise UnetlabError(f"bioimageio.spec rejects the description: {'; '.join(errors)[:400]}")


def _publish(stage: Path, out: Path, overwrite: bool) -> None:
    """Move the finished package onto ``out``: the folder renamed, or zipped through a temporary file."""
    if out.suffix.lower() == ".zip":
        with atomic_output(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(stage.iterdir()):
                zf.write(f, f.name)
        return
    old = None
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UnetlabError("output exists", out, hint="pass --overwrite to replace it")
        old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
