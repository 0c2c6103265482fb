"""Broken inputs, one function per case: each builds a small dataset, a prediction folder and inputs under a
folder and says what every command should do with it.

A case folder holds ``data/`` (a paired dataset: ``images/*.tif`` uint16 + ``masks/*.png`` 0/255), ``pred/`` (a
prediction folder for ``evaluate``: a copy of the masks unless the case breaks it) and whatever else the case
needs. :func:`build_case` returns a :class:`Case` whose ``expect`` maps each command to the exit code and the
file name the one-line message must name (``None``: the command succeeds).

Run ``python tests/corpus/make_corpus.py OUT`` to write every case under ``OUT`` for a look by hand.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

SIZE = 48  # pixels; tiny so every command runs in well under a second
N_IMAGES = 4
COMMANDS = ("inspect", "train", "predict", "evaluate")


@dataclass
class Expect:
    """What one command does with a case: exit code and a fragment its one-line error must contain."""

    code: int = 0
    names: str | None = None  # file (or other) name the stderr line must contain; None for success
    skip_bad_code: int | None = None  # exit code with --skip-bad (train/predict), when it differs


@dataclass
class Case:
    """One broken input: its folder, the dataset, prediction folder and predict input, and expectations."""

    name: str
    root: Path
    data: Path
    pred: Path
    predict_input: Path
    expect: dict[str, Expect] = field(default_factory=dict)
    bad_file: str | None = None  # the one file at fault, for --skip-bad listings


def _cells(i: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic field: uint16 image and 0/255 uint8 mask (a few bright discs on a noisy background)."""
    rng = np.random.default_rng(100 + i)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for _ in range(4):
        cy, cx, r = rng.uniform(8, size - 8), rng.uniform(8, size - 8), rng.uniform(4, 8)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    image = 800 + 2500 * mask + rng.normal(0, 150, (size, size))
    return np.clip(image, 0, 65535).astype(np.uint16), mask.astype(np.uint8) * 255


