"""Shared fixtures: synthetic datasets made on the fly and the location of the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Two threads on a quiet 2-core CI machine; UNETLAB_THREADS=1 where the machine is shared with other jobs.
torch.set_num_threads(int(os.environ.get("UNETLAB_THREADS") or max(1, min(2, os.cpu_count() or 1))))

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def shared_data(name: str) -> Path:
    """Path of a real dataset in ../shared/data, skipping the test when it is absent."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"real dataset ../shared/data/{name} is not available on this machine")
    return p


@pytest.fixture(scope="session")
def synthetic_cells(tmp_path_factory) -> Path:
    """A small paired dataset of synthetic 16-bit fluorescence cells (10 images of 128x128)."""
    from unetlab.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("cells")
    return write_synthetic_dataset(root, n_images=10, size=(128, 128), seed=3)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared
    2-core machine two spinning OpenMP threads are many times slower, and subprocesses run with one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> Path:
    """Six synthetic 96x96 cell images with masks, made once per module."""
    from unetlab.data.synthetic import write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("cells"), n_images=6, size=(96, 96), seed=0)
