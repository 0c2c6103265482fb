"""Segmentation losses: BCE, CE, soft Dice, focal and their combinations, the distance-target pair, plus knowledge
distillation.

Every loss is called as ``loss_fn(logits, target, weight)``:

* binary (one output channel): ``logits`` (N,1,H,W), ``target`` (N,1,H,W) float in [0,1] (hard or soft),
  pixels with ``target < 0`` are ignored;
* multiclass (K >= 2 channels): ``logits`` (N,K,H,W), ``target`` (N,H,W) long, ``-1`` is ignored;
* ``weight``: optional per-pixel weight (N,H,W) (the U-Net border weight map) multiplying the pixel-wise
  BCE/CE/focal term (never the Dice term).

Losses are computed in float32 whatever the autocast dtype, and the pixel-wise terms are averaged over the
valid (non-ignored) pixels.

``class_weights`` is the knob to over- or under-segment: for binary losses ``[w_background, w_cell]`` scales
the BCE of background and cell pixels (``[1, 2]`` favours cells, i.e. fatter masks; ``[2, 1]`` thinner ones);
for multiclass losses it has one weight per class.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import TrainConfig
from ..errors import UnetlabError

LossFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]

LOSSES = ("bce", "bce_dice", "ce", "ce_dice", "dice", "focal")
DICE_SMOOTH = 1.0
FOCAL_GAMMA = 2.0


# --- binary -------------------------------------------------------------------------------------------------


def _binary_inputs(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float32 logits, target clamped to [0,1] and the valid-pixel mask, all (N,1,H,W)."""
    logits = logits.float()
    target = target.float()
    if target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    if target.shape != logits.shape:
        raise ValueError(f"binary loss: target shape {tuple(target.shape)} != logits {tuple(logits.shape)}")
    valid = (target >= 0).float()
    return logits, target.clamp(0.0, 1.0), valid


def _pixel_weight(weight: Tensor | None, like: Tensor) -> Tensor | None:
    """Per-pixel weight (N,H,W) as float32 broadcastable to ``like`` (N,C,H,W)."""
    if weight is None:
        return None
    w = weight.float()
    if w.dim() == like.dim() - 1:
        w = w.unsqueeze(1)
    return w


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over the pixels where ``valid`` is 1."""
    return (values * valid).sum() / valid.sum().clamp_min(1.0)


def _bce_class_weight(target: Tensor, class_weights: list[float] | None) -> Tensor | None:
    """Per-pixel BCE weight from ``[w_background, w_cell]`` (soft targets interpolate), or None."""
    if not class_weights:
        return None
    w_bg, w_fg = class_weights
    return w_bg * (1.0 - target) + w_fg * target


def _weighted_binary_mean(
    loss: Tensor, target: Tensor, valid: Tensor, weight: Tensor | None, class_weights: list[float] | None
) -> Tensor:
    """Mean of a per-pixel binary loss over valid pixels, times class weights and border weights."""
    cw = _bce_class_weight(target, class_weights)
    if cw is not None:
        loss = loss * cw
    pw = _pixel_weight(weight, loss)
    if pw is not None:
        loss = loss * pw
    return _masked_mean(loss, valid)


def binary_bce(
    logits: Tensor, target: Tensor, weight: Tensor | None = None, class_weights: list[float] | None = None
) -> Tensor:
    """Pixel-wise BCE with logits averaged over valid pixels, times class and border weights."""
    logits, target, valid = _binary_inputs(logits, target)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return _weighted_binary_mean(loss, target, valid, weight, class_weights)


def binary_focal(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    class_weights: list[float] | None = None,
    gamma: float = FOCAL_GAMMA,
) -> Tensor:
    """Focal loss (Lin et al.): BCE scaled by (1 - p_t)^gamma, so easy pixels count less."""
    logits, target, valid = _binary_inputs(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1.0 - p) * (1.0 - target)
    loss = bce * (1.0 - p_t).clamp_min(0.0).pow(gamma)
    return _weighted_binary_mean(loss, target, valid, weight, class_weights)


def binary_dice(
    logits: Tensor, target: Tensor, weight: Tensor | None = None, smooth: float = DICE_SMOOTH
) -> Tensor:
    """Soft Dice loss over the whole batch: 1 - (2|P.T| + s) / (|P| + |T| + s) on valid pixels."""
    logits, target, valid = _binary_inputs(logits, target)
    p = torch.sigmoid(logits) * valid
    t = target * valid
    inter = (p * t).sum()
    denom = p.sum() + t.sum()
    return 1.0 - (2.0 * inter + smooth) / (denom + smooth)


# --- multiclass ---------------------------------------------------------------------------------------------


def _multiclass_inputs(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float32 logits (N,K,H,W), long target (N,H,W) and the valid mask (N,H,W)."""
    logits = logits.float()
    if target.dim() == logits.dim():
        target = target.squeeze(1)
    target = target.long()
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"multiclass loss: target shape {tuple(target.shape)} does not fit logits {tuple(logits.shape)}"
        )
    valid = (target >= 0).float()
    return logits, target, valid