def good_dataset(root: Path, n: int = N_IMAGES, size: int = SIZE) -> Path:
    """A clean paired dataset: ``root/images/cells_NNN.tif`` and ``root/masks/cells_NNN.png``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = _cells(i, size)
        tifffile.imwrite(root / "images" / f"cells_{i:03d}.tif", image)
        Image.fromarray(mask).save(root / "masks" / f"cells_{i:03d}.png")
    return root


def _base(root: Path) -> Case:
    data = good_dataset(root / "data")
    pred = root / "pred"
    shutil.copytree(data / "masks", pred)
    ok = {c: Expect() for c in COMMANDS}
    return Case(root.name, root, data, pred, data / "images", ok)


def _truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: max(1, int(len(raw) * keep))])


# --- the cases -----------------------------------------------------------------------------------------------


def truncated_image(root: Path) -> Case:
    """A TIFF image cut in half (an interrupted copy)."""
    c = _base(root)
    _truncate(c.data / "images" / "cells_001.tif")
    c.bad_file = "cells_001.tif"
    c.expect.update(inspect=Expect(2, c.bad_file), train=Expect(2, c.bad_file, 0),
                    predict=Expect(2, c.bad_file, 0))  # evaluate reads masks only: fine
    return c


def truncated_mask(root: Path) -> Case:
    """A PNG mask cut in half, in the dataset and in the prediction folder."""
    c = _base(root)
    _truncate(c.data / "masks" / "cells_002.png")
    _truncate(c.pred / "cells_002.png")
    c.bad_file = "cells_002.png"
    c.expect.update(inspect=Expect(2, c.bad_file), train=Expect(2, c.bad_file, 0), evaluate=Expect(2, c.bad_file))
    return c


def zero_byte_image(root: Path) -> Case:
    """An image file of 0 bytes."""
    c = _base(root)
    (c.data / "images" / "cells_000.tif").write_bytes(b"")
    c.bad_file = "cells_000.tif"
    c.expect.update(inspect=Expect(2, c.bad_file), train=Expect(2, c.bad_file, 0), predict=Expect(2, c.bad_file, 0))
    return c


def zero_byte_mask(root: Path) -> Case:
    """A mask of 0 bytes in the dataset, and a 0-byte prediction."""
    c = _base(root)
    (c.data / "masks" / "cells_003.png").write_bytes(b"")
    (c.pred / "cells_003.png").write_bytes(b"")
    c.bad_file = "cells_003.png"
    c.expect.update(inspect=Expect(2, c.bad_file), train=Expect(2, c.bad_file, 0), evaluate=Expect(2, c.bad_file))
    return c


def text_named_png(root: Path) -> Case:
    """A text file with an image extension (and a matching mask), so it pairs but cannot be decoded."""
    c = _base(root)
    (c.data / "images" / "notes.png").write_text("these are my notes, not an image\n")
    Image.fromarray(_cells(9)[1]).save(c.data / "masks" / "notes.png")
    c.bad_file = "notes.png"
    c.expect.update(inspect=Expect(2, c.bad_file), train=Expect(2, c.bad_file, 0), predict=Expect(2, c.bad_file, 0))
    return c


def stray_files(root: Path) -> Case:
    """Harmless non-image files everywhere: .DS_Store, Thumbs.db, a .txt, a .csv; all ignored."""
    c = _base(root)
    for folder in (c.data, c.data / "images", c.data / "masks", c.pred):
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
        (folder / "Thumbs.db").write_bytes(bytes(32))
    (c.data / "images" / "notes.txt").write_text("acquired 2024-01-01\n")
    (c.data / "masks" / "measurements.csv").write_text("name,area\ncells_000,120\n")
    (c.pred / "readme.txt").write_text("predictions\n")
    (c.data / "images" / "._cells_000.tif").write_bytes(b"\x00\x05\x16\x07" + bytes(60))  # macOS resource fork
    return c


def unpaired(root: Path) -> Case:
    """An image without a mask and a mask without an image."""
    c = _base(root)
    tifffile.imwrite(c.data / "images" / "lonely.tif", _cells(7)[0])
    Image.fromarray(_cells(8)[1]).save(c.data / "masks" / "stray.png")
    c.bad_file = "lonely.tif"
    c.expect.update(inspect=Expect(2, "lonely.tif"), train=Expect(2, "lonely.tif", 0))
    return c


def size_mismatch(root: Path) -> Case:
    """A mask (and a prediction) smaller than its image."""
    c = _base(root)
    small = _cells(1, SIZE - 8)[1]
    Image.fromarray(small).save(c.data / "masks" / "cells_001.png")
    shutil.copy(c.data / "masks" / "cells_000.png", c.pred / "cells_001.png")  # the pred keeps the image size
    c.bad_file = "cells_001.png"
    # evaluate: the mismatched pair is skipped and listed as a problem; the other images are scored
    c.expect.update(inspect=Expect(2, c.bad_file), train=Expect(2, c.bad_file, 0))
    return c


def all_sizes_mismatch(root: Path) -> Case:
    """Every prediction has another size than its ground truth: nothing can be compared."""
    c = _base(root)
    for p in sorted(c.pred.glob("*.png")):
        Image.fromarray(np.zeros((SIZE // 2, SIZE // 2), np.uint8)).save(p)
    c.expect.update(evaluate=Expect(2, "cells_000.png"))
    return c


def jpeg_mask(root: Path) -> Case:
    """A binary mask that went through JPEG: in-between values near 0 and 255 fit no mask mode."""
    c = _base(root)
    path = c.data / "masks" / "cells_002.png"
    mask = np.asarray(Image.open(path))
    import io

    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="JPEG", quality=70)
    dirty = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    assert len(np.unique(dirty)) > 4
    Image.fromarray(dirty).save(path)
    c.bad_file = "cells_002.png"
    c.expect.update(inspect=Expect(2, c.bad_file), train=Expect(2, c.bad_file, 0), evaluate=Expect(2, c.bad_file))
    return c


def one_empty_mask(root: Path) -> Case:
    """One mask with no foreground: a negative control, valid everywhere (train warns)."""
    c = _base(root)
    for folder in (c.data / "masks", c.pred):
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(folder / "cells_001.png")
    return c


def all_empty_masks(root: Path) -> Case:
    """Every mask empty: nothing to learn; inspect and train say so."""
    c = _base(root)
    for folder in (c.data / "masks", c.pred):
        for p in sorted(folder.glob("*.png")):
            Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(p)
    c.expect.update(inspect=Expect(2, "empty"), train=Expect(2, "empty"))
    return c


def nan_image(root: Path) -> Case:
    """A float32 TIFF with NaN and Inf pixels."""
    c = _base(root)
    img = _cells(3)[0].astype(np.float32)
    img[5:9, 5:9] = np.nan
    img[20, 20] = np.inf
    tifffile.imwrite(c.data / "images" / "cells_003.tif", img)
    c.bad_file = "cells_003.tif"
    c.expect.update(inspect=Expect(2, c.bad_file), train=Expect(2, c.bad_file, 0), predict=Expect(2, c.bad_file, 0))
    return c


def rgb_image(root: Path) -> Case:
    """One RGB image among grey ones: a 1-channel model cannot take it (and training cannot mix them)."""
    c = _base(root)
    grey = _cells(2)[0]
    rgb = np.stack([(grey >> 8).astype(np.uint8)] * 3, -1)
    (c.data / "images" / "cells_002.tif").unlink()
    Image.fromarray(rgb).save(c.data / "images" / "cells_002.png")
    c.bad_file = "cells_002.png"
    c.expect.update(inspect=Expect(2, c.bad_file), train=Expect(2, c.bad_file, 0), predict=Expect(2, c.bad_file, 0))
    return c


def empty_folder(root: Path) -> Case:
    """Empty folders everywhere."""
    data, pred = root / "data", root / "pred"
    data.mkdir(parents=True)
    pred.mkdir()
    expect = {c: Expect(2, "data") for c in COMMANDS}
    expect["evaluate"] = Expect(2, "data")  # the ground truth is read first
    return Case(root.name, root, data, pred, data, expect)


def missing_path(root: Path) -> Case:
    """Paths that do not exist."""
    root.mkdir(parents=True, exist_ok=True)
    data, pred = root / "no_such_data", root / "no_such_pred"
    expect = {c: Expect(2, "no_such_data") for c in COMMANDS}
    expect["evaluate"] = Expect(2, "no_such")
    return Case(root.name, root, data, pred, data, expect)


CASES: dict[str, Callable[[Path], Case]] = {
    f.__name__: f
    for f in (truncated_image, truncated_mask, zero_byte_image, zero_byte_mask, text_named_png, stray_files,
              unpaired, size_mismatch, all_sizes_mismatch, jpeg_mask, one_empty_mask, all_empty_masks,
              nan_image, rgb_image, empty_folder, missing_path)
}


def build_case(name: str, root: Path) -> Case:
    """Build case ``name`` under ``root / name``."""
    return CASES[name](Path(root) / name)


def every_bad_file(root: Path) -> tuple[Path, dict[str, str]]:
    """A dataset of 4 good pairs plus one pair broken in each way; returns it and {bad file name: side}.

    ``side`` is ``image`` when the image is at fault (predict sees it too) and ``mask`` or ``pair`` otherwise.
    """
    data = good_dataset(Path(root))
    images, masks = data / "images", data / "masks"
    img, mask = _cells(5)
    bad: dict[str, str] = {}

    def pair(name: str, image_ok: bool = True, mask_ok: bool = True) -> tuple[Path, Path]:
        tifffile.imwrite(images / f"{name}.tif", img)
        Image.fromarray(mask).save(masks / f"{name}.png")
        return images / f"{name}.tif", masks / f"{name}.png"

    i, _m = pair("trunc_image")
    _truncate(i)
    bad[i.name] = "image"
    i, _m = pair("empty_image")
    i.write_bytes(b"")
    bad[i.name] = "image"
    i, _m = pair("nan_image")
    tifffile.imwrite(i, np.full((SIZE, SIZE), np.nan, np.float32))
    bad[i.name] = "image"
    i, _m = pair("rgb_image")
    i.unlink()
    Image.fromarray(np.stack([(img >> 8).astype(np.uint8)] * 3, -1)).save(images / "rgb_image.png")
    bad["rgb_image.png"] = "image"
    (images / "notes.png").write_text("not an image\n")
    Image.fromarray(mask).save(masks / "notes.png")
    bad["notes.png"] = "image"
    _i, m = pair("trunc_mask")
    _truncate(m)
    bad[m.name] = "mask"
    _i, m = pair("empty_mask")
    m.write_bytes(b"")
    bad[m.name] = "mask"
    _i, m = pair("small_mask")
    Image.fromarray(mask[:-8, :-8]).save(m)
    bad[m.name] = "mask"
    _i, m = pair("jpeg_mask")
    import io

    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="JPEG", quality=70)
    Image.fromarray(np.asarray(Image.open(io.BytesIO(buf.getvalue())))).save(m)
    bad[m.name] = "mask"
    tifffile.imwrite(images / "lonely.tif", img)
    bad["lonely.tif"] = "pair"
    Image.fromarray(mask).save(masks / "stray.png")
    bad["stray.png"] = "pair"
    (data / ".DS_Store").write_bytes(bytes(16))
    (images / "notes.txt").write_text("harmless\n")
    return data, bad


# --- run folders ---------------------------------------------------------------------------------------------


TINY_TRAIN_FLAGS = ["--epochs", "1", "--patch-size", "32", "--preset", "unet", "--depth", "2", "--base-width", "8",
                    "--samples-per-epoch", "8", "--batch-size", "4", "--tensorboard", "false", "--val-fraction",
                    "0.25", "--no-progress"]


def tiny_run(root: Path) -> Path:
    """Train a tiny U-Net (a second or two) on a clean dataset; returns the run folder ``root/run``."""
    from unetlab.cli import main

    data = good_dataset(Path(root) / "train_data")
    run = Path(root) / "run"
    rc = main(["-q", "train", "--data", str(data), "--out", str(run), *TINY_TRAIN_FLAGS])
    assert rc == 0, "training the tiny model failed"
    return run


def truncated_checkpoint(run: Path, dest: Path) -> Path:
    """A copy of ``run`` whose best.pt and last.pt are cut in half."""
    shutil.copytree(run, dest)
    for p in (dest / "checkpoints").glob("*.pt"):
        _truncate(p)
    return dest


def foreign_checkpoint(run: Path, dest: Path, fmt: int = 99, version: str = "9.9.0") -> Path:
    """A copy of ``run`` whose checkpoints claim another format, written by unetlab ``version``."""
    import torch

    shutil.copytree(run, dest)
    for p in (dest / "checkpoints").glob("*.pt"):
        state = torch.load(p, map_location="cpu", weights_only=False)
        state.update(format=fmt, unetlab_version=version)
        torch.save(state, p)
    return dest


class CreatesFileWhenUnpickled:
    """A hostile object: unpickling it (``torch.load(weights_only=False)``) creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_checkpoint(run: Path, dest: Path, marker: Path) -> Path:
    """A copy of ``run`` whose checkpoints are pickles that would create ``marker`` if loaded unsafely."""
    import torch

    shutil.copytree(run, dest)
    for p in (dest / "checkpoints").glob("*.pt"):
        state = torch.load(p, map_location="cpu", weights_only=True)
        state["payload"] = CreatesFileWhenUnpickled(marker)
        torch.save(state, p)
    return dest


