"""Every write is atomic and a full disk is one line: the shared writer, export, streamed prediction, list flags."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from corpus.make_corpus import tiny_run
from unetlab.config import split_list
from unetlab.errors import UnetlabError
from unetlab.files import atomic_output, remove_stale_temporaries, write_bytes, write_text


def _left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_atomic_output_renames_on_success_and_deletes_on_failure(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    with atomic_output(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".table.") and tmp.suffix == ".csv"
        tmp.write_text("a,b\n")
        assert not target.exists()  # nothing under the final name until the block ends
    assert target.read_text() == "a,b\n"
    with pytest.raises(ValueError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise ValueError("writer failed")
    assert target.read_text() == "a,b\n" and _left(tmp_path) == ["table.csv"]


def test_a_full_disk_is_one_line_naming_the_file(tmp_path):
    def full(_tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UnetlabError) as err:
        with atomic_output(tmp_path / "x.json") as tmp:
            full(tmp)
    text = str(err.value)
    assert "x.json" in text and "No space left" in text and "free some disk space" in text and "\n" not in text
    assert _left(tmp_path) == []


def test_other_os_errors_are_not_disguised(tmp_path):
    with pytest.raises(OSError) as err, atomic_output(tmp_path / "x.bin"):
        raise OSError(errno.EIO, "I/O error")
    assert not isinstance(err.value, UnetlabError)


def test_outputs_get_umask_permissions_not_mkstemps_0600(tmp_path):
    p = write_bytes(tmp_path / "w.pt", b"abc", fsync=True)
    mask = os.umask(0)
    os.umask(mask)
    assert p.read_bytes() == b"abc" and (p.stat().st_mode & 0o777) == (0o666 & ~mask)


def test_remove_stale_temporaries_only_takes_names_of_its_own_form(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "mask.tif") as tmp:
        stale = tmp  # the name a killed process would leave behind
        raise KeyboardInterrupt
    stale.write_bytes(b"half")  # as if the process had died before cleaning up
    (tmp_path / ".hidden.tmp").write_text("not ours")
    write_text(tmp_path / "keep.txt", "ok")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert _left(tmp_path) == [".hidden.tmp", "keep.txt"]


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, fmt):
    from unetlab.config import ModelConfig
    from unetlab.inference import export as export_module
    from unetlab.models import build_model

    if fmt == "onnx":
        pytest.importorskip("onnx")
    model = build_model(ModelConfig(preset="unet", depth=2, base_width=4, in_channels=1, out_channels=1))
    writer = "_export_torchscript" if fmt == "torchscript" else "_export_onnx"

    def disk_full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, writer, disk_full)
    out = tmp_path / "exports" / f"model.{'pt' if fmt == 'torchscript' else 'onnx'}"
    with pytest.raises(UnetlabError, match="No space left on device"):
        export_module.export_model(model, fmt, out, in_channels=1)
    assert not out.exists() and _left(tmp_path) == []


def test_streamed_prediction_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from unetlab.inference import predict as predict_module
    from unetlab.inference import streaming

    run = tiny_run(tmp_path / "tiny")
    src = tmp_path / "big"
    src.mkdir()
    rng = np.random.default_rng(0)
    tifffile.imwrite(src / "big.tif", rng.integers(0, 4000, (300, 300), dtype=np.uint16))
    calls = {"n": 0}
    real = streaming.BandTiffWriter.write_rows

    def fill_up(self, y0, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, y0, rows)

    monkeypatch.setattr(streaming.BandTiffWriter, "write_rows", fill_up)
    out = tmp_path / "pred"
    with pytest.raises(UnetlabError, match="No space left on device"):
        predict_module.predict(run, src, out, probabilities=True, stream_threshold=10_000, tile=64, progress=False)
    assert calls["n"] == 2, "the streamed writer was not used"
    assert not [p for p in out.rglob("*") if p.is_file() and p.suffix in (".tif", ".tiff")], _left(out)
    assert not [p for p in out.rglob(".*") if p.is_file()], "a temporary was left behind"


@pytest.mark.parametrize("text, items", [
    ("[ab]*", ["[ab]*"]),                      # a glob keeps its brackets
    ("*Pos00[89]", ["*Pos00[89]"]),
    ("[a]x[b]", ["[a]x[b]"]),
    ("*Pos009, *Pos010", ["*Pos009", "*Pos010"]),
    ("[1, 2]", ["1", "2"]),                    # YAML-style list
    ("(3,4)", ["3", "4"]),
    ("1,2", ["1", "2"]),
    ("my file.tif,b.tif", ["my file.tif", "b.tif"]),  # spaces inside a name survive
])
def test_list_flags_keep_glob_brackets(text, items):
    assert split_list(text) == items


def test_val_groups_flag_keeps_brackets_through_the_config():
    from unetlab.config import RunConfig, apply_overrides

    cfg = apply_overrides(RunConfig(), {"val_groups": "[ab]*,*Pos00[89]"})
    assert list(cfg.data.val_groups) == ["[ab]*", "*Pos00[89]"]


def test_atomic_directory_replaces_whole_or_not_at_all(tmp_path):
    from unetlab.files import atomic_directory, remove_stale_temporaries

    target = tmp_path / "out" / "a.ome.zarr"
    with atomic_directory(target) as tmp:
        (tmp / "old").write_text("1")
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target) as tmp:
        (tmp / "new").write_text("2")
        raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["old"]  # a failed write leaves the old one whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.ome.zarr"]
    with atomic_directory(target) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.ome.zarr"]
    stale = target.parent / ".b.ome.zarr.abcd_123.tmp"  # left by a killed process
    (stale / "0").mkdir(parents=True)
    (stale / "0" / "0.0").write_bytes(b"x")
    assert remove_stale_temporaries(target.parent) == [stale]
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.ome.zarr"]
