"""Splits by group: seeded fraction, globs, regex, val_groups, k-fold, saved split files."""

from __future__ import annotations

from pathlib import Path

import pytest

from unetlab.config import DataConfig
from unetlab.data.sample import DatasetInfo, Sample
from unetlab.data.split import load_split, save_split, split_samples
from unetlab.errors import UnetlabError


def _info(n_groups: int = 6, per_group: int = 3) -> DatasetInfo:
    samples = [
        Sample(name=f"exp/Pos{g:03d}_t{t}", image=Path(f"/x/{g}_{t}.tif"), group=f"exp/Pos{g:03d}")
        for g in range(n_groups)
        for t in range(per_group)
    ]
    return DatasetInfo(layout="test", root=Path("/x"), samples=samples)


def _groups(samples):
    return {s.group for s in samples}


def test_fraction_is_by_group_seeded_and_both_sides_nonempty():
    info = _info()
    train, val = split_samples(info, DataConfig(val_fraction=0.34), seed=3)
    assert not (_groups(train) & _groups(val))
    assert len(train) + len(val) == len(info.samples)
    assert len(_groups(val)) == 2
    again = split_samples(info, DataConfig(val_fraction=0.34), seed=3)
    assert [s.name for s in again[1]] == [s.name for s in val]
    # a tiny fraction still puts one group on each side
    train, val = split_samples(_info(2), DataConfig(val_fraction=0.01))
    assert len(_groups(train)) == 1 and len(_groups(val)) == 1
    # different seeds give different splits somewhere
    splits = {tuple(sorted(_groups(split_samples(info, DataConfig(val_fraction=0.34), seed=s)[1])))
              for s in range(8)}
    assert len(splits) > 1


def test_zero_fraction_keeps_all_in_training():
    train, val = split_samples(_info(), DataConfig(val_fraction=0.0))
    assert len(train) == 18 and val == []


def test_one_group_cannot_be_split():
    with pytest.raises(UnetlabError, match="one group"):
        split_samples(_info(1), DataConfig(val_fraction=0.2))


def test_glob_and_regex_on_names_move_whole_groups():
    info = _info()
    train, val = split_samples(info, DataConfig(val="*Pos001_t0"))
    assert _groups(val) == {"exp/Pos001"} and len(val) == 3
    train, val = split_samples(info, DataConfig(val=r"re:Pos00[45]"))
    assert _groups(val) == {"exp/Pos004", "exp/Pos005"}
    assert not (_groups(train) & _groups(val))


def test_glob_matching_nothing_names_the_glob():
    with pytest.raises(UnetlabError, match=r"\*nothing\*"):
        split_samples(_info(), DataConfig(val="*nothing*"))


def test_val_groups_names_and_globs():
    info = _info()
    _, val = split_samples(info, DataConfig(val_groups=["*Pos002", "exp/Pos003"]))
    assert _groups(val) == {"exp/Pos002", "exp/Pos003"}
    with pytest.raises(UnetlabError, match="Pos999"):
        split_samples(info, DataConfig(val_groups=["*Pos999"]))
    with pytest.raises(UnetlabError, match="no training"):
        split_samples(info, DataConfig(val_groups=["*"]))


def test_folds_cover_every_group_exactly_once():
    info = _info(7)
    seen: list[str] = []
    for k in range(1, 4):
        train, val = split_samples(info, DataConfig(fold=f"{k}/3"), seed=1)
        assert not (_groups(train) & _groups(val))
        assert val
        seen += sorted(_groups(val))
    assert sorted(seen) == sorted(info.groups)
    with pytest.raises(UnetlabError, match="K/N"):
        split_samples(info, DataConfig(fold="3"))
    with pytest.raises(UnetlabError, match="groups"):
        split_samples(_info(2), DataConfig(fold="1/3"))


def test_save_and_reuse_split(tmp_path):
    info = _info()
    train, val = split_samples(info, DataConfig(val_fraction=0.5), seed=7)
    path = save_split(tmp_path / "split.json", train, val)
    doc = load_split(path)
    assert doc["val"] == [s.name for s in val]
    assert set(doc["val_groups"]) == _groups(val)
    train2, val2 = split_samples(info, DataConfig(split_file=str(path), val_fraction=0.1), seed=99)
    assert [s.name for s in val2] == [s.name for s in val]
    assert [s.name for s in train2] == [s.name for s in train]
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(UnetlabError, match="bad.json"):
        load_split(tmp_path / "bad.json")


