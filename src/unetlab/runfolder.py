"""The run folder: the contract between training and inference.

    RUN_DIR/config.yaml          the RunConfig (data, model, training, post-processing)
    RUN_DIR/split.json           training and validation sample names
    RUN_DIR/model.json           what inference needs: channels, classes, target kind, normalisation
    RUN_DIR/checkpoints/last.pt  full training state (model, optimiser, schedule, RNG, epoch) for --resume
    RUN_DIR/checkpoints/best.pt  model weights with the best validation score
    RUN_DIR/metrics.csv, curves.png, summary.json, events (TensorBoard)

A pretrained model shipped with the package (``unetlab/pretrained/NAME/``) is a run folder too, with a
``card.json`` saying what it was trained on and how it scored; wherever a run folder is asked for, its name
(``--model nuclei``) will do.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import ModelConfig, RunConfig
from .errors import UnetlabError
from .files import write_bytes, write_text

if TYPE_CHECKING:  # torch is imported where checkpoints are read or written: `unetlab models` reads cards only
    import torch
    from torch import nn

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def checkpoint_path(run_dir: Path, which: str = "last") -> Path:
    """Path of the ``last`` or ``best`` checkpoint of a run."""
    return Path(run_dir) / "checkpoints" / f"{which}.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists and dicts only) atomically and flushed to disk."""
    import torch

    state = {"format": CHECKPOINT_FORMAT, "unetlab_version": __version__, **state}
    buf = io.BytesIO()
    torch.save(state, buf)
    return write_bytes(path, buf.getvalue(), fsync=True)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint without running code from it (``weights_only=True``).

    A missing, damaged or foreign file is a one-line error naming it; a file that would need arbitrary Python
    objects to load (a pickle that could run code) is refused, never executed.
    """
    import torch

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


def load_weights(model: torch.nn.Module, weights: dict[str, Any], path: Path) -> None:
    """Load ``weights`` into ``model`` strictly; a checkpoint of another architecture is one line saying how."""
    import torch

    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise UnetlabError("not a unetlab checkpoint (its model entry is not a set of weights)", path)
    mine = model.state_dict()
    missing = [k for k in mine if k not in weights]
    unexpected = [k for k in weights if k not in mine]
    shaped = [k for k in mine if k in weights and tuple(weights[k].shape) != tuple(mine[k].shape)]
    if missing or unexpected or shaped:
        parts = [f"{len(x)} {what}" for x, what in ((missing, "missing"), (unexpected, "unexpected"),
                                                     (shaped, "of another shape")) if x]
        example = (f"'{shaped[0]}' is {list(mine[shaped[0]].shape)} in the model, "
                   f"{list(weights[shaped[0]].shape)} in the file" if shaped else
                   f"'{(missing or unexpected)[0]}'")
        raise UnetlabError(f"weights do not fit the model in config.yaml ({', '.join(parts)} tensors; e.g. "
                           f"{example})", path, "the checkpoint belongs to another architecture or run")
    model.load_state_dict(weights)


def _first_sentence(exc: BaseException) -> str:
    """torch's first sentence of an error says enough for one line."""
    return (str(exc).splitlines() or [""])[0].split(". ")[0]


_TASKS = ("binary", "multiclass")
_TARGETS = ("binary", "boundary", "distance", "flow", "classes")


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


# --- loading a run for inference ------------------------------------------------------------------------------


@dataclass
class Run:
    """A trained model with everything needed to use it: config, channels, classes, target kind."""

    path: Path | None
    config: RunConfig
    model: nn.Module
    info: dict = field(default_factory=dict)

    @property
    def out_channels(self) -> int:
        return int(self.info["out_channels"])

    @property
    def activation(self) -> str:
        """'sigmoid' for binary, distance and flow targets, 'softmax' for boundary and multiclass ones."""
        return activation_for(self.info.get("task", "binary"), self.info.get("target", "binary"))


def activation_for(task: str, target: str) -> str:
    """Output activation of a model trained on ``task``/``target``."""
    return "softmax" if task == "multiclass" or target == "boundary" else "sigmoid"


PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


