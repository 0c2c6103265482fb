"""Kill safety: SIGKILL lands mid-epoch, inside a checkpoint write and inside a prediction write; nothing under
a final name is ever half-written, --resume finishes the job and cleans up what the kill left behind.

Each kill happens in a subprocess whose driver hooks one function so that the process signals (a file appears)
and then sleeps exactly where the kill should land; the test then sends SIGKILL. Resuming runs in-process.
(Metric equality of a resumed run with an uninterrupted one is tests/test_trainer.py's business, not this file's.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from corpus.make_corpus import TINY_TRAIN_FLAGS, good_dataset, tiny_run
from unetlab.cli import main
from unetlab.data.io import read_image, read_label
from unetlab.runfolder import checkpoint_path, load_checkpoint

pytestmark = pytest.mark.slow

EPOCHS = 3
TRAIN_FLAGS = [*TINY_TRAIN_FLAGS, "--epochs", str(EPOCHS)]  # the last --epochs wins
PREDICT_FLAGS = ["--tile", "32", "--no-progress", "--instances", "--probabilities"]

TRAIN_MID_EPOCH = """
    import sys, time
    from pathlib import Path
    import unetlab.data.dataset as dataset
    from unetlab.cli import main

    signal_file = Path(sys.argv[1])
    original = dataset.PatchDataset.__getitem__

    def getitem(self, k):
        if k == self.length + 2:  # the third patch of the second epoch
            signal_file.touch()
            time.sleep(120)
        return original(self, k)

    dataset.PatchDataset.__getitem__ = getitem
    sys.exit(main(sys.argv[2:]))
"""

TRAIN_MID_CHECKPOINT = """
    import sys, time
    from pathlib import Path
    import unetlab.files as files
    from unetlab.cli import main

    signal_file = Path(sys.argv[1])
    original = files.write_atomic
    writes = []

    def write_atomic(path, writer):
        if Path(path).name == "last.pt":
            writes.append(path)
            if len(writes) == 2:  # the checkpoint after the second epoch: die half-way through writing it
                def half(tmp):
                    writer(tmp)
                    data = Path(tmp).read_bytes()
                    Path(tmp).write_bytes(data[: len(data) // 2])
                    signal_file.touch()
                    time.sleep(120)
                return original(path, half)
        return original(path, writer)

    files.write_atomic = write_atomic  # checkpoints are written by files.write_bytes -> write_atomic
    sys.exit(main(sys.argv[2:]))
"""

PREDICT_MID_WRITE = """
    import sys, time
    from pathlib import Path
    import unetlab.data.io as io
    from unetlab.cli import main

    signal_file = Path(sys.argv[1])
    original = io.write_atomic
    masks = []

    def write_atomic(path, writer):
        if Path(path).parent.name == "masks":
            masks.append(path)
            if len(masks) == 3:  # the third image: die half-way through writing its mask
                def half(tmp):
                    writer(tmp)
                    data = Path(tmp).read_bytes()
                    Path(tmp).write_bytes(data[: len(data) // 2])
                    signal_file.touch()
                    time.sleep(120)
                return original(path, half)
        return original(path, writer)

    io.write_atomic = write_atomic
    sys.exit(main(sys.argv[2:]))
"""


def run_until_signal_then_kill(driver: str, argv: list, tmp_path: Path) -> None:
    """Start ``driver`` with ``argv``, wait for its signal file, SIGKILL it, and wait for it to die."""
    signal_file = tmp_path / "reached"
    import torch

    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # as in-process: the same float sums
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(driver), str(signal_file), "-q",
                             *map(str, argv)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    try:
        while not signal_file.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the process ended before the kill point:\n{proc.stderr.read().decode()}")
            assert time.time() < deadline, "the kill point was not reached within 90 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def temporaries(folder: Path) -> list[Path]:
    """Files a killed atomic write leaves behind (hidden ``.name.XXXXXXXX.tmp.ext``)."""
    return sorted(p for p in folder.rglob(".*") if p.is_file() and ".tmp" in p.name)


def epochs_in_metrics(run: Path) -> list[int]:
    lines = (run / "metrics.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return good_dataset(tmp_path_factory.mktemp("data") / "cells", n=4)


def test_kill_mid_epoch_then_resume(data, tmp_path, capsys):
    run = tmp_path / "run"
    run_until_signal_then_kill(TRAIN_MID_EPOCH, ["train", "--data", data, "--out", run, *TRAIN_FLAGS], tmp_path)
    state = load_checkpoint(checkpoint_path(run, "last"))  # intact: the kill came during epoch 2
    assert state["epoch"] == 1 and epochs_in_metrics(run) == [1]
    assert not (run / "summary.json").exists() and temporaries(run) == []
    assert main(["-q", "train", "--resume", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    assert load_checkpoint(checkpoint_path(run, "last"))["epoch"] == EPOCHS
    assert epochs_in_metrics(run) == list(range(1, EPOCHS + 1))  # each epoch once, none lost or repeated


def test_kill_inside_a_checkpoint_write_never_corrupts_the_checkpoint(data, tmp_path, capsys):
    run = tmp_path / "run"
    run_until_signal_then_kill(TRAIN_MID_CHECKPOINT, ["train", "--data", data, "--out", run, *TRAIN_FLAGS],
                               tmp_path)
    left = temporaries(run / "checkpoints")
    assert len(left) == 1 and left[0].name.startswith(".last."), "the kill did not land inside the write"
    state = load_checkpoint(checkpoint_path(run, "last"))  # the previous checkpoint, whole
    assert state["epoch"] == 1
    load_checkpoint(checkpoint_path(run, "best"))
    assert main(["-q", "train", "--resume", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    assert temporaries(run) == [], "resume did not clean up the half-written temporary"
    assert load_checkpoint(checkpoint_path(run, "last"))["epoch"] == EPOCHS
    assert epochs_in_metrics(run) == list(range(1, EPOCHS + 1))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_kill_predict_then_resume_gives_the_uninterrupted_outputs(data, tmp_path, capsys):
    run = tiny_run(tmp_path / "tiny")
    images = data / "images"
    assert main(["-q", "predict", "--model", str(run), "--input", str(images), "--out", str(tmp_path / "full"),
                 *PREDICT_FLAGS]) == 0
    out = tmp_path / "killed"
    run_until_signal_then_kill(PREDICT_MID_WRITE, ["predict", "--model", run, "--input", images, "--out", out,
                                                   *PREDICT_FLAGS], tmp_path)
    left = temporaries(out)
    assert len(left) == 1 and left[0].parent.name == "masks", "the kill did not land inside the mask write"
    for p in out.rglob("*"):  # everything under a final name is whole
        if p.is_file() and not p.name.startswith("."):
            read_label(p) if p.parent.name in ("masks", "labels") else read_image(p)
    assert sorted(p.name for p in (out / "masks").iterdir() if not p.name.startswith(".")) == [
        "cells_000.png", "cells_001.png"]
    capsys.readouterr()
    assert main(["-q", "predict", "--model", str(run), "--input", str(images), "--out", str(out),
                 *PREDICT_FLAGS, "--resume"]) == 0
    assert "(2 already done)" in capsys.readouterr().out
    assert _files(out) == _files(tmp_path / "full")  # byte for byte, tables included; no temporary left
