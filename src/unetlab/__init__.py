"""unetlab: train U-Nets on folders of microscopy images and masks; predict masks, instance labels and counts.

The public API mirrors the command line::

    import unetlab
    cfg = unetlab.RunConfig.load("config.yaml")            # or unetlab.config_with(root="data", epochs=20)
    result = unetlab.train(cfg, "runs/r1")                   # a run folder
    unetlab.predict("runs/r1", "new_images/", "predictions/", instances=True)
    opts = unetlab.PredictOptions(tile=256, instances=True)  # the same settings as one object
    unetlab.predict("runs/r1", "new_images/", "predictions/", options=opts)
    report = unetlab.evaluate("predictions/masks", "truth/")
    run = unetlab.load_run("runs/r1")                        # model + config for your own code
    unetlab.list_presets()                                   # the model presets, as in `unetlab models`
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

from ._version import __version__
from .config import RunConfig, apply_overrides
from .errors import UnetlabError


def config_with(**overrides: Any) -> RunConfig:
    """The default RunConfig with leaf keys replaced, e.g. ``config_with(root="data", lr=1e-3, preset="unet-slim")``."""
    return apply_overrides(RunConfig(), overrides)


@contextlib.contextmanager
def console_logging() -> Iterator[None]:
    """While the block runs, unetlab's INFO lines (epoch lines, estimates) go to stderr when the application has
    configured no logging (no handler on the root or the ``unetlab`` logger, as in a notebook); else nothing."""
    root, pkg = logging.getLogger(), logging.getLogger("unetlab")
    if root.handlers or pkg.handlers:
        yield
        return
    handler = logging.StreamHandler()  # the stderr of the moment (a notebook's, a test's capture)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = pkg.level
    pkg.addHandler(handler)
    if level == logging.NOTSET:
        pkg.setLevel(logging.INFO)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(level)


def _with_console_logging(fn: Any) -> Any:
    """``fn`` run inside :func:`console_logging`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with console_logging():
            return fn(*args, **kwargs)

    return wrapper


def __getattr__(name: str) -> Any:
    """The parts of the public API imported on first use, so `import unetlab` stays light (no torch until needed)."""
    if name == "train":
        from .training import train

        return _with_console_logging(train)  # a notebook sees the epoch lines too
    if name == "predict":
        from .inference.predict import predict

        return predict
    if name == "PredictOptions":
        from .inference.options import PredictOptions

        return PredictOptions
    if name == "evaluate":
        from .evaluation import evaluate

        return evaluate
    if name == "load_run":
        from .runfolder import load_run

        return load_run
    if name == "load_dataset":
        from .data.layouts import load_dataset

        return load_dataset
    if name == "list_presets":
        from .models.presets import list_presets

        return list_presets
    raise AttributeError(f"module 'unetlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names with the lazily imported API (so help(), dir() and tab completion list them)."""
    return sorted(set(globals()) | set(__all__))


__all__ = ["PredictOptions", "RunConfig", "UnetlabError", "__version__", "config_with", "console_logging", "evaluate",
           "list_presets", "load_dataset", "load_run", "predict", "train"]
