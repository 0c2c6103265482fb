"""Correctness of the fast paths: BN folding, channels-last, tile batching, reduced precision, streaming of huge
TIFF images (read by rows, normalised from a subsample, written by bands) and parallel data loading.
Timing is never asserted here (see benchmarks/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from unetlab.config import RunConfig, apply_overrides
from unetlab.data.dataset import default_num_workers
from unetlab.data.io import normalize
from unetlab.data.synthetic import make_synthetic_cells, write_synthetic_dataset
from unetlab.errors import UnetlabError
from unetlab.inference.predict import predict
from unetlab.inference.predictor import Predictor, make_predict_fn
from unetlab.inference.streaming import (
    TiffRows,
    band_normalizer,
    open_tiff_rows,
    should_stream,
    subsample_stride,
)
from unetlab.inference.tiling import tile_predict
from unetlab.runfolder import load_run
from unetlab.training import train

TINY = {"preset": "unet", "depth": 2, "base_width": 8, "patch_size": 64, "batch_size": 8, "samples_per_epoch": 64,
        "lr": 5e-3, "tensorboard": False, "val_fraction": 0.2, "seed": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny U-Net trained for a few seconds on synthetic cells (masks with real structure)."""
    root = tmp_path_factory.mktemp("speed")
    data = write_synthetic_dataset(root / "cells", n_images=8, size=(128, 128), seed=3)
    cfg = apply_overrides(RunConfig(), {**TINY, "root": str(data), "epochs": 5})
    train(cfg, root / "run", progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


def cells_image(h: int, w: int, seed: int = 7) -> np.ndarray:
    """A synthetic 16-bit cell image; big ones are a mosaic of flipped 256 px fields (fast to make)."""
    if h * w <= 300 * 300:
        return make_synthetic_cells((h, w), seed=seed)[0]
    f = make_synthetic_cells((256, 256), seed=seed)[0]
    tile = np.block([[f, f[:, ::-1]], [f[::-1], f[::-1, ::-1]]])
    return np.tile(tile, (-(-h // 512), -(-w // 512)))[:h, :w].copy()


# --- the predictor's fast paths give the plain module's answer ----------------------------------------------


def test_fold_channels_last_and_batching_match_the_plain_module(run):
    image = normalize(cells_image(200, 176)[None].astype(np.float32))
    dev = torch.device("cpu")
    kw = dict(tile=64, overlap=0.25, align=4, device=dev)
    plain = make_predict_fn(run.model, "sigmoid", dev, "fp32", channels_last=False, fuse=False)
    fast = make_predict_fn(run.model, "sigmoid", dev, "fp32", channels_last=True, fuse=True)
    ref = tile_predict(plain, image, 1, batch_size=1, **kw)
    for batch in (1, 3, 8):
        out = tile_predict(fast, image, 1, batch_size=batch, **kw)
        assert out.shape == (1, 200, 176)
        np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-5)
    assert 0.05 < float((ref > 0.5).float().mean()) < 0.95  # a real mask, not a constant


@pytest.mark.parametrize("fuse", [True, False])
def test_predict_fn_leaves_the_run_model_untouched(run, fuse):
    run.model.train()
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    make_predict_fn(run.model, "sigmoid", torch.device("cpu"), "fp32", channels_last=True, fuse=fuse)
    after = run.model.state_dict()
    assert run.model.training  # not switched to eval behind the caller's back
    run.model.eval()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.is_contiguous() for v in after.values())  # memory format not changed in place
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in run.model.modules())


def test_bf16_masks_agree_with_fp32_on_at_least_999_per_mille(run):
    image = cells_image(192, 192, seed=11)[None].astype(np.float32)
    fp32 = Predictor.from_run(run, device="cpu", precision="fp32", tile=192).predict_image(image)
    bf16 = Predictor.from_run(run, device="cpu", precision="bf16", tile=192).predict_image(image)
    assert not np.array_equal(fp32, bf16)  # bf16 really ran
    m32, m16 = fp32[0] > 0.5, bf16[0] > 0.5
    assert 0.05 < m32.mean() < 0.95
    assert (m32 == m16).mean() >= 0.999


def test_auto_precision_is_fp32_without_native_bf16(monkeypatch):
    from unetlab.inference import predictor as P

    monkeypatch.setattr(P, "cpu_supports_bf16", lambda: False)
    assert P.resolve_precision("auto", torch.device("cpu")) is None
    monkeypatch.setattr(P, "cpu_supports_bf16", lambda: True)
    assert P.resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UnetlabError):
        P.resolve_precision("fp8", torch.device("cpu"))


