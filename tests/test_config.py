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
