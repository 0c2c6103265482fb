"""The run configuration: YAML round trip, flag overrides, clear errors and old runs' retired keys."""

from __future__ import annotations

import logging

import pytest
import yaml

from unetlab.config import RunConfig, apply_overrides, leaf_keys
from unetlab.errors import UnetlabError


def test_yaml_round_trip_keeps_every_value(tmp_path):
    cfg = apply_overrides(RunConfig(), {"lr": "3e-4", "patch_size": "128", "aug_flip": "0", "channels": "0,2",
                                        "prominence": "0.1", "class_weights": "[1, 2]"})
    cfg.save(tmp_path / "c.yaml")
    back = RunConfig.load(tmp_path / "c.yaml")
    assert back == cfg
    assert (back.train.lr, back.data.patch_size, back.data.augment.flip) == (3e-4, 128, 0.0)
    assert back.data.channels == [0, 2] and back.postprocess.prominence == 0.1


def test_every_leaf_is_a_unique_flag():
    keys = leaf_keys()
    assert {"lr", "patch_size", "target", "prominence", "aug_elastic"} <= set(keys)
    assert keys["prominence"][:2] == ("postprocess", "prominence")


def test_unknown_and_bad_values_name_the_key(tmp_path):
    with pytest.raises(UnetlabError, match="train.lrate"):
        RunConfig.from_dict({"train": {"lrate": 1}})
    with pytest.raises(UnetlabError, match="unknown config key 'nope'"):
        apply_overrides(RunConfig(), {"nope": 1})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UnetlabError, match="not valid YAML"):
        RunConfig.load(bad)


def test_retired_key_of_an_old_run_is_dropped_with_a_warning(tmp_path, caplog):
    d = RunConfig().to_dict()
    d["postprocess"]["min_distance"] = 5  # written by unetlab before markers used prominence
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(d))
    with caplog.at_level(logging.WARNING, logger="unetlab.config"):
        cfg = RunConfig.load(path)
    assert cfg.postprocess == RunConfig().postprocess
    assert "postprocess.min_distance" in caplog.text


# --- flags built from the dataclasses: predict's options, augment-preview's augmentations ----------------------


def _subparser(name: str):
    import argparse

    from unetlab.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _option_actions(parser) -> dict:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_predict_flags_are_exactly_the_predict_options():
    import dataclasses

    from unetlab.inference.options import PredictOptions

    actions = _option_actions(_subparser("predict"))
    fields = {f.name for f in dataclasses.fields(PredictOptions)}
    api_only = {f.name for f in dataclasses.fields(PredictOptions) if f.metadata.get("flag", "") is None}
    assert api_only == {"postprocess"}  # a PostprocessConfig object: no flag of its own
    assert set(actions) - {"model", "input", "out"} == fields - api_only
    assert all(a.help for a in actions.values())  # every flag says what it does in --help
    assert actions["progress"].option_strings == ["--no-progress"]
    assert actions["batch_size"].option_strings == ["--batch-size"]


def test_predict_flags_parse_into_the_options_with_the_api_defaults():
    from unetlab.flags import dataclass_from_args
    from unetlab.inference.options import PredictOptions

    parser = _subparser("predict")
    base = ["--model", "m", "--input", "i", "--out", "o"]
    assert dataclass_from_args(parser.parse_args(base), PredictOptions) == PredictOptions()
    opts = dataclass_from_args(parser.parse_args([*base, "--tile", "256", "--stream-threshold", "0", "--no-progress",
                                                  "--instances", "--split", "val", "--rle", "s.csv"]),
                               PredictOptions)
    assert opts == PredictOptions(tile=256, stream_threshold=None, progress=False, instances=True, split="val",
                                  rle="s.csv")
    opts = dataclass_from_args(parser.parse_args([*base, "--stream-threshold", "0.5"]), PredictOptions)
    assert opts.stream_threshold == 500_000  # megapixels on the command line, pixels in the API


def test_predict_api_rejects_an_unknown_option_naming_it(tmp_path):
    import unetlab
    from unetlab.inference.options import PredictOptions, resolve_options

    with pytest.raises(TypeError, match=r"unexpected keyword argument 'tiles'.*did you mean 'tile'"):
        unetlab.predict(tmp_path / "run", tmp_path / "in", tmp_path / "out", tiles=256)
    with pytest.raises(TypeError, match="must be a PredictOptions"):
        unetlab.predict(tmp_path / "run", tmp_path / "in", tmp_path / "out", options={"tile": 256})
    assert not (tmp_path / "out").exists()  # refused before any work
    # keywords go on top of an options object
    assert resolve_options(PredictOptions(tile=256), {"instances": True}) == PredictOptions(tile=256, instances=True)
    assert unetlab.PredictOptions is PredictOptions


def test_augment_preview_and_train_share_the_augment_flags():
    train = {d: a.option_strings for d, a in _option_actions(_subparser("train")).items() if d.startswith("cfg__aug_")}
    preview = {d: a.option_strings for d, a in _option_actions(_subparser("augment-preview")).items()
               if d.startswith("cfg__")}
    assert preview == train and "cfg__aug_elastic" in train
    assert set(train) == {f"cfg__{k}" for k in leaf_keys() if k.startswith("aug_")}


def test_package_version_matches_pyproject():
    import re
    from pathlib import Path

    import unetlab

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == unetlab.__version__


def test_an_empty_config_file_is_named_not_taken_silently(tmp_path, caplog):
    (tmp_path / "empty.yaml").write_text("")
    with caplog.at_level("WARNING"):
        cfg = RunConfig.load(tmp_path / "empty.yaml")
    assert cfg == RunConfig() and "is empty: every setting is the default" in caplog.text


@pytest.mark.parametrize("key, value, says", [
    ("tile", 0, "--tile must be a whole number of pixels >= 16, not 0"),
    ("tile", "big", "--tile must be a whole number of pixels >= 16, not 'big'"),
    ("batch_size", 0, "--batch-size must be at least 1, not 0"),
    ("overlap", 1.5, "--overlap must be in [0, 1), not 1.5"),
])
def test_prediction_numbers_no_tiling_can_use_are_one_line(key, value, says):
    from unetlab.errors import UnetlabError
    from unetlab.inference.options import resolve_options

    with pytest.raises(UnetlabError) as err:
        resolve_options(None, {key: value})
    assert str(err.value) == says


def test_dir_of_the_package_lists_its_lazily_imported_api():
    import unetlab

    assert {"train", "predict", "evaluate", "load_run", "load_dataset", "list_presets"} <= set(dir(unetlab))


def test_the_augmentation_probabilities_are_the_fields_that_say_so():
    from dataclasses import fields

    from unetlab.config import AUGMENT_PROBABILITIES, AugmentConfig

    said = {f.name for f in fields(AugmentConfig) if f.metadata["help"].startswith("probability")}
    assert set(AUGMENT_PROBABILITIES) == said
