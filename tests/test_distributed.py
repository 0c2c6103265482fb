"""Distributed training and prediction: the world checks, sharding, and real torchrun launches (2 CPU ranks, Gloo).

The torchrun tests train on small crops of the ISBI 2012 EM slices (../shared/data/isbi2012; skipped when absent)
and compare 2 ranks x batch 4 against 1 process x batch 8 with the same seed: both see the same patches per
optimiser step. GroupNorm and a pixel-mean loss (BCE) make the two mathematically identical (BatchNorm statistics
and the batch-level soft Dice are per rank under DDP), so they must agree to float rounding (tolerance 1e-3).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_data
from unetlab import distributed as D
from unetlab.cli import main
from unetlab.data.dataset import EpochSampler
from unetlab.errors import UnetlabError

DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TOL = 1e-3  # train loss and validation Dice, 2 ranks vs 1 process (observed differences are ~1e-6)
FLAGS = ["--preset", "unet", "--depth", "2", "--base-width", "8", "--norm", "group", "--patch-size", "64",
         "--samples-per-epoch", "16", "--loss", "bce", "--schedule", "constant", "--lr", "3e-3",
         "--val-fraction", "0.34", "--seed", "0", "--precision", "fp32", "--no-progress"]


@pytest.fixture
def clean_env(monkeypatch):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


# --- the world, without launching anything -------------------------------------------------------------------


def test_single_process_when_not_launched(clean_env):
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.enabled, info.is_main, info.owns_group) == (0, 1, False, True, False)
    assert D.all_reduce_sum(torch.tensor([2.0]), info).item() == 2.0
    assert D.any_rank(False, info) is False and D.any_rank(True, info) is True
    assert D.gather_objects({"a": 1}, info) == [{"a": 1}]
    assert D.run_on_main(lambda: 41 + 1, info) == 42


@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "2"}, "RANK is not"),
    ({"RANK": "1"}, "WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "outside WORLD_SIZE=2"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "not an integer"),
    ({"WORLD_SIZE": "4", "RANK": "1", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "3"}, "LOCAL_RANK=3"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "MASTER_ADDR is not set"),
])
def test_misconfigured_world_is_a_clear_error(clean_env, env, words):
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(UnetlabError, match=words) as exc:
        D.init_distributed("cpu")
    assert "torchrun" in str(exc.value) and "\n" not in str(exc.value)


def test_misconfigured_world_through_the_command_line(clean_env, tmp_path, capsys):
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("RANK", "1")
    from unetlab.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "d", n_images=2, size=(64, 64), seed=0)
    rc = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "MASTER_ADDR is not set" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_rank_device_refuses_more_ranks_than_gpus():
    info = D.DistInfo(rank=5, world_size=8, local_rank=torch.cuda.device_count(), local_world_size=8)
    with pytest.raises(UnetlabError, match="GPU"):
        D.rank_device(torch.device("cuda"), info)
    assert D.rank_device(torch.device("cpu"), info) == torch.device("cpu")


def test_samples_per_epoch_is_a_whole_number_of_global_batches():
    assert D.distributed_samples_per_epoch(17, 4, 1) == 17  # single process: as before
    assert D.distributed_samples_per_epoch(3, 4, 1) == 4
    assert D.distributed_samples_per_epoch(17, 4, 2) == 16
    assert D.distributed_samples_per_epoch(5, 4, 2) == 8
    assert D.distributed_samples_per_epoch(100, 4, 3, grad_accumulation=2) == 96
    for length in range(1, 60):
        n = D.distributed_samples_per_epoch(length, 3, 2, 2)
        counts = {len(EpochSampler(n, r, 2)) for r in range(2)}
        assert len(counts) == 1 and counts.pop() % (3 * 2) == 0  # same whole number of steps on each rank


@pytest.mark.parametrize("epoch", [0, 3])
def test_ranks_share_the_single_process_patches(epoch):
    length, world, batch = 32, 2, 4
    single = EpochSampler(length)
    single.set_epoch(epoch)
    ranks = []
    for r in range(world):
        s = EpochSampler(length, r, world)
        s.set_epoch(epoch)
        ranks.append(list(s))
    assert len(ranks[0]) == len(ranks[1]) == len(single) // world
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(single) == list(range(epoch * length, (epoch + 1) * length))
    # the global batch of step j (batch 4 on each of 2 ranks) is the single process's batch j of 8
    for j in range(length // (batch * world)):
        together = ranks[0][j * batch:(j + 1) * batch] + ranks[1][j * batch:(j + 1) * batch]
        assert sorted(together) == list(single)[j * batch * world:(j + 1) * batch * world]


# --- real launches: torchrun, 2 CPU ranks, Gloo -------------------------------------------------------------


def _crops(src: Path, dst: Path, names: list[str], size: int, offset: int = 0) -> None:
    dst.mkdir(parents=True)
    for i, name in enumerate(names):
        a = np.asarray(Image.open(src / name))
        y = x = offset + 37 * i % (a.shape[0] - size)
        Image.fromarray(a[y:y + size, x:x + size]).save(dst / name)


@pytest.fixture(scope="module")
def isbi_small(tmp_path_factory) -> dict[str, Path]:
    """Six 128 px crops of ISBI 2012 slices with their masks, and ten 96 px crops of its test slices."""
    isbi = shared_data("isbi2012")
    root = tmp_path_factory.mktemp("isbi")
    train = [f"{i:02d}.png" for i in range(6)]
    _crops(isbi / "images", root / "data" / "images", train, 128)
    _crops(isbi / "masks", root / "data" / "masks", train, 128)
    tests = sorted(p.name for p in (isbi / "test_images").glob("*.png"))[:10]
    _crops(isbi / "test_images", root / "new", tests, 96, offset=50)
    return {"data": root / "data", "new": root / "new", "root": root}


def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def _metrics(run: Path) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def single_run(isbi_small) -> Path:
    """The reference: one process, batch 8, three epochs."""
    run = isbi_small["root"] / "single"
    assert main(["train", "--data", str(isbi_small["data"]), "--out", str(run), *FLAGS, "--batch-size", "8",
                 "--epochs", "3", "--tensorboard", "false", "--device", "cpu"]) == 0
    return run


@pytest.fixture(scope="module")
def ddp_run(isbi_small) -> tuple[Path, subprocess.CompletedProcess]:
    """Two ranks, batch 4 each (the same global batch of 8), two epochs."""
    run = isbi_small["root"] / "ddp"
    r = _torchrun(["-m", "unetlab", "train", "--data", str(isbi_small["data"]), "--out", str(run), *FLAGS,
                   "--batch-size", "4", "--epochs", "2", "--tensorboard", "true", "--device", "cpu"])
    return run, r


def _assert_rows_match(a: dict, b: dict) -> None:
    assert int(a["epoch"]) == int(b["epoch"])
    for key in ("train_loss", "val_dice", "val_iou", "all_foreground_dice"):
        assert float(a[key]) == pytest.approx(float(b[key]), abs=TOL), key


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401  (what torch.utils.tensorboard needs)
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.realdata
# the run asks for TensorBoard, whose one event file this test counts: without the extra there is none
@pytest.mark.skipif(not _has_tensorboard(),
                    reason="the tensorboard extra is not installed (pip install 'unetlab[tensorboard]')")
def test_torchrun_training_matches_one_process_and_only_rank0_writes(ddp_run, single_run):
    run, r = ddp_run
    rows, ref = _metrics(run), _metrics(single_run)
    assert len(rows) == 2
    for a, b in zip(rows, ref[:2]):
        _assert_rows_match(a, b)
    assert float(rows[0]["val_dice"]) > float(rows[0]["all_foreground_dice"]) - 0.2  # a real validation score
    # one run folder, as one process writes it: no per-rank files, one TensorBoard event file
    files = _files(run)
    events = [f for f in files if f.startswith("tensorboard/")]
    assert len(events) == 1
    assert files - set(events) == _files(single_run)
    assert not [f for f in files if "rank" in f or f.endswith((".tmp", ".part"))]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["stop_reason"] == "finished"
    # logs and the result line from rank 0 only
    assert r.stderr.count("epoch 2/2") == 1
    assert r.stdout.count("run folder") == 1  # rank 0 alone prints the result


@pytest.mark.slow
@pytest.mark.realdata
def test_torchrun_resume_continues_like_an_uninterrupted_run(ddp_run, single_run):
    run, _ = ddp_run
    _torchrun(["-m", "unetlab", "train", "--resume", str(run), "--epochs", "3", "--no-progress"])
    rows, ref = _metrics(run), _metrics(single_run)
    assert [int(x["epoch"]) for x in rows] == [1, 2, 3]
    for a, b in zip(rows, ref):
        _assert_rows_match(a, b)
    mine = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    theirs = torch.load(single_run / "checkpoints" / "last.pt", weights_only=False)
    assert mine["epoch"] == theirs["epoch"] == 3 and mine["world_size"] == 2
    worst = max(float((mine["model"][k].float() - v.float()).abs().max()) for k, v in theirs["model"].items())
    assert worst < 1e-3


NAN_ON_RANK1 = """
import json, sys
from unetlab.config import RunConfig, apply_overrides
from unetlab import distributed as D
from unetlab.training.trainer import Trainer

