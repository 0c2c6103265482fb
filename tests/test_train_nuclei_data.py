"""scripts/train_nuclei_model.build_combined_view: DSB + bitdepth_nucseg as one paired folder with its split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from unetlab.data.io import read_image, read_label
from unetlab.data.layouts import load_dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import train_nuclei_model as T  # noqa: E402


def fake_dsb(root: Path, ids: list[str]) -> Path:
    """stage1_train/<id>/images/<id>.png (RGB) with two per-nucleus PNG masks each."""
    for i, name in enumerate(ids):
        (root / name / "images").mkdir(parents=True)
        (root / name / "masks").mkdir()
        rgb = np.zeros((32, 32, 3), np.uint8)
        rgb[..., 0] = 10 + i
        rgb[4:10, 4:10] = 200
        Image.fromarray(rgb).save(root / name / "images" / f"{name}.png")
        for k, (y, x) in enumerate([(4, 4), (20, 20)]):
            m = np.zeros((32, 32), np.uint8)
            m[y : y + 6, x : x + 6] = 255
            Image.fromarray(m).save(root / name / "masks" / f"m{k}.png")
    return root


def fake_bitdepth(root: Path, names: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in names:
        tifffile.imwrite(root / "images" / f"{name}.tif", np.full((32, 32), 40000, np.uint16))
        lab = np.zeros((32, 32), np.uint16)
        lab[2:8, 2:8] = 1
        tifffile.imwrite(root / "masks" / f"{name}.tif", lab)
    return root


def test_combined_view_keeps_the_dsb_split_and_holds_out_whole_bitdepth_images(tmp_path):
    ids = {"train": ["a1", "bd2"], "val": ["b1"], "test": ["c1"]}  # DSB ids are hex: "bd..." is one
    fake_dsb(tmp_path / "dsb" / "stage1_train", [n for v in ids.values() for n in v] + ["unused"])
    (tmp_path / "dsb_split.json").write_text(json.dumps(ids))
    train_bd = ["bone_40x_air_2", "heart_20x_2"]
    bitdepth = fake_bitdepth(tmp_path / "bd", T.BITDEPTH_TEST + T.BITDEPTH_VAL + train_bd)

    split_file = T.build_combined_view(tmp_path / "dsb", bitdepth, tmp_path / "view", tmp_path / "dsb_split.json")
    split = json.loads(split_file.read_text())

    assert [n for n in split["test"] if n.startswith("dsb_")] == ["dsb_c1"]
    assert [n for n in split["val"] if n.startswith("dsb_")] == ["dsb_b1"]
    assert sorted(n for n in split["train"] if n.startswith("dsb_")) == ["dsb_a1", "dsb_bd2"]
    assert sorted(n for n in split["test"] if not n.startswith("dsb_")) == sorted(f"bd_{n}" for n in T.BITDEPTH_TEST)
    assert sorted(n for n in split["val"] if not n.startswith("dsb_")) == sorted(f"bd_{n}" for n in T.BITDEPTH_VAL)
    bd_train = [n for n in split["train"] if not n.startswith("dsb_")]
    assert len(bd_train) == T.BITDEPTH_COPIES * len(train_bd)  # oversampled, held-out images never copied
    assert all(n.split("_", 1)[1] in train_bd for n in bd_train)
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])

    info = load_dataset(tmp_path / "view")
    assert info.layout == "paired" and not info.problems
    # a packaged two-lab model's split.json ("dsb_<id>", "bd_<name>") gives the same view again
    again = T.build_combined_view(tmp_path / "dsb", bitdepth, tmp_path / "view2", split_file)
    assert json.loads(again.read_text()) == split
    assert sorted(s.name for s in info.samples) == sorted(set().union(*parts))  # "unused" is not in the view
    dsb = next(s for s in info.samples if s.name == "dsb_bd2")
    image = read_image(dsb.image)
    assert image.shape == (1, 32, 32) and image[0, 0, 0] == 11  # channel 0 only
    assert tifffile.imread(dsb.mask_paths[0]).dtype == np.uint16
    labels = read_label(dsb.mask_paths[0])
    assert sorted(np.unique(labels)) == [0, 1, 2]  # per-nucleus PNGs merged
    assert read_image(next(s.image for s in info.samples if s.name == "bd_heart_20x_1")).max() == 40000

    again = T.build_combined_view(tmp_path / "dsb", bitdepth, tmp_path / "view", tmp_path / "dsb_split.json")
    assert json.loads(again.read_text()) == split  # a second call (a resumed run) finds the same view


def test_two_lab_recipe_trains_its_dsb_stage_first_and_resumes_the_right_run(tmp_path, monkeypatch):
    """--bitdepth: stage 1 (the DSB-only recipe) into RUN_dsb, then the two-lab fine-tune with --init RUN_dsb; a
    finished stage 1 is not trained again; --init given skips it; --resume names the run."""
    ids = {"train": ["a1"], "val": ["b1"], "test": ["c1"]}
    fake_dsb(tmp_path / "dsb" / "stage1_train", [n for v in ids.values() for n in v])
    (tmp_path / "dsb" / "image_metadata.csv").write_text(
        "ImageId,modality_guess\n" + "".join(f"{n},fluorescence\n" for v in ids.values() for n in v))
    bitdepth = fake_bitdepth(tmp_path / "bd", T.BITDEPTH_TEST + T.BITDEPTH_VAL + ["bone_40x_air_2"])
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "split.json").write_text(json.dumps(ids))
    monkeypatch.setattr(T, "DEST", tmp_path / "pkg")
    calls: list[list[str]] = []
    monkeypatch.setattr(T.subprocess, "run", lambda cmd, check: calls.append([str(c) for c in cmd]))
    run = tmp_path / "runs" / "nuclei"

    T.train(tmp_path / "dsb", bitdepth, run, [])
    (stage1, stage2) = calls
    assert stage1[stage1.index("--out") + 1] == str(run.parent / "nuclei_dsb") and "--include" in stage1
    assert stage2[stage2.index("--out") + 1] == str(run) and "--split-file" in stage2
    assert stage2[stage2.index("--init") + 1] == str(run.parent / "nuclei_dsb") and stage2.count("--init") == 1

    calls.clear()
    (run.parent / "nuclei_dsb" / "summary.json").parent.mkdir(parents=True)
    (run.parent / "nuclei_dsb" / "summary.json").write_text("{}")
    T.train(tmp_path / "dsb", bitdepth, run, [], resume=True)
    assert len(calls) == 1 and calls[0][calls[0].index("--resume") + 1] == str(run) and "--out" not in calls[0]
    calls.clear()
    T.train(tmp_path / "dsb", bitdepth, run, ["--init", "nuclei"])
    assert len(calls) == 1 and calls[0][calls[0].index("--init") + 1] == "nuclei"