def pretrained_names() -> list[str]:
    """Names of the pretrained models shipped in the package (folders of ``unetlab/pretrained`` with weights)."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(d.name for d in PRETRAINED_DIR.iterdir() if (d / "card.json").is_file())


def pretrained_models() -> list[dict]:
    """The model cards of the pretrained models: name, what they were trained on, test scores, recipe."""
    return [{"name": name, **read_json(PRETRAINED_DIR / name / "card.json")} for name in pretrained_names()]


def format_pretrained_table(cards: list[dict]) -> str:
    """The pretrained models as text lines (``unetlab models``): name, size, what it was trained on, test scores."""
    if not cards:
        return "  (none installed)"
    lines = []
    for c in cards:
        test = c.get("test", {})
        scores = ", ".join(f"{k} {test[k]:.3f}" for k in ("ap50", "dsb_score", "dice") if k in test)
        lines.append(f"  {c['name']:<10} {c.get('parameters', 0):>10,} parameters  {c.get('summary', '')}")
        lines.append(f"  {'':<10} trained on {c.get('trained_on', '?')}")
        if scores:
            lines.append(f"  {'':<10} test split ({test.get('images', '?')} images never used to train or tune): "
                         f"{scores}")
        for other in c.get("other", []):
            lines.append(f"  {'':<10} {other.get('data', '?')}: AP@0.5 {other.get('ap50', float('nan')):.3f}")
        lines += _size_lines(c.get("sizes", []))
    return "\n".join(lines)


def _size_lines(rows: list[dict]) -> list[str]:
    """A card's size-estimate rows, one line per collection: AP@0.5 with --diameter auto / at the true size and the
    share of images whose estimated diameter is within 25% of the truth, per zoom of the copies."""
    by_collection: dict[str, list[dict]] = {}
    for r in rows:
        by_collection.setdefault(str(r.get("images", "?")), []).append(r)
    lines = [f"  {'':<10} --diameter auto, AP@0.5 auto / true size (size estimate within 25%):"] if rows else []
    for name, rs in by_collection.items():
        cells = ", ".join(f"x{r['zoom']:g} {r['ap50_auto']:.3f} / {r['ap50_true']:.3f} ({r['within25']:.0%})"
                          for r in rs)
        lines.append(f"  {'':<12}{name}: {cells}")
    return lines


def is_pretrained(model: str | Path) -> bool:
    """True when ``model`` names a shipped pretrained model rather than a run folder (a folder of that name
    that is no run, such as a data folder ``nuclei/``, does not hide the model)."""
    return not (Path(model) / "config.yaml").is_file() and str(model) in pretrained_names()


def _enclosing_run(path: Path) -> Path | None:
    """The run folder that holds ``path`` (``RUN/checkpoints/best.pt``, ``RUN/checkpoints``), if any."""
    for parent in list(path.absolute().parents)[:3]:
        if (parent / "config.yaml").is_file() and (parent / "model.json").is_file():
            return parent if path.is_absolute() else Path(os.path.relpath(parent))
    return None


def resolve_run_dir(model: str | Path) -> Path:
    """The run folder ``model`` stands for: a folder with ``config.yaml``, or a pretrained model's name
    (``nuclei``); anything else is one line, suggesting the run folder of a file inside one."""
    path = Path(model)
    if (path / "config.yaml").is_file():
        return path
    if is_pretrained(model):
        return PRETRAINED_DIR / str(model)
    run = _enclosing_run(path)
    if path.exists() or run is not None:
        why = f"{path} is not a run folder (no config.yaml)" if path.exists() else f"{path} not found"
        raise UnetlabError(f"{why}; did you mean {run}?" if run else why,
                           hint=None if run else "give a folder written by `unetlab train`")
    names = pretrained_names()
    hint = f"give a run folder written by `unetlab train` or a pretrained model: {', '.join(names)}" if names \
        else "give a run folder written by `unetlab train`"
    raise UnetlabError("run folder not found", path, hint=hint)


def own_run_dir(run_dir: str | Path, what: str) -> Path:
    """A run folder that ``what`` (tune, size-model) may write into: a pretrained model's name or package folder
    is one line that says to work on a copy of it (its package is not written to)."""
    path = Path(run_dir)
    if is_pretrained(run_dir) or (path.resolve().parent == PRETRAINED_DIR and (path / "card.json").is_file()):
        src = PRETRAINED_DIR / path.name
        raise UnetlabError(f"{path.name} is a pretrained model, and its package folder is not written to", None,
                           f"{what} a copy: cp -r {src} my_{path.name}; its split.json names the images of the view "
                           "scripts/train_nuclei_model.py builds (RUN_data), which --data must give")
    return resolve_run_dir(path)


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The ``config.yaml`` of a run folder (or pretrained model); not a run folder is one line (see
    :func:`resolve_run_dir`)."""
    return RunConfig.load(resolve_run_dir(run_dir) / "config.yaml")


def load_run(run_dir: str | Path, checkpoint: str = "best", device: str | torch.device = "cpu") -> Run:
    """Load a run folder or a pretrained model by name (weights from ``checkpoints/best.pt``, falling back to
    ``last.pt``), model in eval mode."""
    from .models import build_model

    if checkpoint not in ("best", "last"):
        raise UnetlabError(f"unknown checkpoint '{checkpoint}' (choose best or last)")
    import torch

    from ._runtime import resolve_device

    if not isinstance(device, torch.device):
        device = resolve_device(str(device))
    run_dir = resolve_run_dir(run_dir)
    cfg = RunConfig.load(run_dir / "config.yaml")
    info = read_model_info(run_dir / "model.json")
    path = checkpoint_path(run_dir, checkpoint)
    if not path.exists():
        path = checkpoint_path(run_dir, "last")
    state = load_checkpoint(path, map_location="cpu")
    model = build_model(_model_cfg(cfg, info))
    load_weights(model, state["model"], path)
    model.eval().to(device)
    return Run(run_dir, cfg, model, info)


def _model_cfg(cfg: RunConfig, info: dict) -> ModelConfig:
    return replace(cfg.model, in_channels=int(info["in_channels"]), out_channels=int(info["out_channels"]))
