"""`train --init RUN` takes channels, target and classes from the model it starts from; a flag set otherwise is one
line that names the fix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi

from corpus.make_corpus import TINY_TRAIN_FLAGS, _cells
from unetlab.cli import main
from unetlab.config import RunConfig, apply_overrides


def rgb_nuclei(root: Path, n: int = 6) -> Path:
    """DSB-like paired data: RGB PNGs whose nuclei are in channel 0 (noise in 1 and 2), instance-label masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        grey, mask = _cells(i)
        red = (grey >> 5).clip(0, 255).astype(np.uint8)
        rgb = np.stack([red, *rng.integers(0, 60, (2, *red.shape), dtype=np.uint8)], -1)
        Image.fromarray(rgb).save(root / "images" / f"n{i}.png")
        tifffile.imwrite(root / "masks" / f"n{i}.tif", ndi.label(mask > 0)[0].astype(np.uint16))
    return root


@pytest.fixture(scope="module")
def start_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny 'nuclei' model: channel 0 of RGB images, distance target."""
    root = tmp_path_factory.mktemp("finetune")
    data = rgb_nuclei(root / "data")
    run = root / "start"
    assert main(["-q", "train", "--data", str(data), "--out", str(run), *TINY_TRAIN_FLAGS, "--channels", "0",
                 "--target", "distance", "--aug-zoom", "0", "--tune-postprocess", "false"]) == 0
    return run, data


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_fine_tune_takes_channels_and_target_from_its_model(start_run, tmp_path):
    run, data = start_run
    mine = tmp_path / "mine"
    assert main(["-q", "train", "--init", str(run), "--data", str(data), "--out", str(mine), "--epochs", "1",
                 "--patch-size", "32", "--samples-per-epoch", "8", "--batch-size", "4", "--tensorboard", "false",
                 "--no-progress", "--tune-postprocess", "false"]) == 0
    cfg = RunConfig.load(mine / "config.yaml")
    assert cfg.data.channels == [0] and cfg.data.target == "distance"
    info = json.loads((mine / "model.json").read_text())
    assert (info["in_channels"], info["out_channels"], info["target"]) == (1, 2, "distance")


FINE_TUNE = ["--epochs", "1", "--patch-size", "32", "--samples-per-epoch", "8", "--batch-size", "4",
             "--tensorboard", "false", "--no-progress", "--tune-postprocess", "false"]


def test_fine_tune_keeps_the_size_normalisation_of_its_model(start_run, tmp_path):
    """A size-normalised model's weights know one object size: its fine-tune draws its images at that size too,
    whether or not --size-normalize is given (given, it is not refused for the default binary target)."""
    _run, data = start_run
    start = tmp_path / "start_sn"
    assert main(["-q", "train", "--data", str(data), "--out", str(start), *TINY_TRAIN_FLAGS, "--channels", "0",
                 "--target", "distance", "--size-normalize", "true", "--tune-postprocess", "false"]) == 0
    for extra in ([], ["--size-normalize", "true"]):
        mine = tmp_path / f"mine{len(extra)}"
        assert main(["-q", "train", "--init", str(start), "--data", str(data), "--out", str(mine), *FINE_TUNE,
                     *extra]) == 0
        cfg = RunConfig.load(mine / "config.yaml")
        assert cfg.data.size_normalize and cfg.data.target == "distance"


@pytest.mark.parametrize("flags, says", [
    (["--channels", "0,1"], ["was trained on 1 channel (channel 0)", "drop --channels 0,1", "--channels 0"]),
    (["--target", "binary"], ["was trained with --target distance", "drop --target binary"]),
])
def test_a_conflicting_flag_is_one_line_naming_the_fix(start_run, tmp_path, capsys, flags, says):
    run, data = start_run
    line = _one_line_error(capsys, ["train", "--init", str(run), "--data", str(data), "--out",
                                    str(tmp_path / "mine"), *TINY_TRAIN_FLAGS, *flags])
    assert f"--init {run}" in line
    for text in says:
        assert text in line, line
    assert not (tmp_path / "mine").exists()


def test_a_model_of_all_channels_asks_for_a_channel_choice(tmp_path, capsys):
    """A model trained on grey images, fine-tuned on RGB: the error says which flag to add."""
    from corpus.make_corpus import good_dataset

    grey = good_dataset(tmp_path / "grey")
    run = tmp_path / "grey_run"
    assert main(["-q", "train", "--data", str(grey), "--out", str(run), *TINY_TRAIN_FLAGS]) == 0
    line = _one_line_error(capsys, ["train", "--init", str(run), "--data", str(rgb_nuclei(tmp_path / "rgb")),
                                    "--out", str(tmp_path / "mine"), *TINY_TRAIN_FLAGS])
    assert "was trained on 1 channel (all of the image's channels)" in line
    assert "gives it 3 channels" in line and "choose 1 with --channels, e.g. --channels 0" in line


def test_set_by_user_knows_flags_yaml_keys_and_python_values(tmp_path):
    cfg = apply_overrides(RunConfig(), {"target": "binary", "lr": "0.01"})
    assert cfg.set_by_user("data.target") and cfg.set_by_user("train.lr")
    assert not cfg.set_by_user("data.channels")
    again = apply_overrides(cfg, {"epochs": 3})  # overrides on overrides keep the first ones
    assert again.set_by_user("data.target") and again.set_by_user("train.epochs")
    (tmp_path / "c.yaml").write_text("data:\n  channels: null\n  augment:\n    flip: 0.5\n")
    loaded = RunConfig.load(tmp_path / "c.yaml")
    assert loaded.set_by_user("data.channels") and loaded.set_by_user("data.augment.flip")
    assert not loaded.set_by_user("data.target")
    python = RunConfig()
    python.data.classes = ["a"]  # set in Python: a value other than the default counts as set
    assert python.set_by_user("data.classes") and not python.set_by_user("data.target")
