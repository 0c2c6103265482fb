"""The README and cover image of a BioImage.IO model package (see :mod:`unetlab.inference.bioimageio`)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._version import __version__
from ..runfolder import Run, read_json

_MEANING = {
    "binary": ": the probability that a pixel belongs to an object",
    "distance": ": the probability of foreground, and each object pixel's distance to the object's edge divided "
                "by the object's largest (0 outside, 1 at the centre); its peaks seed unetlab's watershed",
    "flow": ": the probability of foreground, and each object pixel's unit vector (dy, dx) towards its object's "
            "centre as (v + 1) / 2; unetlab follows these flows to group pixels into objects",
    "boundary": ": softmax probabilities of background, object interior and object boundary",
    "classes": ": softmax probabilities of the classes",
}


def cover_png(x: np.ndarray, y: np.ndarray) -> bytes:
    """A 2:1 cover: the (C, H, W) raw input (percentile-stretched) beside the (K, H', W') output probabilities."""
    from PIL import Image

    from ..data.io import to_rgb8

    left = to_rgb8(x)
    planes = np.clip(y[:3], 0, 1)
    planes = np.concatenate([planes, np.zeros_like(planes[:1])]) if len(planes) == 2 else planes
    right = np.round(np.moveaxis(np.repeat(planes, 3, 0) if len(planes) == 1 else planes, 0, -1) * 255)
    height = max(256, left.shape[0])
    pics = [Image.fromarray(a.astype(np.uint8)).resize((height * a.shape[1] // a.shape[0], height),
                                                       Image.Resampling.NEAREST) for a in (left, right)]
    canvas = Image.new("RGB", (pics[0].width + pics[1].width, height))
    canvas.paste(pics[0], (0, 0))
    canvas.paste(pics[1], (pics[0].width, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _training_lines(run: Run) -> list[str]:
    cfg, info, lines = run.config, run.info, []
    card = run.path / "card.json" if run.path else None
    if card is not None and card.is_file():
        c = read_json(card)
        lines.append(f"- Trained on: {c.get('trained_on', '?')}")
    elif cfg.data.root:
        # the folder's name only: the package is for sharing, the local path is nobody else's business
        lines.append(f"- Training data: folder `{Path(cfg.data.root).name}` (layout "
                     f"{info.get('layout') or cfg.data.layout or 'auto'})")
    split = run.path / "split.json" if run.path else None
    if split is not None and split.is_file():
        s = read_json(split)
        counts = ", ".join(f"{len(s[k])} {k}" for k in ("train", "val", "test") if isinstance(s.get(k), list))
        lines.append(f"- Split: {counts} images")
    t = cfg.train
    lines.append(f"- Target: {info.get('target')} (task {info.get('task')}); loss {t.loss}; {t.epochs} epochs, batch "
                 f"{t.batch_size}, patches of {cfg.data.patch_size} px, optimiser {t.optimizer}, lr {t.lr}")
    if info.get("classes"):
        lines.append(f"- Classes: {', '.join(map(str, info['classes']))}")
    if info.get("diameter") and cfg.data.size_normalize:
        lines.append(f"- Object size: trained size-normalised, every image drawn with its median object at "
                     f"{info['diameter']} px: rescale images so that their objects are about that wide before "
                     "running this package (unetlab's `--diameter auto` does so itself)")
    elif info.get("diameter"):
        lines.append(f"- Median object diameter in the training images: {info['diameter']} px")
    summary = run.path / "summary.json" if run.path else None
    if summary is not None and summary.is_file():
        s = read_json(summary)
        if isinstance(s.get("best_metric"), (int, float)):
            lines.append(f"- Best validation {s.get('monitor')}: {s['best_metric']:.4f} (epoch {s.get('best_epoch')})")
        if isinstance(s.get("test"), dict):
            scores = ", ".join(f"{k} {v:.3f}" for k, v in s["test"].items() if isinstance(v, float))
            lines.append(f"- Held-out test split: {scores}")
    return lines


def readme_text(run: Run, meta: dict, pre: list[dict], post: list[dict], geometry: tuple[int, int, int],
                sources: list[int], names: tuple[list[str], list[str]], notes: list[str],
                x_shape: Sequence[int], y_shape: Sequence[int], files: dict[str, str], ids: tuple[str, str]) -> str:
    """The package's README.md: what the model is, what it was trained on, how to use it, where it differs."""
    low, step, offset = geometry
    (names_in, names_out), (input_id, output_id) = names, ids
    m = run.config.model
    pre_text = ", then ".join(f"`{s['id']}` {s.get('kwargs', {})}" for s in pre) or "none (raw values)"
    size_text = f"{low} + n * {step} pixels per axis" + (f"; the output is {-offset} px smaller" if offset else
                                                         "; the output has the input's size")
    lines = [
        f"# {meta['name']}", "", meta["description"], "",
        "## Model", "",
        f"- Network: unetlab preset `{m.preset}`, depth {getattr(run.model, 'depth', m.depth)}, {m.padding} "
        f"padding, {m.norm} norm, {m.upsample} up-sampling; exported by unetlab {__version__}",
        f"- Input `{input_id}`: (batch, channel, y, x) float32, channels {', '.join(names_in)} "
        f"(channels {sources} of the training images), {size_text}",
        f"- Output `{output_id}`: (batch, channel, y, x) float32 in [0, 1], channels {', '.join(names_out)}"
        f"{_MEANING.get(run.info.get('target', 'binary'), '')}",
        f"- Weights: TorchScript (`{files['torchscript']}`) and ONNX (`{files['onnx']}`), the same network",
        "", "## Training", "", *_training_lines(run), "",
        "## Pre- and post-processing", "",
        f"- Preprocessing: {pre_text}: unetlab's `{run.config.data.normalization}` normalisation"
        f" (low {run.config.data.norm_low}, high {run.config.data.norm_high}), per image and channel, not clipped",
        f"- Postprocessing: `{post[0]['id']}` over the logits, as `unetlab predict` does",
        "- Masks and instance labels (threshold, watershed) are unetlab post-processing, not part of this package: "
        f"threshold {run.config.postprocess.threshold}, min size {run.config.postprocess.min_size} px",
        "", "### Differences between unetlab and this description", "",
        *([f"- {n}" for n in notes] or ["- none known"]),
        "- The test output was computed with the pipeline described here (spec preprocessing -> model -> "
        "postprocessing), so it is what a BioImage.IO consumer should reproduce.", "",
        "## Use with unetlab", "",
        "```", f"unetlab predict --model RUN_DIR --input IMAGES --out PREDICTIONS   # RUN_DIR: the run folder "
        f"`{run.path.name if run.path else '?'}`",
        "```", "",
        "unetlab tiles large images with overlapping, blended tiles (aligned to the network's pooling); a consumer "
        "that tiles should overlap tiles by the network's receptive field to avoid seams.", "",
        "## Use with bioimageio.core", "",
        "```python", "from bioimageio.core import load_description, predict",
        "model = load_description('this package (zip or rdf.yaml)')",
        f"sample = predict(model=model, inputs={{'{input_id}': raw_image_bcyx}})", "```", "",
        "## Validation", "",
        f"`{files['input']}` ({'x'.join(map(str, x_shape))}) and `{files['output']}` ({'x'.join(map(str, y_shape))}) "
        "are a test pair: `bioimageio test` reproduces the output from the input with either weight format. "
        "To validate quantitatively on unseen annotated images run `unetlab evaluate` on the predictions.", "",
        "## Citation", "", *[f"- {c.get('text', '')} {('doi:' + c['doi']) if c.get('doi') else c.get('url', '')}"
                             for c in meta["cite"]], "",
        f"License: {meta['license']}", "",
    ]
    return "\n".join(lines)
