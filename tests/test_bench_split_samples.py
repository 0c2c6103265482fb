"""benchmarks/_common.split_samples: which images of a run's split the split benchmarks (bench_errors,
bench_prominence) score."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _common as C  # noqa: E402
from unetlab.data.io import write_image  # noqa: E402


def test_split_samples_counts_each_image_file_once(tmp_path):
    """Copies of one image under two names (the nuclei recipe lists tissue images three times) are scored once;
    names missing from the data are skipped; --limit draws a fixed subset."""
    data = tmp_path / "data"
    for sub in ("images", "masks"):
        (data / sub).mkdir(parents=True)
    for name in ("bd_x", "dsb_a", "dsb_b"):
        write_image(data / "images" / f"{name}.tif", np.full((16, 16), 100, np.uint16))
        write_image(data / "masks" / f"{name}.tif", np.pad(np.ones((4, 4), np.uint16), 6))
    for sub in ("images", "masks"):
        (data / sub / "bd2_x.tif").symlink_to(data / sub / "bd_x.tif")
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.json").write_text(json.dumps({"train": ["bd_x", "bd2_x", "dsb_a", "gone", "dsb_b"], "val": []}))
    names = [s.name for s in C.split_samples(run, data, "train", None, 0)]
    assert names == ["bd_x", "dsb_a", "dsb_b"]
    one = [s.name for s in C.split_samples(run, data, "train", None, 2)]
    assert len(one) == 2 and one == [s.name for s in C.split_samples(run, data, "train", None, 2)]
    with pytest.raises(SystemExit, match="no val image"):
        C.split_samples(run, data, "val", None, 0)
