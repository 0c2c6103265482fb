"""Layouts and inspect on the real datasets in ../shared/data (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from unetlab.data.inspect import inspect_dataset
from unetlab.data.layouts import detect_layout, load_dataset
from unetlab.data.layouts.common import read_mask_raw
from unetlab.data.rle import rle_encode

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
DSB = DATA / "dsb2018_train"
EPFL = DATA / "epfl_em" / "train"

pytestmark = pytest.mark.realdata
needs_dsb = pytest.mark.skipif(not (DSB / "stage1_train").is_dir(), reason=f"real data not found: {DSB}")
needs_epfl = pytest.mark.skipif(not EPFL.is_dir(), reason=f"real data not found: {EPFL}")


@needs_dsb
def test_dsb_folders_and_csv_are_detected_without_reading_masks():
    info = load_dataset(DSB / "stage1_train")
    assert info.layout == "kaggle_dsb" and len(info.samples) == 664
    assert sum(len(s.mask_paths) for s in info.samples) == 28986
    csv_info = load_dataset(DSB)
    assert csv_info.layout == "rle_csv" and {s.name for s in csv_info.samples} == {s.name for s in info.samples}


@needs_dsb
@pytest.mark.slow
def test_dsb_csv_decodes_to_the_mask_folders_and_masks_encode_to_its_runs():
    import csv

    folders = {s.name: s for s in load_dataset(DSB / "stage1_train").samples}
    from_csv = {s.name: s for s in load_dataset(DSB, layout="rle_csv").samples}
    rows: dict[str, set[str]] = {}
    with open(DSB / "stage1_train_labels.csv", newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for row in reader:
            rows.setdefault(row[0], set()).add(row[1])
    for name, sample in folders.items():
        union, runs = None, set()
        for p in sample.mask_paths:
            m = read_mask_raw(p) > 0
            runs.add(rle_encode(m))
            union = m if union is None else union | m
        assert runs == rows[name], name
        decoded = from_csv[name].load_mask()
        np.testing.assert_array_equal(decoded > 0, union, err_msg=name)
        assert decoded.max() == len(sample.mask_paths)


@needs_epfl
def test_epfl_inspect_reports_five_classes():
    assert detect_layout(EPFL) == "multiclass"
    d = inspect_dataset(EPFL, progress=False)
    assert d["task"] == "multiclass" and len(d["classes"]) == 6 and d["classes"][0] == "background"
    assert d["problems"] == [] and d["n_pairs"] == 27
    assert d["class_empty_images"]["axon"] == 19  # as SOURCE.md says
    assert 0.18 < d["class_fractions"]["membranes"] < 0.26
