"""The run folder: the contract between training and inference.

    RUN_DIR/config.yaml          the RunConfig (data, model, training, post-processing)
    RUN_DIR/split.json           training and validation sample names
    RUN_DIR/model.json           what inference needs: channels, classes, target kind, normalisation
    RUN_DIR/checkpoints/last.pt  full training state (model, optimiser, schedule, RNG, epoch) for --resume
    RUN_DIR/checkpoints/best.pt  model weights with the best validation score
    RUN_DIR/metrics.csv, curves.png, summary.json, events (TensorBoard)
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import UnetlabError
from .files import write_bytes, write_text

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def checkpoint_path(run_dir: Path, which: str = "last") -> Path:
    """Path of the ``last`` or ``best`` checkpoint of a run."""
    return Path(run_dir) / "checkpoints" / f"{which}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists and dicts only) atomically and flushed to disk."""
    state = {"format": CHECKPOINT_FORMAT, "unetlab_version": __version__, **state}
    buf = io.BytesIO()
    torch.save(state, buf)
    return write_bytes(path, buf.getvalue(), fsync=True)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without running code from it (``weights_only=True``).

    A missing, damaged or foreign file is a one-line error naming it; a file that would need arbitrary Python
    objects to load (a pickle that could run code) is refused, never executed.
    """
    path = Path(path)
    if not path.exists():
        raise UnetlabError("checkpoint not found", path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if unsafe:
            raise UnetlabError(f"refused: the file asks to load Python object '{unsafe.group(1)}', which could run "
                               "code; unetlab checkpoints hold only tensors and plain values", path,
                               "only use model files from a source you trust; this one was not loaded") from None
        raise UnetlabError(f"cannot read checkpoint, the file is damaged or incomplete ({_first_sentence(exc)})",
                           path, "use the run's other checkpoint (best.pt or last.pt), or train again") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError, KeyError, TypeError) as exc:
        raise UnetlabError(f"cannot read checkpoint, the file is damaged or incomplete ({type(exc).__name__}: "
                           f"{_first_sentence(exc)})", path,
                           "use the run's other checkpoint (best.pt or last.pt), or train again") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UnetlabError("not a unetlab checkpoint (no model weights inside)", path)
    fmt = state.get("format")
    if fmt != CHECKPOINT_FORMAT:
        raise UnetlabError(
            f"checkpoint format {fmt} written by unetlab {state.get('unetlab_version', '?')} is not supported "
            f"by unetlab {__version__} (format {CHECKPOINT_FORMAT})",
            path,
        )
    return state


def _first_sentence(exc: BaseException) -> str:
    """torch's first sentence of an error says enough for one line."""
    return (str(exc).splitlines() or [""])[0].split(". ")[0]


_TASKS = ("binary", "multiclass")
_TARGETS = ("binary", "boundary", "distance", "classes")


def read_model_info(path: Path) -> dict[str, Any]:
    """Read and check ``model.json``: channel counts are positive integers, task and target are known values."""
    info = read_json(path)
    if not isinstance(info, dict):
        raise UnetlabError("model.json must hold a JSON object (channels, classes, target)", path)
    for key in ("in_channels", "out_channels", "image_channels"):
        value = info.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UnetlabError(f"model.json: '{key}' must be a positive integer, not {value!r}", path,
                               "the run folder is damaged; train again or restore model.json")
    if info.get("task", "binary") not in _TASKS:
        raise UnetlabError(f"model.json: unknown task {info.get('task')!r} (expected one of {', '.join(_TASKS)})",
                           path)
    if info.get("target", "binary") not in _TARGETS:
        raise UnetlabError(f"model.json: unknown target {info.get('target')!r} "
                           f"(expected one of {', '.join(_TARGETS)})", path)
    if not isinstance(info.get("classes", []), list):
        raise UnetlabError("model.json: 'classes' must be a list of class names", path)
    info.setdefault("task", "binary")
    info.setdefault("target", "binary")
    info.setdefault("classes", [])
    return info


def write_json(path: Path, obj: Any) -> Path:
    """Write JSON atomically."""
    text = json.dumps(obj, indent=2, default=str)
    return write_text(path, text)


def read_json(path: Path) -> Any:
    """Read a JSON file of the run folder with a clear error."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UnetlabError("file missing from run folder", path) from None
    except json.JSONDecodeError as exc:
        raise UnetlabError(f"corrupt JSON ({exc})", path) from None