cfg = apply_overrides(RunConfig(), json.loads(sys.argv[2]))
t = Trainer(cfg, sys.argv[1], progress=False)
loss_fn, calls = t.loss_fn, [0]

def poisoned(logits, target, weight=None):
    calls[0] += 1
    loss = loss_fn(logits, target, weight)
    return loss * float("nan") if t.dist.rank == 1 and calls[0] == 2 else loss

t.loss_fn = poisoned
t.fit()
D.cleanup(t.dist)
"""


@pytest.mark.slow
@pytest.mark.realdata
def test_a_non_finite_loss_on_one_rank_recovers_on_all(isbi_small, tmp_path):
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(textwrap.dedent(NAN_ON_RANK1))
    keys = {"root": str(isbi_small["data"]), "preset": "unet", "depth": 2, "base_width": 8, "norm": "group",
            "patch_size": 64, "samples_per_epoch": 16, "batch_size": 4, "epochs": 2, "tensorboard": False,
            "precision": "fp32", "device": "cpu", "val_fraction": 0.34}
    run = tmp_path / "run"
    _torchrun([str(script), str(run), json.dumps(keys)], timeout=180)  # a deadlock would time out here
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 2
    assert len(summary["recoveries"]) == 1 and "non-finite loss" in summary["recoveries"][0]["reason"]


@pytest.mark.slow
@pytest.mark.realdata
def test_torchrun_predict_writes_each_output_once_as_one_process_would(isbi_small, single_run):
    from unetlab.inference.predict import predict

    new = isbi_small["new"]
    one, two = isbi_small["root"] / "pred1", isbi_small["root"] / "pred2"
    s = predict(single_run, new, one, tile=64, probabilities=True, instances=True, rle=one / "sub.csv",
                device="cpu", progress=False)
    assert s["predicted"] == 10
    r = _torchrun(["-m", "unetlab", "predict", "--model", str(single_run), "--input", str(new), "--out", str(two),
                   "--tile", "64", "--probabilities", "--instances", "--rle", str(two / "sub.csv"), "--device",
                   "cpu", "--no-progress"])
    assert r.stdout.count("predicted 10 image(s)") == 1  # the summary covers every rank, printed by rank 0
    files = _files(two)
    assert files == _files(one)
    assert len([f for f in files if f.startswith("masks/")]) == 10
    for f in sorted(files):
        if f.endswith(".tif"):
            import tifffile

            a, b = tifffile.imread(one / f), tifffile.imread(two / f)
            assert a.shape == b.shape and np.allclose(a, b, atol=1e-6), f
        elif f.endswith(".png"):
            assert np.array_equal(np.asarray(Image.open(one / f)), np.asarray(Image.open(two / f))), f
        else:  # counts.csv, objects.csv, sub.csv: merged by rank 0 in input order
            assert (one / f).read_text() == (two / f).read_text(), f
