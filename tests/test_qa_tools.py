"""QA walkthrough of the picture tools and patchify: a bad or existing --out of weightmap, augment-preview and
lr-find is one line (exit 2) before any work; patchify's mirrored copies get ids of their own, its last patch ends
at the border, and its count is printed once."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from unetlab.cli import main
from unetlab.data.patches import patchify

pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(root: Path, shape: tuple[int, int] = (24, 20), binary: bool = False) -> Path:
    """One 16-bit image with two objects, one touching the right border, as instance labels (or a 0/255 mask)."""
    h, w = shape
    lab = np.zeros((h, w), np.uint16)
    lab[3:9, 4:10], lab[12:18, w - 5:w] = 1, 2
    mask = (lab > 0).astype(np.uint8) * 255 if binary else lab
    img = (np.arange(h * w, dtype=np.uint16).reshape(h, w) * 7) % 4000
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    tifffile.imwrite(root / "images" / "s.tif", img)
    tifffile.imwrite(root / "masks" / "s.tif", mask)
    return root


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --- --out of the picture tools -------------------------------------------------------------------------------


def _commands(tmp_path: Path) -> dict[str, list[str]]:
    data = _dataset(tmp_path / "data")
    return {
        "weightmap": ["weightmap", str(data / "masks" / "s.tif")],
        "augment-preview": ["augment-preview", "--data", str(data), "--n", "1"],
        "lr-find": ["lr-find", "--data", str(tmp_path / "no_such_data")],  # refused before the data is read
    }


@pytest.mark.parametrize("command", ["weightmap", "augment-preview", "lr-find"])
def test_out_without_png_suffix_or_a_folder_is_one_line(command, tmp_path, capsys):
    argv = _commands(tmp_path)[command]
    (tmp_path / "runs").mkdir()
    for out, says in [(tmp_path / "wm_noext", "must be a .png file"), (tmp_path / "runs", "is a folder"),
                      (tmp_path / "w.tif", "must be a .png file")]:
        assert main([*argv, "--out", str(out)]) == 2
        line = _error_line(capsys)
        assert f"unetlab {command}: error: {out}: --out" in line and says in line and ".png" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "runs"]  # nothing written
    assert not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("command", ["weightmap", "augment-preview", "lr-find"])
def test_existing_out_is_kept_without_overwrite(command, tmp_path, capsys):
    argv = _commands(tmp_path)[command]
    png = tmp_path / "pic.png"
    png.write_bytes(b"earlier output")
    assert main([*argv, "--out", str(png)]) == 2
    assert _error_line(capsys) == (f"unetlab {command}: error: {png}: output exists "
                                   "(pass --overwrite to replace it)")
    assert png.read_bytes() == b"earlier output"
    if command != "lr-find":  # (lr-find's sweep itself is tested in test_tools.py)
        assert main([*argv, "--out", str(png), "--overwrite"]) == 0
        assert png.read_bytes().startswith(b"\x89PNG")


# --- patchify -------------------------------------------------------------------------------------------------


def _split_ids(mask: np.ndarray) -> list[int]:
    """Ids whose pixels form more than one 8-connected blob."""
    eight = np.ones((3, 3), bool)
    return [i for i, box in enumerate(ndimage.find_objects(mask), start=1)
            if box is not None and ndimage.label(mask[box] == i, structure=eight)[1] > 1]


def test_patchify_gives_mirrored_objects_their_own_ids(tmp_path):
    src = _dataset(tmp_path / "src", shape=(24, 20))  # smaller than a patch: mirror-padded to 48 x 48
    assert patchify(src, 48, 48, tmp_path / "out") == 1
    mask = tifffile.imread(tmp_path / "out" / "masks" / "s_y00000_x00000.tif")
    assert mask.shape == (48, 48) and _split_ids(mask) == []
    src_lab = tifffile.imread(src / "masks" / "s.tif")
    np.testing.assert_array_equal(mask[:24, :20], src_lab)  # the original keeps its ids
    mirrored = np.concatenate([mask[24:].ravel(), mask[:24, 20:].ravel()])
    assert not set(np.unique(mirrored)) & {1, 2}  # no mirrored copy has an original's id
    # 2 x 3 copies (columns 40..47 mirror columns 0..7 back): both objects in 4, object 1 alone in 2
    assert len(np.unique(mask[mask > 0])) == 10


def test_patchify_binary_masks_stay_binary(tmp_path):
    src = _dataset(tmp_path / "src", shape=(24, 20), binary=True)
    patchify(src, 48, 48, tmp_path / "out")
    mask = tifffile.imread(tmp_path / "out" / "masks" / "s_y00000_x00000.tif")
    assert set(np.unique(mask)) == {0, 255}


def test_patchify_last_patch_ends_at_the_border(tmp_path):
    src = _dataset(tmp_path / "src", shape=(40, 51))
    patchify(src, 32, 25, tmp_path / "out")
    names = sorted(p.stem for p in (tmp_path / "out" / "masks").iterdir())
    assert names == [f"s_y{y:05d}_x{x:05d}" for y in (0, 8) for x in (0, 19)]
    img = tifffile.imread(src / "images" / "s.tif")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "images" / "s_y00008_x00019.tif"),
                                  img[8:, 19:])  # real pixels, nothing mirrored


@pytest.mark.parametrize("command,flag,count", [("patchify", ["--size", "16"], "4 patches"),
                                                ("subimages", ["--margin", "2"], "2 sub-images")])
def test_count_line_is_printed_once(command, flag, count, tmp_path, capsys, caplog):
    src = _dataset(tmp_path / "src")
    caplog.set_level(logging.INFO)
    assert main([command, str(src), *flag, "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err + caplog.text).count(count) == 1
