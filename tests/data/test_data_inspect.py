"""inspect_dataset on good and broken folders: one broken fixture per kind of problem, and the CLI."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
from PIL import Image

from unetlab.cli import main
from unetlab.data.inspect import format_report, inspect_dataset
from unetlab.labels import suspicious_mask_values

H, W = 16, 20


def _png(path: Path, arr, quality: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(arr, dtype=np.uint8))
    if quality is None:
        im.save(path)
    else:
        im.save(path, quality=quality)
    return path


def _good(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        _png(root / "images" / f"im{i}.png", rng.integers(0, 255, (H, W)))
        m = np.zeros((H, W), np.uint8)
        m[2:6, 2:6] = 255
        m[9:14, 10 + i:16 + i] = 255
        _png(root / "masks" / f"im{i}.png", m)
    return root


def _kinds(report) -> list[str]:
    return [p["kind"] for p in report["problems"]]


def test_clean_dataset_counts(tmp_path):
    d = inspect_dataset(_good(tmp_path / "ok"), progress=False)
    assert d["layout"] == "paired" and d["problems"] == [] and d["fix"] is None
    assert d["n_images"] == 3 and d["n_pairs"] == 3 and d["n_groups"] == 3
    assert d["n_objects"] == 6 and d["image_sizes"] == {f"{H}x{W}": 3}
    assert d["dtypes"] == {"uint8": 3} and d["channels"] == {"1": 3}
    assert abs(d["foreground"]["mean"] - (16 + 30) / (H * W)) < 1e-9
    text = format_report(d)
    assert text.splitlines()[0].startswith("dataset") and "problems     none" in text


def test_unpaired_files(tmp_path):
    root = _good(tmp_path / "ds")
    _png(root / "images" / "lonely.png", np.zeros((H, W)))
    _png(root / "masks" / "stray.png", np.zeros((H, W)))
    d = inspect_dataset(root, progress=False)
    assert _kinds(d) == ["unpaired", "unpaired"] and d["n_images"] == 4
    assert d["fix"].startswith("2 problems (most common: unpaired, 2)")
    assert format_report(d).splitlines()[0] == d["fix"]


def test_shape_mismatch(tmp_path):
    root = _good(tmp_path / "ds")
    _png(root / "masks" / "im1.png", np.zeros((H + 2, W)))
    d = inspect_dataset(root, progress=False)
    assert _kinds(d) == ["shape"] and "im1.png" in d["problems"][0]["message"]
    assert f"{H + 2}x{W}" in d["problems"][0]["message"]


def test_unreadable_and_empty_files(tmp_path):
    root = _good(tmp_path / "ds")
    (root / "images" / "im0.png").write_bytes(b"")
    (root / "masks" / "im2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    d = inspect_dataset(root, progress=False)
    assert _kinds(d) == ["unreadable", "unreadable"]
    assert "0 bytes" in d["problems"][0]["message"] and "im2.png" in d["problems"][1]["message"]


def test_empty_mask_is_a_negative_control_not_a_problem(tmp_path):
    root = _good(tmp_path / "ds")
    _png(root / "masks" / "im1.png", np.zeros((H, W)))
    d = inspect_dataset(root, progress=False)
    assert d["problems"] == [] and d["negative_controls"] == ["im1"]
    assert "negative controls" in format_report(d)


def test_jpeg_artefacts_in_binary_mask(tmp_path):
    root = _good(tmp_path / "ds")
    m = np.zeros((64, 64), np.uint8)
    m[10:40, 12:50] = 255
    _png(root / "images" / "big.png", np.zeros((64, 64)))
    (root / "masks" / "big.jpg").parent.mkdir(exist_ok=True)
    Image.fromarray(m).save(root / "masks" / "big.jpg", quality=60)
    d = inspect_dataset(root, progress=False)
    assert "mask_values" in _kinds(d)
    # the same damage in a PNG (a JPEG decoded and re-saved) is caught from the values alone
    dirty = np.asarray(Image.open(root / "masks" / "big.jpg"))
    (root / "masks" / "big.jpg").unlink()
    _png(root / "masks" / "big.png", dirty)
    d = inspect_dataset(root, progress=False)
    assert _kinds(d) == ["mask_values"] and "JPEG" in d["problems"][0]["message"]


def test_instance_labels_are_not_mistaken_for_artefacts():
    values = np.arange(0, 250)
    counts = np.r_[10000, np.full(249, 40)]
    assert suspicious_mask_values(values, counts) is None
    assert suspicious_mask_values(np.array([0, 3, 250, 255]), np.array([900, 5, 7, 300])) is not None
    # 16-bit instance ids with gaps, one near the top of the range: no lossy format stores such values
    assert suspicious_mask_values(np.array([0, 7, 300, 65000]), np.array([900, 30, 40, 300])) is None


def test_kaggle_overlaps_and_objects(tmp_path):
    root = tmp_path / "k"
    for key, boxes in {"a": [(0, 5), (3, 8)], "b": [(8, 12)]}.items():
        _png(root / key / "images" / f"{key}.png", np.zeros((H, W)))
        (root / key / "masks").mkdir()
        for j, (y0, y1) in enumerate(boxes):
            m = np.zeros((H, W), np.uint8)
            m[y0:y1, 0:4] = 255
            _png(root / key / "masks" / f"{j}.png", m)
    d = inspect_dataset(root, progress=False)
    assert d["layout"] == "kaggle_dsb" and d["n_objects"] == 3
    assert d["overlap_pixels"] == 2 * 4 and d["overlap_images"] == 1
    assert d["overlap_names"] == ["a"] and "belong to two masks (resolved deterministically, see notes): a" in (
        format_report(d))


def test_cli_exit_codes_and_json(tmp_path):
    root = _good(tmp_path / "ds")
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["inspect", str(root), "--json"]) == 0
    assert json.loads(out.getvalue())["n_pairs"] == 3
    _png(root / "images" / "lonely.png", np.zeros((H, W)))
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["inspect", str(root)]) == 2
    first = out.getvalue().splitlines()[0]
    assert "unpaired" in first and "Fix:" in first
    assert main(["inspect", str(tmp_path / "missing")]) == 2


def test_empty_image_and_mask_folders_are_one_problem_and_exit_2(tmp_path, capsys):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    d = inspect_dataset(root, progress=False)
    assert _kinds(d) == ["no_pairs"] and d["n_pairs"] == 0
    text = format_report(d)
    assert "no_pairs" in text.splitlines()[0] and "Fix:" in text.splitlines()[0]
    assert "no image with a mask found" in text and "problems     1" in text
    assert "sizes" not in text and "dtypes" not in text  # nothing read: no empty fields
    assert main(["inspect", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no image with a mask found" in err[0]


def test_only_unpaired_images_also_say_nothing_pairs(tmp_path):
    root = tmp_path / "ds"
    _png(root / "images" / "a.png", np.zeros((H, W)))
    (root / "masks").mkdir()
    d = inspect_dataset(root, progress=False)
    assert sorted(_kinds(d)) == ["no_pairs", "unpaired"] and d["n_images"] == 1


def test_problem_kinds_come_from_the_error_not_its_wording():
    """Errors are classified by the kind set where they are raised: rewording a message changes nothing."""
    from unetlab.data.inspect import _kind
    from unetlab.errors import ErrorKind, UnetlabError

    assert _kind(UnetlabError("sizes disagree (reworded)", "m.png", kind=ErrorKind.SHAPE)) == "shape"
    assert _kind(UnetlabError("odd numbers in the mask", "m.png", kind=ErrorKind.MASK_VALUES)) == "mask_values"
    # the words the old classifier looked for do not make a kind
    assert _kind(UnetlabError("mask is 3x3, others are fractional", "m.png")) == "unreadable"


def test_a_fractional_tiff_mask_is_a_mask_values_problem(tmp_path):
    import tifffile

    root = _good(tmp_path / "ds", n=2)
    (root / "masks" / "im1.png").unlink()
    m = np.zeros((H, W), np.float32)
    m[2:6, 2:6] = 1.5
    tifffile.imwrite(root / "masks" / "im1.tif", m)
    assert _kinds(inspect_dataset(root, progress=False)) == ["mask_values"]


def test_problem_lines_keep_their_kind_through_pickling():
    import pickle

    from unetlab.data.layouts.common import image_without_mask
    from unetlab.errors import ErrorKind

    p = pickle.loads(pickle.dumps(image_without_mask(Path("a.png"), "masks")))
    assert p.kind is ErrorKind.UNPAIRED and p.image == Path("a.png") and p.startswith("a.png: image without")
