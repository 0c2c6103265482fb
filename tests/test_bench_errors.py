"""The error analysis of benchmarks/bench_errors.py: its ceiling and its kinds of misses."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_errors as B  # noqa: E402
from unetlab.config import PostprocessConfig  # noqa: E402
from unetlab.evaluation.metrics import match_objects  # noqa: E402
from unetlab.inference.postprocess import probabilities_to_labels  # noqa: E402


def touching_discs() -> np.ndarray:
    yy, xx = np.mgrid[:64, :96]
    lab = np.zeros((64, 96), np.int32)
    for i, (cy, cx) in enumerate([(32, 20), (32, 37), (32, 54), (12, 80), (50, 80)], start=1):
        lab[((yy - cy) ** 2 + (xx - cx) ** 2 < 81) & (lab == 0)] = i  # discs 0-2 touch in a row
    return lab


@pytest.mark.parametrize("kind", ["distance", "boundary", "flow"])
def test_the_ceiling_separates_touching_objects(kind):
    lab = touching_discs()
    labels = probabilities_to_labels(B.ideal_probabilities(lab, kind), kind, PostprocessConfig(min_size=10))
    assert match_objects(labels, lab)["ap"][0] == 1.0
    merged = probabilities_to_labels(B.ideal_probabilities(lab, "binary"), "binary", PostprocessConfig())
    assert merged.max() == 3  # a binary mask cannot separate them: the three touching discs become one


def test_misses_are_sorted_by_kind():
    truth = touching_discs()
    pred = truth.copy()
    pred[(truth == 2) | (truth == 3)] = 1  # the three touching discs merged into one prediction
    pred[truth == 4] = 0  # object 4 not found
    cols = np.broadcast_to(np.arange(96)[None, :], truth.shape)
    pred[(truth == 5) & (cols > 77)] = 8  # object 5 cut in three strips
    pred[(truth == 5) & (cols > 82)] = 9
    raw = (truth > 0) * 100.0
    raw[truth == 4] = 20.0  # object 4 is dim
    rows = B.object_rows(pred, truth, raw)
    kinds = [B.miss_kind(r) for r in rows]
    assert kinds == ["merged", "merged", "merged", "not found", "split"]
    assert rows[3]["brightness"] == pytest.approx(0.2)
    table = B.binned(rows, "brightness", B.BRIGHTNESS_BINS)
    assert [(t["bin"], t["objects"], t["missed"]) for t in table] == [("min-0.25", 1, 1), ("0.75-1", 4, 4)]
    assert B.miss_kind({"area": 100, "iou": 0.7, "pred_area": 110}) is None
