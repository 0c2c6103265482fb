"""Our own calls into libraries raise no deprecation warnings (the suite's warnings were ours to fix)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from unetlab.data.io import read_image, write_image


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_a_three_channel_tiff_is_written_as_channels_without_warnings(tmp_path, dtype):
    """Three class probabilities (boundary target) once made tifffile warn that they would be stored as RGB."""
    channels = (np.random.default_rng(0).random((3, 16, 20)) * 1000).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        write_image(tmp_path / "p.tif", channels)
    back = read_image(tmp_path / "p.tif")
    assert back.shape == (3, 16, 20)
    assert np.array_equal(back, channels.astype(np.float32))
