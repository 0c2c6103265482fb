"""Process settings: thread count from the flag or the environment, the automatic channels-last rule, help order."""

from __future__ import annotations

import pytest
import torch

from unetlab._runtime import set_threads, use_channels_last
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