def _class_weight_tensor(class_weights: list[float] | None, num_classes: int, device) -> Tensor | None:
    """The per-class CE weights as a float tensor on ``device``, or None."""
    if not class_weights:
        return None
    return torch.tensor(class_weights, dtype=torch.float32, device=device)


def multiclass_ce(
    logits: Tensor, target: Tensor, weight: Tensor | None = None, class_weights: list[float] | None = None
) -> Tensor:
    """Pixel-wise cross-entropy (ignore index -1) over valid pixels, times class and border weights."""
    logits, target, valid = _multiclass_inputs(logits, target)
    cw = _class_weight_tensor(class_weights, logits.shape[1], logits.device)
    loss = F.cross_entropy(logits, target.clamp_min(0), weight=cw, reduction="none")
    if weight is not None:
        loss = loss * weight.float()
    return _masked_mean(loss, valid)


def multiclass_focal(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    class_weights: list[float] | None = None,
    gamma: float = FOCAL_GAMMA,
) -> Tensor:
    """Multiclass focal loss: CE scaled by (1 - p_true)^gamma."""
    logits, target, valid = _multiclass_inputs(logits, target)
    safe = target.clamp_min(0)
    logp = F.log_softmax(logits, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = -logp * (1.0 - logp.exp()).clamp_min(0.0).pow(gamma)
    cw = _class_weight_tensor(class_weights, logits.shape[1], logits.device)
    if cw is not None:
        loss = loss * cw[safe]
    if weight is not None:
        loss = loss * weight.float()
    return _masked_mean(loss, valid)


def multiclass_dice(
    logits: Tensor, target: Tensor, weight: Tensor | None = None, smooth: float = DICE_SMOOTH
) -> Tensor:
    """Soft Dice over the batch per foreground class (classes 1..K-1), averaged: 1 - mean Dice."""
    logits, target, valid = _multiclass_inputs(logits, target)
    k = logits.shape[1]
    probs = torch.softmax(logits, dim=1) * valid.unsqueeze(1)
    onehot = F.one_hot(target.clamp_min(0), k).permute(0, 3, 1, 2).float() * valid.unsqueeze(1)
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    denom = probs.sum(dims) + onehot.sum(dims)
    dice = (2.0 * inter + smooth) / (denom + smooth)
    return 1.0 - dice[1:].mean()


# --- building -----------------------------------------------------------------------------------------------


def _combined(
    logits: Tensor, target: Tensor, weight: Tensor | None, pixel_loss: LossFn, dice_loss: LossFn
) -> Tensor:
    """A pixel-wise loss plus a Dice loss (the ``*_dice`` combinations)."""
    return pixel_loss(logits, target, weight) + dice_loss(logits, target, weight)


def build_loss(cfg: TrainConfig, num_classes: int) -> LossFn:
    """The loss named by ``cfg.loss`` for a model with ``num_classes`` outputs (1 = binary).

    For binary models ``ce``/``ce_dice`` mean ``bce``/``bce_dice`` and vice versa for multiclass ones.
    """
    name = cfg.loss.lower()
    if name not in LOSSES:
        raise UnetlabError(f"unknown loss '{cfg.loss}' (choose {', '.join(LOSSES)})")
    cw = list(cfg.class_weights) if cfg.class_weights else None
    binary = num_classes == 1
    if cw is not None:
        want = 2 if binary else num_classes
        if len(cw) != want:
            what = "[w_background, w_cell]" if binary else f"one weight per class ({num_classes})"
            raise UnetlabError(f"class_weights has {len(cw)} values; expected {what}")
        if any(w < 0 for w in cw):
            raise UnetlabError("class_weights must not be negative")
    if binary:
        pixel = partial(binary_focal if name == "focal" else binary_bce, class_weights=cw)
        dice: LossFn = binary_dice
    else:
        pixel = partial(multiclass_focal if name == "focal" else multiclass_ce, class_weights=cw)
        dice = multiclass_dice
    if name in ("bce", "ce", "focal"):
        return pixel
    if name == "dice":
        return dice
    return partial(_combined, pixel_loss=pixel, dice_loss=dice)


# --- distillation -------------------------------------------------------------------------------------------


def _soft_binary_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Per-pixel KL(teacher || student) between Bernoulli distributions at temperature T."""
    s = student.float() / temperature
    t = torch.sigmoid(teacher.float() / temperature)
    cross = F.binary_cross_entropy_with_logits(s, t, reduction="none")
    t_c = t.clamp(1e-7, 1 - 1e-7)
    entropy = -(t_c * t_c.log() + (1 - t_c) * (1 - t_c).log())
    return (cross - entropy).sum(1)


def _soft_multiclass_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Per-pixel KL(teacher || student) between softmax distributions at temperature T."""
    log_s = F.log_softmax(student.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=1)
    return (log_t.exp() * (log_t - log_s)).sum(1)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    weight: float,
    temperature: float,
    base_loss: LossFn,
    pixel_weight: Tensor | None = None,
) -> Tensor:
    """(1 - weight) * base_loss(student, target) + weight * T^2 * KL(teacher_T || student_T) (Hinton et al.).

    The teacher's soft predictions are sigmoid/softmax of its logits at temperature T. With ``target`` None
    (unlabelled images) only the distillation term is used. Ignored pixels of ``target`` are skipped in both.
    """
    if not 0.0 <= weight <= 1.0:
        raise UnetlabError(f"distill_weight must be in [0, 1], got {weight}")
    if temperature <= 0:
        raise UnetlabError(f"distill_temperature must be positive, got {temperature}")
    teacher_logits = teacher_logits.detach()
    if teacher_logits.shape != student_logits.shape:
        raise UnetlabError(
            f"teacher outputs {tuple(teacher_logits.shape)} do not match the student's "
            f"{tuple(student_logits.shape)}",
            hint="the teacher must predict the same classes",
        )
    binary = student_logits.shape[1] == 1
    kl = (_soft_binary_kl if binary else _soft_multiclass_kl)(student_logits, teacher_logits, temperature)
    if target is not None:
        valid = (target.float() >= 0).float()
        valid = valid.squeeze(1) if valid.dim() == kl.dim() + 1 else valid
    else:
        valid = torch.ones_like(kl)
    soft = _masked_mean(kl, valid) * temperature**2
    if target is None:
        return soft
    hard = base_loss(student_logits, target, pixel_weight)
    return (1.0 - weight) * hard + weight * soft