def other_architecture_checkpoint(run: Path, dest: Path) -> Path:
    """A copy of ``run`` whose checkpoints hold the weights of a wider, deeper U-Net than its config.yaml says."""
    import torch

    from unetlab.config import ModelConfig
    from unetlab.models import build_model

    shutil.copytree(run, dest)
    other = build_model(ModelConfig(preset="unet", depth=3, base_width=16, in_channels=1, out_channels=1))
    for p in (dest / "checkpoints").glob("*.pt"):
        state = torch.load(p, map_location="cpu", weights_only=True)
        state["model"] = other.state_dict()
        torch.save(state, p)
    return dest


def wrong_model_json(run: Path, dest: Path) -> Path:
    """A copy of ``run`` whose model.json gives a channel count as text and an unknown target."""
    import json

    shutil.copytree(run, dest)
    info = json.loads((dest / "model.json").read_text())
    info.update(in_channels="three", target="nonsense")
    (dest / "model.json").write_text(json.dumps(info))
    return dest


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every file under ``folder`` (to prove nothing was written)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()} | {
        str(p.relative_to(folder)) + "/": (0, 0) for p in folder.rglob("*") if p.is_dir()}


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus_out")
    for n in CASES:
        case = build_case(n, out)
        print(f"{n:20s} {case.root}")
