"""patchify and cut_subimages: coverage (the last patch at the border), dtype kept, groups kept, safe output
folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from unetlab.cli import main
from unetlab.config import DataConfig
from unetlab.data.layouts import load_dataset
from unetlab.data.patches import cut_subimages, patch_positions, patchify
from unetlab.data.split import split_samples
from unetlab.errors import UnetlabError


def _dataset(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    data = {}
    for name, (h, w) in {"a": (37, 50), "b": (20, 23)}.items():
        img = rng.integers(0, 4000, (h, w), dtype=np.uint16)
        lab = np.zeros((h, w), np.uint16)
        lab[2:9, 3:11], lab[12:18, 14:21] = 1, 2
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(root / "images" / f"{name}.tif", img)
        tifffile.imwrite(root / "masks" / f"{name}.tif", lab)
        data[name] = (img, lab)
    return data


@pytest.mark.parametrize("length,size,stride", [(50, 16, 5), (16, 16, 4), (10, 16, 4), (37, 16, 16)])
def test_positions_cover_every_pixel(length, size, stride):
    pos = patch_positions(length, size, stride)
    assert pos[0] == 0 and pos[-1] + size == max(length, size)  # the last patch ends at the border
    assert all(b - a == stride for a, b in zip(pos[:-1], pos[1:-1]))
    assert all(0 < b - a <= stride for a, b in zip(pos, pos[1:]))
    assert len(pos) == 1 or pos[-2] + size < length  # no needless extra patch


def test_patchify_roundtrip_dtype_groups_and_split(tmp_path):
    src, out = tmp_path / "src", tmp_path / "patches"
    data = _dataset(src)
    n = patchify(src, 16, 12, out)
    expected = sum(len(patch_positions(h, 16, 12)) * len(patch_positions(w, 16, 12))
                   for h, w in [v[0].shape for v in data.values()])
    assert n == expected
    info = load_dataset(out)
    assert info.layout == "paired" and len(info.samples) == n and not info.problems
    assert set(info.groups) == {"a", "b"}  # groups.csv keeps patches of one image together
    train, val = split_samples(info, DataConfig(val_fraction=0.5))
    assert {s.group for s in train}.isdisjoint({s.group for s in val})
    # reassemble image "a" from its patches: every pixel is covered and equal to the source
    img, lab = data["a"]
    canvas = np.full(img.shape, -1, np.int64)
    for p in sorted((out / "images").glob("a_y*.tif")):
        y, x = int(p.stem.split("_y")[1][:5]), int(p.stem.split("_x")[1])
        patch = tifffile.imread(p)
        assert patch.dtype == np.uint16 and patch.shape == (16, 16)
        np.testing.assert_array_equal(patch, img[y:y + 16, x:x + 16])  # real pixels only: nothing mirrored
        canvas[y:y + 16, x:x + 16] = patch
        np.testing.assert_array_equal(tifffile.imread(out / "masks" / p.name), lab[y:y + 16, x:x + 16])
    np.testing.assert_array_equal(canvas, img)
    assert (out / "images" / "a_y00021_x00034.tif").is_file()  # the last patch ends at the 37x50 image's border


def test_patchify_is_reproducible_and_guards_folders(tmp_path):
    src, out = tmp_path / "src", tmp_path / "p"
    _dataset(src)
    patchify(src, 8, 8, out)
    first = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    with pytest.raises(UnetlabError, match="not empty"):
        patchify(src, 8, 8, out)
    patchify(src, 8, 8, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in (out / "images").iterdir()} == first
    patchify(src, 16, 16, out, overwrite=True)  # our own old patches are replaced, not mixed in
    assert len(list((out / "images").iterdir())) == len(load_dataset(out).samples)
    with pytest.raises(UnetlabError, match="overlaps the input"):
        patchify(src, 8, 8, src / "patches")
    with pytest.raises(UnetlabError, match="overlaps the input"):
        patchify(src, 8, 8, src)


def test_subimages_one_per_object_with_margin(tmp_path):
    src, out = tmp_path / "src", tmp_path / "objs"
    _dataset(src)
    n = cut_subimages(src, 2, out)
    assert n == 4
    m = tifffile.imread(out / "masks" / "a_obj00001.tif")
    assert m.shape == (7 + 4, 8 + 4) and set(np.unique(m)) == {0, 255}
    assert int((m > 0).sum()) == 56
    im = tifffile.imread(out / "images" / "a_obj00001.tif")
    assert im.shape == m.shape and im.dtype == np.uint16
    assert set(load_dataset(out).groups) == {"a", "b"}


def test_subimages_says_which_images_had_no_object(tmp_path, caplog):
    src = tmp_path / "src"
    _dataset(src)
    tifffile.imwrite(src / "masks" / "b.tif", np.zeros((20, 23), np.uint16))  # a negative control
    with caplog.at_level("WARNING"):
        assert cut_subimages(src, 2, tmp_path / "objs") == 2
    assert "1 image(s) without objects (negative controls?) give no sub-image: b" in caplog.text


def test_subimages_connected_components_of_binary_masks_and_cli(tmp_path, capsys):
    src = tmp_path / "bin"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    m = np.zeros((30, 30), np.uint8)
    m[1:4, 1:4] = m[10:20, 10:12] = m[25:29, 2:9] = 255
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(src / "images" / "x.png")
    Image.fromarray(m).save(src / "masks" / "x.png")
    assert main(["subimages", str(src), "--margin", "0", "--out", str(tmp_path / "o")]) == 0
    assert "3 sub-images" in capsys.readouterr().out
    shapes = sorted(tifffile.imread(p).shape for p in (tmp_path / "o" / "masks").iterdir())
    assert shapes == [(3, 3), (4, 7), (10, 2)]
    assert main(["patchify", str(src), "--size", "16", "--stride", "8", "--out", str(tmp_path / "o")]) == 2


def test_patchify_multiclass_writes_codes(tmp_path):
    src = tmp_path / "mc"
    for c in ("a", "b"):
        (src / f"masks_{c}").mkdir(parents=True)
    (src / "images").mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(src / "images" / "s.png")
    ma, mb = np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8)
    ma[:10], mb[15:] = 255, 255
    Image.fromarray(ma).save(src / "masks_a" / "s.png")
    Image.fromarray(mb).save(src / "masks_b" / "s.png")
    patchify(src, 10, 10, tmp_path / "out")
    info = load_dataset(tmp_path / "out")
    assert info.layout == "multiclass" and info.classes == ["background", "a", "b"]
    labels = {s.name: s.load_mask() for s in info.samples}
    assert set(np.unique(labels["s_y00010_x00000"])) == {0, 2}
    assert set(np.unique(labels["s_y00000_x00010"])) == {1}