def distance_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Loss of the 2-channel distance target: BCE on foreground (channel 0) + BCE of the distance on foreground;
    a pixel ``weight`` (N,H,W) multiplies both terms."""
    logits = logits.float()
    fg = (target > 0).float()
    pix = F.binary_cross_entropy_with_logits(logits[:, :1], fg, reduction="none")
    dist = F.binary_cross_entropy_with_logits(logits[:, 1:2], target.clamp(0, 1), reduction="none") * fg
    if weight is not None:
        w = weight.float().unsqueeze(1) if weight.dim() == pix.dim() - 1 else weight.float()
        pix, dist = pix * w, dist * w
    return pix.mean() + dist.sum() / fg.sum().clamp_min(1.0)


FLOW_LOSS_SCALE = 12.5  # Cellpose's weighting: MSE of 5x the flows, halved, against BCE of the foreground


def flow_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Loss of the 3-channel flow target (foreground, dy, dx): BCE on the foreground (channel 0) + 12.5 x the
    squared error of the flows ``tanh(logit / 2)`` (= 2 sigmoid - 1) over all pixels (0 outside objects);
    a pixel ``weight`` (N,H,W) multiplies both terms."""
    logits = logits.float()
    pix = F.binary_cross_entropy_with_logits(logits[:, :1], target[:, :1], reduction="none")
    err = (torch.tanh(logits[:, 1:3] * 0.5) - target[:, 1:3]).pow(2).mean(1, keepdim=True)
    if weight is not None:
        w = weight.float().unsqueeze(1) if weight.dim() == pix.dim() - 1 else weight.float()
        pix, err = pix * w, err * w
    return pix.mean() + FLOW_LOSS_SCALE * err.mean()
