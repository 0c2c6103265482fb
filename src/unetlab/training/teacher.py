"""The teacher of knowledge distillation: a finished run whose predictions the student learns from."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import RunConfig
from ..errors import UnetlabError
from ..runfolder import load_run
from .setup import center_crop

log = logging.getLogger(__name__)


def load_teacher(cfg: RunConfig, info: dict, device: torch.device) -> nn.Module | None:
    """The frozen teacher model of ``cfg.train.teacher`` (a run folder), or None without one."""
    if not cfg.train.teacher:
        return None

    teacher = load_run(cfg.train.teacher, device=device)
    theirs = teacher.info.get("in_channels")
    if theirs is not None and theirs != info["in_channels"]:
        raise UnetlabError(f"teacher takes {theirs} input channel(s), the student {info['in_channels']}",
                           cfg.train.teacher, "choose the student's channels as the teacher's (its config.yaml: "
                           "channels / channel_code)")
    if teacher.out_channels != info["out_channels"]:
        raise UnetlabError(
            f"teacher predicts {teacher.out_channels} channel(s), the student {info['out_channels']}",
            cfg.train.teacher,
        )
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    return teacher.model


def teacher_logits(teacher: nn.Module, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The teacher's logits on the student's batch ``x``, cropped to the student's output size (h, w)."""
    t = teacher
    n = x.shape[-1]
    if t.padding == "valid":  # mirror-pad so the teacher's (smaller) output covers the student's
        need = n
        ti = t.valid_input_size(need)
        while t.output_size(ti) < n:
            need += 2
            ti = t.valid_input_size(need)
        pad = (ti - n) // 2
        x = torch.nn.functional.pad(x, (pad, ti - n - pad, pad, ti - n - pad), mode="reflect")
    with torch.no_grad():
        y = t(x)
    return center_crop(y, h, w)


__all__ = ["load_teacher", "teacher_logits"]
