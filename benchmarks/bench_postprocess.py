"""Time post-processing (probabilities -> instance labels) and object matching on a synthetic 1024x1024 image
with ~300 nuclei, on one core; prints a table and writes JSON to benchmarks/results/bench_postprocess.json.

    python benchmarks/bench_postprocess.py [--size 1024] [--objects 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from unetlab.config import PostprocessConfig  # noqa: E402
from unetlab.data.targets import make_target  # noqa: E402
from unetlab.evaluation.metrics import match_objects  # noqa: E402
from unetlab.inference.postprocess import probabilities_to_labels  # noqa: E402


def synthetic_nuclei(size: int, n: int, seed: int = 0) -> np.ndarray:
    """Label image of ``n`` elliptical nuclei at random places; later nuclei are drawn under earlier ones."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for i in range(1, n + 1):
        cy, cx = rng.uniform(10, size - 10, 2)
        a, b = rng.uniform(6, 14, 2)
        t = rng.uniform(0, np.pi)
        y0, y1 = int(max(cy - 15, 0)), int(min(cy + 16, size))
        x0, x1 = int(max(cx - 15, 0)), int(min(cx + 16, size))
        dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
        u = (dx * np.cos(t) + dy * np.sin(t)) / a
        v = (-dx * np.sin(t) + dy * np.cos(t)) / b
        inside = (u * u + v * v <= 1) & (lab[y0:y1, x0:x1] == 0)
        lab[y0:y1, x0:x1][inside] = i
    return lab


def fake_probabilities(lab: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """A blurred, noisy stand-in for a network's output of target ``kind``."""
    rng = np.random.default_rng(seed)
    t = make_target(lab, kind)
    if kind == "binary":
        p = ndi.gaussian_filter(t.astype(np.float32), 1.0)[None]
    elif kind == "boundary":
        p = np.stack([ndi.gaussian_filter((t == k).astype(np.float32), 1.0) for k in range(3)])
    elif kind == "flow":
        p = np.stack([ndi.gaussian_filter(t[0], 1.0), *((ndi.gaussian_filter(c, 1.0) + 1) / 2 for c in t[1:])])
    else:
        p = np.stack([ndi.gaussian_filter((t > 0).astype(np.float32), 1.0), ndi.gaussian_filter(t, 1.0)])
    p = np.clip(p + rng.normal(0, 0.05, p.shape).astype(np.float32), 0, 1)
    if kind == "boundary":
        p /= p.sum(0, keepdims=True) + 1e-6
    return p.astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=C.description(__doc__))
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--objects", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "bench_postprocess.json"))
    args = ap.parse_args()
    lab = synthetic_nuclei(args.size, args.objects)
    n_true = int(len(np.unique(lab)) - 1)
    cases = [("binary", "none"), ("binary", "distance"), ("boundary", "interior"), ("boundary", "distance"), ("distance", "distance"),
             ("flow", "flow")]
    rows = []
    for kind, markers in cases:
        prob = fake_probabilities(lab, kind)
        cfg = PostprocessConfig(markers=markers)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pred = probabilities_to_labels(prob, kind, cfg)
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        m = match_objects(pred, lab)
        t_match = time.perf_counter() - t0
        rows.append({
            "kind": kind, "markers": markers, "size": args.size, "n_true": n_true, "n_pred": m["n_pred"],
            "seconds_median": float(np.median(times)), "seconds_min": float(np.min(times)),
            "match_seconds": t_match, "ap50": m["ap"][0], "ap_mean": m["ap_mean"],
        })
    print(f"{'kind':<9} {'markers':<9} {'objects':>7} {'found':>6} {'median s':>9} {'match s':>8} {'AP50':>6} {'mAP':>6}")
    for r in rows:
        print(f"{r['kind']:<9} {r['markers']:<9} {r['n_true']:>7} {r['n_pred']:>6} {r['seconds_median']:>9.3f} "
              f"{r['match_seconds']:>8.3f} {r['ap50']:>6.3f} {r['ap_mean']:>6.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "threads": os.environ["OMP_NUM_THREADS"]}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
