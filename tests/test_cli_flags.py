"""Every flag has a help line from one source (field metadata or the command's own), and docs/flags.md is it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from unetlab.cli import build_parser, config_from_args, main
from unetlab.flags import parser_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs" / "flags.md"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _flag_actions(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("command", ["train", "predict"])
def test_every_train_and_predict_flag_says_more_than_its_default(command):
    p = _subparsers()[command]
    actions = _flag_actions(p)
    assert len(actions) > (100 if command == "train" else 25)
    for a in actions:
        words = re.sub(r"\(default[^)]*\)", "", a.help or "")
        assert re.search(r"[a-z]{3}", words), f"{command} {a.option_strings}: help {a.help!r}"


def test_every_flag_of_every_command_has_a_help_line():
    for name, p in _subparsers().items():
        for a in _flag_actions(p):
            assert (a.help or "").strip(), f"unetlab {name} {a.option_strings or a.dest}: no help"


def test_help_shows_defaults_as_the_command_line_writes_them(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--channels A,B keep these image channels, in this order, e.g. 0 or 0,2" in out
    assert "--aug-zoom-range A,B range of the zoom factor, e.g. 0.5,2 (default 0.5,2.0)" in out
    assert "--invert-mask [BOOL] the masks mark the background, not the objects (default false)" in out
    assert "--init RUN|NAME fine-tune" in out
    assert "(default None)" not in out


def test_instances_help_names_every_output_it_writes(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    instances = out.split("--instances", 2)[2].split("--ome-zarr")[0]
    for written in ("labels/", "objects.csv", "counts.csv", "overlays/"):
        assert written in instances


@pytest.mark.parametrize("value", ["0,2", "0, 2", "[0, 2]"])
def test_list_flags_take_the_readme_syntax_and_yaml_lists(value):
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--channels", value,
                                      "--aug-zoom-range", value.replace("0", "0.5").replace("2", "2.5")])
    cfg = config_from_args(args)
    assert cfg.data.channels == [0, 2]
    assert cfg.data.augment.zoom_range == (0.5, 2.5)


def test_docs_flags_md_is_what_the_flags_say():
    assert DOCS.read_text() == parser_markdown(build_parser()), \
        "docs/flags.md is stale: run `unetlab flags --out docs/flags.md`"


def test_flags_command_writes_the_page(tmp_path, capsys):
    assert main(["flags", "--out", str(tmp_path / "flags.md")]) == 0
    text = (tmp_path / "flags.md").read_text()
    assert "## `unetlab train`" in text and "- `--channels A,B`: keep these image channels" in text
    assert "## `unetlab predict`" in text and "- `--tile TILE`: tile size in pixels (default 512)" in text
    # the config flags that lr-find shares with train are named once, not repeated
    assert text.count("`--aug-elastic X`") == 1


def test_only_the_given_commands_flags_are_built_after_global_options(capsys):
    """main builds the flags of the command it is given, wherever the global options put it."""
    with pytest.raises(SystemExit):
        main(["-q", "--threads", "1", "train", "--help"])
    assert "--aug-zoom-range" in capsys.readouterr().out
    assert main(["--threads", "1", "-q", "train", "--out", "x", "--channels", "0,2"]) == 2  # no --data
    assert "--data DIR is required" in capsys.readouterr().err
