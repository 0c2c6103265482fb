"""Process settings: thread count from the flag or the environment, the automatic channels-last rule, help order,
`train.deterministic`, seeding and the device choice."""

from __future__ import annotations

import os

import pytest
import torch

from unetlab._runtime import (
    CUBLAS_WORKSPACE,
    resolve_device,
    seed_everything,
    set_deterministic,
    set_threads,
    use_channels_last,
)
from unetlab.cli import build_parser, main
from unetlab.errors import UnetlabError


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_come_from_the_flag_then_the_environment(monkeypatch, restore_threads):
    monkeypatch.setenv("UNETLAB_THREADS", "1")
    torch.set_num_threads(2)
    set_threads(None)
    assert torch.get_num_threads() == 1
    set_threads(2)  # the flag wins over the environment
    assert torch.get_num_threads() == 2
    monkeypatch.delenv("UNETLAB_THREADS")
    set_threads(None)  # neither: left alone
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("env", ["two", "1.5"])
def test_a_bad_thread_setting_is_a_user_error(monkeypatch, env, restore_threads):
    monkeypatch.setenv("UNETLAB_THREADS", env)
    with pytest.raises(UnetlabError, match="UNETLAB_THREADS"):
        set_threads(None)


def test_threads_zero_on_the_command_line_is_one_line_and_exit_2(capsys, restore_threads):
    assert main(["--threads", "0", "models"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["unetlab models: error: --threads must be at least 1 (got 0)"]


def test_channels_last_is_automatic_per_device_and_pass():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert not use_channels_last(None, cpu)  # CPU training: measured slower in channels-last
    assert use_channels_last(None, cuda)
    assert use_channels_last(None, cpu, training=False)  # inference gains from it everywhere
    assert use_channels_last(True, cpu) and not use_channels_last(False, cuda)  # an explicit setting wins


def test_help_lists_the_main_journey_first():
    help_text = build_parser().format_help()
    positions = [help_text.index(f"    {name} ") for name in ("demo", "train", "predict", "evaluate", "weightmap")]
    assert positions == sorted(positions)


@pytest.fixture
def restore_determinism():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def test_deterministic_sets_what_pytorch_users_expect(monkeypatch, restore_determinism):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    set_deterministic(False, torch.device("cpu"))  # off: the process's settings are left alone
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    set_deterministic(True, torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # only CUDA needs it
    set_deterministic(True, torch.device("cuda"))  # a device object needs no GPU
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE


def test_train_deterministic_true_makes_the_run_deterministic(cells, tmp_path, restore_determinism, one_thread):
    from unetlab.config import RunConfig, apply_overrides
    from unetlab.training import train

    tiny = {"root": str(cells), "preset": "unet", "depth": 2, "base_width": 8, "patch_size": 64, "batch_size": 8,
            "samples_per_epoch": 16, "epochs": 1, "tensorboard": False, "tune_postprocess": False}
    torch.use_deterministic_algorithms(False)
    train(apply_overrides(RunConfig(), tiny), tmp_path / "off", progress=False)
    assert not torch.are_deterministic_algorithms_enabled()  # before the fix --deterministic true did this too
    train(apply_overrides(RunConfig(), {**tiny, "deterministic": True}), tmp_path / "on", progress=False)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


def test_seeding_does_not_pretend_to_fix_string_hashing(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    seed_everything(3)
    assert "PYTHONHASHSEED" not in os.environ  # read only at interpreter start-up: setting it later does nothing


def test_auto_device_is_cuda_or_cpu_and_mps_only_when_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("mps") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UnetlabError, match="no Apple GPU"):
        resolve_device("mps")
    with pytest.raises(UnetlabError, match="no CUDA GPU"):
        resolve_device("cuda")