def test_test_split_is_held_out_by_group_before_train_and_val():
    from unetlab.data.split import hold_out_test

    info = _info(10)
    rest, test = hold_out_test(info.samples, DataConfig(test_fraction=0.2), seed=1)
    assert len(_groups(test)) == 2 and not (_groups(test) & _groups(rest))
    assert len(rest) + len(test) == len(info.samples)
    again_rest, again_test = hold_out_test(info.samples, DataConfig(test_fraction=0.2), seed=1)
    assert [s.name for s in again_test] == [s.name for s in test]
    # the validation draw of the same seed is another one: the test split is not the validation split
    _train, val = split_samples(info, DataConfig(val_fraction=0.2), seed=1)
    assert _groups(val) != _groups(test)
    assert hold_out_test(info.samples, DataConfig(), seed=1) == (info.samples, [])


def test_test_split_by_pattern_and_groups_and_through_a_saved_split(tmp_path):
    from unetlab.data.split import hold_out_test

    info = _info(6)
    _rest, test = hold_out_test(info.samples, DataConfig(test_groups=["exp/Pos00[45]"]))
    assert _groups(test) == {"exp/Pos004", "exp/Pos005"}
    _rest, test = hold_out_test(info.samples, DataConfig(test="re:Pos001_t0$"))
    assert _groups(test) == {"exp/Pos001"} and len(test) == 3  # the whole group goes with the match
    with pytest.raises(UnetlabError, match="test pattern"):
        hold_out_test(info.samples, DataConfig(test="nothing*"))
    with pytest.raises(UnetlabError, match="matches no group"):
        hold_out_test(info.samples, DataConfig(test_groups=["Pos9*"]))
    with pytest.raises(UnetlabError, match="'\\*/Pos004' names Pos004 of every experiment"):
        hold_out_test(info.samples, DataConfig(test_groups=["Pos004"]))  # the group is exp/Pos004
    _rest, test = hold_out_test(info.samples, DataConfig(test_groups=["*/Pos004"]))
    assert _groups(test) == {"exp/Pos004"}
    rest, test = hold_out_test(info.samples, DataConfig(test_groups=["exp/Pos005"]))
    train, val = split_samples(DatasetInfo("test", Path("/x"), rest), DataConfig(val_groups=["exp/Pos004"]))
    path = save_split(tmp_path / "split.json", train, val, test)
    assert load_split(path)["test"] == [s.name for s in test]
    # a saved split keeps its test samples out of training, on resume or with --split-file
    cfg = DataConfig(split_file=str(path))
    rest2, test2 = hold_out_test(info.samples, cfg)
    train2, val2 = split_samples(DatasetInfo("test", Path("/x"), rest2), cfg)
    assert [s.name for s in test2] == [s.name for s in test]
    assert not ({s.name for s in train2} & {s.name for s in test2})
    assert [s.name for s in val2] == [s.name for s in val]


@pytest.mark.parametrize("key,flag", [("val", "--val"), ("test", "--test")])
def test_a_bad_regex_names_its_flag_and_pattern(key, flag):
    from unetlab.data.split import hold_out_test

    cfg = DataConfig(**{key: "re:("})
    with pytest.raises(UnetlabError) as err:
        split_samples(_info(), cfg) if key == "val" else hold_out_test(_info().samples, cfg)
    text = str(err.value)
    assert text.startswith(f"{flag} 're:(' is not a valid regular expression") and "\n" not in text
    assert "val pattern" not in text or key == "val"


def test_a_bad_include_regex_is_one_line_naming_include(tmp_path, synthetic_cells, capsys):
    from unetlab.cli import main

    code = main(["train", "--data", str(synthetic_cells), "--out", str(tmp_path / "run"), "--include", "re:("])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--include 're:(' is not a valid regular expression" in err[0] and "internal error" not in err[0]
    assert not (tmp_path / "run").exists()
