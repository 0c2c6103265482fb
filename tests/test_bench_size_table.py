"""benchmarks/bench_accuracy.py --sizes: the table it prints from its rows."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_accuracy as B  # noqa: E402


def row(zoom: float, n: int, within: float, **extra) -> dict:
    r = {"collection": "DSB val split", "zoom": zoom, "n_images": n, "auto_ap50": 0.8, "true_ap50": 0.83,
         "auto_dsb_score": 0.6, "true_dsb_score": 0.62, "auto_err_median": 0.03, "auto_err_p90": 0.15,
         "auto_within25": within, "auto_seconds": 40.0, "none_seconds": 20.0}
    return {**r, **extra}


def test_size_table_shows_every_mode_run_and_pools_the_size_shares():
    one_pass = {"auto_1pass_ap50": 0.71, "auto_1pass_err_median": 0.1, "auto_1pass_err_p90": 0.4,
                "auto_1pass_within25": 0.5}
    text = B.size_table([row(1.0, 80, 1.0, **one_pass), row(2.0, 20, 0.5, **one_pass)], ("true", "none", "auto"))
    header, _, first, second = text.splitlines()[:4]
    assert "AP@0.5 auto_1pass" in header and "| 0.710 | 0.10 / 0.40 (50%) |" in first
    assert "| x2 | 20 | 0.800 | 0.830 | -0.030 |" in second and "| 20 / 40 |" in second
    assert "within 25% of the true median diameter on 90% of 100 images" in text  # (80 + 10) / 100
    assert "took 80 s against 40 s for --diameter none (2.00x)" in text
    only_auto = {k: v for k, v in row(1.0, 80, 1.0).items() if k != "none_seconds"}
    plain = B.size_table([only_auto], ("true", "auto"))
    assert "auto_1pass" not in plain and "| - / 40 |" in plain and "--diameter none" not in plain
