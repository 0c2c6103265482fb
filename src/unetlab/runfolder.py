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
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data.io import write_atomic
from .errors import UnetlabError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def checkpoint_path(run_dir: Path, which: str = "last") -> Path:
    """Path of the ``last`` or ``best`` checkpoint of a run."""
    return Path(run_dir) / "checkpoints" / f"{which}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` with torch.save to a temporary file and rename it (never a half-written checkpoint)."""
    state = {"format": CHECKPOINT_FORMAT, "unetlab_version": __version__, **state}
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            import os

            os.fsync(f.fileno())

    return write_atomic(path, _write)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; a missing, corrupt or incompatible file is a one-line error naming it."""
    path = Path(path)
    if not path.exists():
        raise UnetlabError("checkpoint not found", path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        detail = (str(exc).splitlines() or [""])[0].split(". ")[0]  # torch's first sentence says enough
        raise UnetlabError(f"cannot read checkpoint, the file is damaged or incomplete ({type(exc).__name__}: "
                           f"{detail})", path, "use the run's other checkpoint (best.pt or last.pt), or train again"
                           ) from exc
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


def write_json(path: Path, obj: Any) -> Path:
    """Write JSON atomically."""
    text = json.dumps(obj, indent=2, default=str)
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: Path) -> Any:
    """Read a JSON file of the run folder with a clear error."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UnetlabError("file missing from run folder", path) from None
    except json.JSONDecodeError as exc:
        raise UnetlabError(f"corrupt JSON ({exc})", path) from None