# --- reading huge TIFF files by rows ----------------------------------------------------------------------


LAYOUTS = {
    "raw": dict(),
    "strips_zlib": dict(compression="zlib", rowsperstrip=37),
    "tiles_zlib": dict(compression="zlib", tile=(64, 48)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiff_rows_reads_any_window_like_the_whole_array(tmp_path, layout):
    a = (np.random.default_rng(0).random((301, 257)) * 60000).astype(np.uint16)
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, a, **LAYOUTS[layout])
    with open_tiff_rows(path) as v:
        assert v.shape == (1, 301, 257)
        for y0, y1, x0, x1 in [(0, 301, 0, 257), (36, 38, 5, 250), (100, 229, 47, 49), (290, 301, 0, 1)]:
            np.testing.assert_array_equal(v[:, y0:y1, x0:x1], a[None, y0:y1, x0:x1])
        np.testing.assert_array_equal(v[:, ::5, ::3], a[None, ::5, ::3])


@pytest.mark.parametrize("kw", [dict(photometric="rgb", tile=(32, 32), compression="zlib"),
                                dict(photometric="rgb"),
                                dict(photometric="rgb", planarconfig="separate", compression="zlib",
                                     rowsperstrip=20),
                                dict(photometric="rgb", planarconfig="separate"),
                                dict(photometric="minisblack", compression="zlib"),  # one page per channel
                                dict(photometric="minisblack")])
def test_tiff_rows_channels_first_for_rgb_and_planar(tmp_path, kw):
    a = (np.random.default_rng(1).random((3, 90, 70)) * 255).astype(np.uint8)
    data = np.moveaxis(a, 0, -1) if "planarconfig" not in kw and kw["photometric"] == "rgb" else a
    tifffile.imwrite(tmp_path / "c.tif", data, **kw)
    with TiffRows(tmp_path / "c.tif") as v:
        assert v.shape == (3, 90, 70)
        np.testing.assert_array_equal(v[:, 10:50, 3:66], a[:, 10:50, 3:66])


def test_band_normalizer_matches_in_memory_normalisation(tmp_path):
    a = cells_image(1100, 1000)  # > 1 Mpx: both paths take percentiles of the same stride-4 subsample
    tifffile.imwrite(tmp_path / "n.tif", a, compression="zlib", tile=(128, 128))
    full = normalize(a[None].astype(np.float32))
    with TiffRows(tmp_path / "n.tif") as v:
        assert subsample_stride(1100, 1000) == 4
        for mode in ("percentile", "minmax", "dtype", "none"):
            norm = band_normalizer(v, mode)
            np.testing.assert_array_equal(norm(v[:, 500:620, :]),
                                          normalize(a[None].astype(np.float32), mode)[:, 500:620])
        np.testing.assert_array_equal(band_normalizer(v, "percentile")(a[None, :10]), full[:, :10])


def test_subsample_stride_bounds_the_sample():
    assert subsample_stride(900, 900) == 1
    assert subsample_stride(16384, 16384) == 4
    h = w = 100_000
    s = subsample_stride(h, w)
    assert (h // s) * (w // s) <= 32_000_000 * 1.01


# --- predict streams huge TIFF images and gets the in-memory answer --------------------------------------------


@pytest.mark.parametrize("layout", ["raw", "tiles_zlib"])
def test_streamed_prediction_equals_in_memory_prediction(run_dir, tmp_path, layout):
    img = cells_image(700, 610, seed=5)
    src = tmp_path / "in"
    src.mkdir()
    tifffile.imwrite(src / "big.tif", img, **LAYOUTS[layout])
    assert should_stream(src / "big.tif", 400_000) and not should_stream(src / "big.tif", None)
    kw = dict(tile=256, batch_size=3, device="cpu", probabilities=True, progress=False)
    predict(run_dir, src, tmp_path / "mem", stream_threshold=None, **kw)
    predict(run_dir, src, tmp_path / "stream", stream_threshold=400_000, **kw)
    mem_mask = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "mem" / "masks" / "big.png"))
    stream_mask = tifffile.imread(tmp_path / "stream" / "masks" / "big.tif")
    with tifffile.TiffFile(tmp_path / "stream" / "masks" / "big.tif") as t:
        assert t.pages[0].is_tiled and t.pages[0].compression != 1  # written tile by tile, compressed
    np.testing.assert_array_equal(stream_mask, mem_mask)
    assert 0.05 < (stream_mask > 0).mean() < 0.95
    p_mem = tifffile.imread(tmp_path / "mem" / "probabilities" / "big.tif")
    p_stream = tifffile.imread(tmp_path / "stream" / "probabilities" / "big.tif")
    np.testing.assert_array_equal(p_stream.reshape(p_mem.shape), p_mem)
    assert not list((tmp_path / "stream").rglob(".*tmp*"))  # no temporary files left behind


