"""`unetlab models` reads the cards and the presets' recorded facts: it builds, probes and loads no network."""

from __future__ import annotations

import subprocess
import sys

import pytest

from unetlab.models.presets import PRESET_FACTS, PRESETS, measure_preset


def test_models_command_imports_no_inference_and_loads_no_weights():
    code = ("import sys, torch\n"
            "torch.load = lambda *a, **k: sys.exit('weights loaded')\n"
            "from unetlab.cli import main\n"
            "assert main(['-q', 'models']) == 0\n"
            "heavy = [m for m in ('unetlab.inference', 'unetlab.training', 'torch._dynamo') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "nuclei" in r.stdout and "resnet34-unet" in r.stdout and "1027 px" in r.stdout


def test_every_preset_has_recorded_facts():
    assert set(PRESET_FACTS) == set(PRESETS)


@pytest.mark.parametrize("name", ["unet", "unet-slim", "unet-paper-same",
                                  pytest.param("unet-paper", marks=pytest.mark.slow),
                                  pytest.param("resnet34-unet", marks=pytest.mark.slow)])
def test_recorded_preset_facts_are_what_the_networks_measure(name):
    assert measure_preset(name) == PRESET_FACTS[name]
