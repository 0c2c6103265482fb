"""Every dataset layout, built in tmp_path in its real on-disk format: detection, pairing, grouping, splits."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from unetlab.config import DataConfig
from unetlab.data.layouts import LAYOUTS, detect_layout, load_dataset, load_from_config
from unetlab.data.rle import rle_encode
from unetlab.data.split import split_samples
from unetlab.errors import UnetlabError

H, W = 12, 16


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)
    return path


def _tif(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr)
    return path


def _palette_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), np.ascontiguousarray(arr, dtype=np.uint8).tobytes())
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    im.save(path)
    return path


def _img(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (H, W), dtype=np.uint8)


def _box(y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


def _groups(samples):
    return {s.group for s in samples}


# --- paired ----------------------------------------------------------------------------------------------------

def test_paired_suffixes_mask_dir_invert_and_unpaired(tmp_path):
    root = tmp_path / "ds"
    _png(root / "images" / "a.png", _img(1))
    _png(root / "images" / "b.png", _img(2))
    _png(root / "images" / "c.png", _img(3))  # no mask
    _png(root / "masks" / "a_mask.png", _box(0, 4, 0, 4))
    _png(root / "masks" / "b_label.png", _box(2, 6, 2, 6))
    _png(root / "masks" / "zz.png", _box(2, 6, 2, 6))  # no image
    assert detect_layout(root) == "paired"
    info = load_dataset(root)
    assert [s.name for s in info.samples] == ["a", "b"]
    assert int(info.samples[0].load_mask().sum()) == 16
    assert any("c.png" in p and "without a mask" in p for p in info.problems)
    assert any("zz.png" in p and "without an image" in p for p in info.problems)
    inv = load_dataset(root, invert_mask=True).samples[0].load_mask()
    assert int(inv.sum()) == H * W - 16
    # a mask folder with another name, given by the user (and through the config)
    other = tmp_path / "other"
    _png(other / "images" / "a.png", _img(1))
    _png(other / "annotations_v2" / "a.png", _box(0, 2, 0, 2))
    with pytest.raises(UnetlabError, match="no known dataset layout"):
        detect_layout(other)
    info = load_from_config(DataConfig(root=str(other), mask_dir="annotations_v2"))
    assert info.layout == "paired" and int(info.samples[0].load_mask().sum()) == 4


def test_paired_flat_cellpose_folder(tmp_path):
    root = tmp_path / "cp"
    _tif(root / "img1.tif", _img(1))
    _tif(root / "img2.tif", _img(2))
    lab = np.zeros((H, W), np.uint16)
    lab[0:3, 0:3], lab[5:9, 5:9] = 1, 2
    _tif(root / "img1_masks.tif", lab)
    _tif(root / "img2_masks.tif", lab)
    assert detect_layout(root) == "paired"
    info = load_dataset(root)
    assert [s.name for s in info.samples] == ["img1", "img2"] and not info.problems
    assert set(np.unique(info.samples[0].load_mask())) == {0, 1, 2}


# --- timelapse -------------------------------------------------------------------------------------------------

def _timelapse(root: Path) -> None:
    frames = ["img_000000001", "img_000000002", "img_000000003"]
    lab = np.zeros((H, W), np.uint16)
    lab[1:5, 1:5], lab[6:10, 8:14] = 1, 2
    for pos in ("Pos001", "Pos002"):
        for f in frames:
            _tif(root / "expA_raw_data" / pos / "aphase" / f"{f}.tif", _img(3))
        for f in frames[:2]:  # frame 3 is not annotated
            _tif(root / "expA_masks" / pos / "PreprocessedPhaseMasks" / f"MASK_{f}.tiff", lab)
    for f in frames:  # expB: two channel folders, masks directly in the position folder, .tif masks
        _tif(root / "expB_raw_data" / "Pos009" / "PreprocessedPhase" / f"{f}.tif", _img(5))
        _tif(root / "expB_raw_data" / "Pos009" / "afluor" / f"{f}.tif", _img(6))
        _tif(root / "expB_masks" / "Pos009" / f"MASK_{f}.tif", lab)


def test_timelapse_pairs_by_frame_and_groups_by_position(tmp_path):
    root = tmp_path / "tl"
    _timelapse(root)
    assert detect_layout(root) == "timelapse"
    info = load_dataset(root)
    assert len(info.samples) == 2 * 2 + 3
    assert set(info.groups) == {"expA/Pos001", "expA/Pos002", "expB/Pos009"}
    for s in info.samples:
        assert s.mask_paths[0].stem.endswith(s.image.stem)
        assert s.group in s.name
    expb = [s for s in info.samples if s.group == "expB/Pos009"]
    assert all(s.image.parent.name == "PreprocessedPhase" for s in expb)
    assert any("not annotated" in n for n in info.notes) and not info.problems
    assert set(np.unique(info.samples[0].load_mask())) == {0, 1, 2}
    forced = load_dataset(root, channel="afluor")
    assert all(s.image.parent.name == "afluor" for s in forced.samples if s.group == "expB/Pos009")
    # splits by position: a glob on groups, and k-fold over the three positions
    train, val = split_samples(info, DataConfig(val_groups=["*Pos009"]))
    assert _groups(val) == {"expB/Pos009"} and not (_groups(train) & _groups(val))
    seen = []
    for k in (1, 2, 3):
        train, val = split_samples(info, DataConfig(fold=f"{k}/3"))
        assert not (_groups(train) & _groups(val))
        seen += sorted(_groups(val))
    assert sorted(seen) == sorted(info.groups)


def test_timelapse_mask_without_frame_is_a_problem(tmp_path):
    root = tmp_path / "tl"
    _timelapse(root)
    _tif(root / "expA_masks" / "Pos001" / "PreprocessedPhaseMasks" / "MASK_img_000000099.tiff", np.zeros((H, W)))
    info = load_dataset(root)
    assert len(info.problems) == 1 and "img_000000099" in info.problems[0]


# --- kaggle_dsb ------------------------------------------------------------------------------------------------

def _kaggle(root: Path) -> dict[str, list[np.ndarray]]:
    objects = {
        "id1": [_box(0, 5, 0, 5), _box(3, 8, 3, 8)],  # overlap 2x2
        "id2": [_box(1, 4, 10, 14), _box(6, 10, 2, 6), _box(8, 11, 12, 15)],
        "id3": [],  # negative control: empty masks folder
    }
    for key, objs in objects.items():
        rgba = np.stack([_img(len(key))] * 3 + [np.full((H, W), 255, np.uint8)], axis=-1)  # RGBA like DSB
        (root / key / "images").mkdir(parents=True)
        Image.fromarray(rgba).save(root / key / "images" / f"{key}.png")
        (root / key / "masks").mkdir(parents=True, exist_ok=True)
        for j, m in enumerate(objs):
            _png(root / key / "masks" / f"m{j}.png", m)
    return objects


def test_kaggle_dsb_lazy_masks_overlaps_and_negatives(tmp_path):
    root = tmp_path / "stage1_train"
    objects = _kaggle(root)
    assert detect_layout(root) == "kaggle_dsb"
    (root / "id2" / "masks" / "zz_broken.png").write_bytes(b"not a png")  # loading must not read masks
    info = load_dataset(root)
    assert [s.name for s in info.samples] == ["id1", "id2", "id3"]
    assert [len(s.mask_paths) for s in info.samples] == [2, 4, 0]
    assert isinstance(info.samples[0].mask_loader, partial)
    lab = info.samples[0].load_mask()
    assert lab.dtype == np.int32 and set(np.unique(lab)) == {0, 1, 2}
    assert (lab[3:5, 3:5] == 1).all()  # overlap: the first object in file-name order keeps the pixel
    assert int((lab > 0).sum()) == int(((objects["id1"][0] > 0) | (objects["id1"][1] > 0)).sum())
    with pytest.raises(UnetlabError, match="zz_broken"):
        info.samples[1].load_mask()
    neg = info.samples[2].load_mask()
    assert neg.shape == (H, W) and not neg.any()
    assert any("negative controls" in n for n in info.notes)
    assert _groups(info.samples) == {"id1", "id2", "id3"}


# --- rle_csv ---------------------------------------------------------------------------------------------------

def _instance_labels(seed: int) -> np.ndarray:
    lab = np.zeros((H, W), np.int32)
    lab[1:5, 2:7] = 1
    lab[6:11, 9 - seed:15 - seed] = 2
    return lab


def test_rle_csv_dsb_convention_column_major(tmp_path):
    root = tmp_path / "dsb"
    labels = {"aa": _instance_labels(0), "bb": _instance_labels(2)}
    root.mkdir()
    with open(root / "stage1_train_labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ImageId", "EncodedPixels", "Height", "Width"])
        for key, lab in labels.items():
            for v in (1, 2):
                w.writerow([key, rle_encode(lab == v, "F"), H, W])
        w.writerow(["cc", "", H, W])  # an image without objects
    for key in ("aa", "bb", "cc"):  # Kaggle's nested image folders
        _png(root / "stage1_train" / key / "images" / f"{key}.png", _img())
    assert detect_layout(root) == "rle_csv"
    info = load_dataset(root)
    assert [s.name for s in info.samples] == ["aa", "bb", "cc"] and not info.problems
    for s in info.samples[:2]:
        np.testing.assert_array_equal(s.load_mask(), labels[s.name])
    assert not info.samples[2].load_mask().any()


def test_rle_csv_sartorius_convention_row_major_sizes_from_csv(tmp_path):
    root = tmp_path / "sartorius"
    labels = {"0030fd0e6378": _instance_labels(0), "0140b3c8f445": _instance_labels(1)}
    root.mkdir()
    with open(root / "train.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "annotation", "width", "height", "cell_type", "plate_time"])
        for key, lab in labels.items():
            for v in (1, 2):
                w.writerow([key, rle_encode(lab == v, "C"), W, H, "shsy5y", "11h30m00s"])
    for key in labels:
        _png(root / "train" / f"{key}.png", _img())
    _png(root / "train" / "unlabelled.png", _img())
    assert detect_layout(root) == "rle_csv"
    info = load_dataset(root)
    assert len(info.samples) == 2
    for s in info.samples:
        np.testing.assert_array_equal(s.load_mask(), labels[s.name])
    assert any("no row" in n for n in info.notes)
    # forcing the other pixel order gives a different (wrong) mask: the order matters
    wrong = load_dataset(root, rle_order="F").samples[0].load_mask()
    assert not np.array_equal(wrong, labels[info.samples[0].name])


def test_rle_csv_missing_image_is_a_problem(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "labels.csv").write_text("ImageId,EncodedPixels\nghost,1 3\n")
    (root / "images").mkdir()
    info = load_dataset(root)
    assert not info.samples and "ghost" in info.problems[0]


# --- pennfudan -------------------------------------------------------------------------------------------------

def test_pennfudan_palette_instance_masks(tmp_path):
    root = tmp_path / "PennFudanPed"
    lab = np.zeros((H, W), np.uint8)
    lab[1:6, 1:5], lab[2:10, 8:12] = 1, 2
    for name in ("FudanPed00001", "PennPed00002"):
        _png(root / "PNGImages" / f"{name}.png", np.stack([_img()] * 3, -1))
        _palette_png(root / "PedMasks" / f"{name}_mask.png", lab)
    (root / "Annotation").mkdir()
    assert detect_layout(root) == "pennfudan"
    info = load_dataset(root)
    assert [s.name for s in info.samples] == ["FudanPed00001", "PennPed00002"] and not info.problems
    np.testing.assert_array_equal(info.samples[0].load_mask(), lab)


# --- multiclass ------------------------------------------------------------------------------------------------

def test_multiclass_class_folders_overlap_and_subset(tmp_path):
    root = tmp_path / "epfl"
    for name in ("s0", "s1"):
        _png(root / "images" / f"{name}.png", _img())
        _png(root / "masks_membranes" / f"{name}.png", _box(0, 6, 0, 6))
        _png(root / "masks_mitochondrion" / f"{name}.png", _box(4, 10, 4, 10))
        _png(root / "masks_axon" / f"{name}.png", np.zeros((H, W)))
    assert detect_layout(root) == "multiclass"
    info = load_dataset(root)
    assert info.task == "multiclass"
    assert info.classes == ["background", "axon", "membranes", "mitochondrion"]
    lab = info.samples[0].load_mask()
    assert lab[0, 0] == 2 and lab[8, 8] == 3 and lab[5, 5] == 3  # overlap: the later class wins
    sub = load_dataset(root, classes=["mitochondrion", "membranes"])
    assert sub.classes == ["background", "mitochondrion", "membranes"]
    lab = sub.samples[0].load_mask()
    assert lab[0, 0] == 2 and lab[8, 8] == 1 and lab[5, 5] == 2  # order given: membranes now wins
    only = load_from_config(DataConfig(root=str(root), classes=["membranes"])).samples[0].load_mask()
    assert set(np.unique(only)) == {0, 1} and int(only.sum()) == 36
    with pytest.raises(UnetlabError, match="unknown class 'nucleus'"):
        load_dataset(root, classes=["nucleus"])


def test_multiclass_codes_file_index_masks(tmp_path):
    root = tmp_path / "camvid_like"
    idx = np.zeros((H, W), np.uint8)
    idx[0:4], idx[4:8], idx[8:] = 0, 1, 2
    for name in ("f1", "f2"):
        _png(root / "FullImage" / f"{name}.png", _img())
        _png(root / "Mask_Norm" / f"{name}.png", idx)
    (root / "codes.txt").write_text("Void\nCell\nNucleus\n")
    assert detect_layout(root) == "multiclass"
    info = load_dataset(root)
    assert info.classes == ["Void", "Cell", "Nucleus"]
    np.testing.assert_array_equal(info.samples[0].load_mask(), idx)
    sub = load_dataset(root, classes=["Nucleus"])
    assert sub.classes == ["background", "Nucleus"]
    assert set(np.unique(sub.samples[0].load_mask()[8:])) == {1} and not sub.samples[0].load_mask()[:8].any()
    bad = idx.copy()
    bad[0, 0] = 7
    _png(root / "Mask_Norm" / "f2.png", bad)
    with pytest.raises(UnetlabError, match="mask value 7"):
        load_dataset(root).samples[1].load_mask()


# --- registry --------------------------------------------------------------------------------------------------

def test_detection_order_and_forced_layout(tmp_path):
    assert list(LAYOUTS)[:6] == ["timelapse", "kaggle_dsb", "pennfudan", "multiclass", "paired", "rle_csv"]
    with pytest.raises(UnetlabError, match="unknown layout"):
        load_dataset(tmp_path, layout="nope")
    with pytest.raises(UnetlabError, match="not found"):
        detect_layout(tmp_path / "missing")
    # a paired folder that also holds an RLE CSV is read as paired unless rle_csv is forced
    root = tmp_path / "both"
    _png(root / "images" / "a.png", _img())
    _png(root / "masks" / "a.png", _box(0, 3, 0, 3))
    (root / "sub.csv").write_text("ImageId,EncodedPixels\na,1 5\n")
    assert detect_layout(root) == "paired"
    forced = load_dataset(root, layout="rle_csv")
    assert forced.layout == "rle_csv" and int(forced.samples[0].load_mask().sum()) == 5


def test_samples_pickle_for_worker_processes(tmp_path):
    import pickle

    _timelapse(tmp_path / "tl")
    _kaggle(tmp_path / "kg")
    sartorius = tmp_path / "rle"
    _png(sartorius / "train" / "x.png", _img())
    (sartorius / "train.csv").write_text(f"id,annotation,width,height\nx,1 7,{W},{H}\n")
    for root in (tmp_path / "tl", tmp_path / "kg", sartorius):
        sample = load_dataset(root).samples[0]
        clone = pickle.loads(pickle.dumps(sample))
        np.testing.assert_array_equal(clone.load_mask(), sample.load_mask())


def test_a_csv_given_as_the_data_folder_points_to_its_folder(tmp_path):
    (tmp_path / "labels.csv").write_text("ImageId,EncodedPixels\n")
    with pytest.raises(UnetlabError, match=f"give the folder that holds it, {tmp_path}"):
        detect_layout(tmp_path / "labels.csv")


def test_images_in_a_subfolder_are_named_as_left_out(tmp_path):
    root = tmp_path / "ds"
    for d in ("images", "masks", "images/sub"):
        (root / d).mkdir(parents=True)
    tifffile.imwrite(root / "images" / "a.tif", np.zeros((8, 8), np.uint8))
    tifffile.imwrite(root / "masks" / "a.tif", np.ones((8, 8), np.uint8))
    tifffile.imwrite(root / "images" / "sub" / "b.tif", np.zeros((8, 8), np.uint8))
    info = load_dataset(root)
    assert [s.name for s in info.samples] == ["a"]
    assert any("subfolders of images/ are not part of the dataset: sub" in n for n in info.notes)