def test_streamed_image_refuses_whole_image_outputs_with_one_line(run_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    tifffile.imwrite(src / "big.tif", cells_image(300, 300))
    with pytest.raises(UnetlabError, match="tile by tile") as e:
        predict(run_dir, src, tmp_path / "o", instances=True, stream_threshold=50_000, progress=False)
    assert "\n" not in str(e.value)


def test_stream_threshold_flag_sets_when_predict_streams(run_dir, tmp_path, capsys):
    from unetlab.cli import main

    src = tmp_path / "in"
    src.mkdir()
    tifffile.imwrite(src / "big.tif", cells_image(300, 300))  # 0.09 Mpx
    base = ["predict", "--model", str(run_dir), "--input", str(src), "--tile", "256", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "s"), "--stream-threshold", "0.05"]) == 0
    assert (tmp_path / "s" / "masks" / "big.tif").exists()  # streamed: the mask is written as a tiled TIFF
    assert main([*base, "--out", str(tmp_path / "m"), "--stream-threshold", "0"]) == 0
    assert (tmp_path / "m" / "masks" / "big.png").exists()  # 0 = never stream
    capsys.readouterr()


# --- data loading in worker processes -----------------------------------------------------------------------


def test_worker_processes_give_the_same_batches_as_the_main_process(tmp_path):
    from unetlab.training.trainer import Trainer

    data = write_synthetic_dataset(tmp_path / "cells", n_images=4, size=(96, 96), seed=2)
    batches = {}
    for workers in (0, 2):
        cfg = apply_overrides(RunConfig(), {**TINY, "root": str(data), "epochs": 1, "samples_per_epoch": 16,
                                            "num_workers": workers, "border_weight": True})
        t = Trainer(cfg, None, progress=False)
        t.sampler.set_epoch(1)
        batches[workers] = [{k: v.clone() for k, v in b.items()} for b in t.loader]
        assert t.loader.num_workers == workers and t.loader.persistent_workers == (workers > 0)
        if workers:  # made once before the workers fork, not once per worker
            assert len(t.train_cache_dataset._weights) == len(t.train_cache_dataset.cache)
    assert len(batches[0]) == len(batches[2]) == 2
    for a, b in zip(batches[0], batches[2]):
        assert a.keys() == b.keys() == {"image", "target", "weight"}
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_default_num_workers_keeps_cpu_training_in_process(tmp_path):
    from unetlab.training.trainer import Trainer

    assert default_num_workers("cpu", cores=64) == 0
    assert default_num_workers("cuda", cores=1) == 0
    assert default_num_workers("cuda", cores=2) == 1
    assert default_num_workers("cuda", cores=16) == 4
    assert default_num_workers("cuda", cores=16, processes=8) == 1
    data = write_synthetic_dataset(tmp_path / "cells", n_images=3, size=(96, 96), seed=2)
    cfg = apply_overrides(RunConfig(), {**TINY, "root": str(data), "epochs": 1, "num_workers": -1})
    assert Trainer(cfg, None, progress=False).loader.num_workers == 0  # 'auto' on CPU
