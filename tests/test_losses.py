"""Losses: torch references, ignore masks, weight maps, class weights, Dice, bf16 and distillation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unetlab.config import TrainConfig
from unetlab.errors import UnetlabError
from unetlab.training.losses import build_loss, distillation_loss


def _binary_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.6).float()
    return logits, target


def test_bce_matches_torch_reference():
    logits, target = _binary_batch()
    loss = build_loss(TrainConfig(loss="bce"), 1)(logits, target, None)
    ref = F.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(loss, ref, atol=1e-6)


def test_ignored_pixels_do_not_contribute():
    logits, target = _binary_batch()
    target[:, :, :4] = -1.0
    for name in ("bce", "bce_dice", "dice", "focal"):
        fn = build_loss(TrainConfig(loss=name), 1)
        x = logits.clone().requires_grad_(True)
        loss = fn(x, target, None)
        loss.backward()
        assert torch.all(x.grad[:, :, :4] == 0), name
        changed = logits.clone()
        changed[:, :, :4] = 50.0
        assert torch.allclose(fn(changed, target, None), loss.detach(), atol=1e-6), name
    ref = F.binary_cross_entropy_with_logits(logits[:, :, 4:], target[:, :, 4:])
    assert torch.allclose(build_loss(TrainConfig(loss="bce"), 1)(logits, target, None), ref, atol=1e-6)


def test_weight_map_multiplies_pixel_term_only():
    logits, target = _binary_batch()
    plain = build_loss(TrainConfig(loss="bce"), 1)(logits, target, None)
    doubled = build_loss(TrainConfig(loss="bce"), 1)(logits, target, torch.full((2, 8, 8), 2.0))
    assert torch.allclose(doubled, 2 * plain, atol=1e-6)
    dice = build_loss(TrainConfig(loss="dice"), 1)
    assert torch.allclose(dice(logits, target, torch.full((2, 8, 8), 5.0)), dice(logits, target, None))
    w = torch.ones(2, 8, 8)
    w[0, 2, 3] = 0.0
    x = logits.clone().requires_grad_(True)
    build_loss(TrainConfig(loss="bce"), 1)(x, target, w).backward()
    assert x.grad[0, 0, 2, 3] == 0 and x.grad[0, 0, 2, 4] != 0


def test_class_weights_shift_the_optimum_towards_cells():
    # balanced pixels: unweighted BCE has zero gradient at logit 0; w_cell > w_background pushes logits up
    target = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    grads = {}
    for cw in (None, [1.0, 2.0], [2.0, 1.0]):
        x = torch.zeros(1, 1, 1, 2, requires_grad=True)
        build_loss(TrainConfig(loss="bce", class_weights=cw), 1)(x, target, None).backward()
        grads[str(cw)] = x.grad.sum().item()
    assert abs(grads["None"]) < 1e-7
    assert grads["[1.0, 2.0]"] < 0 < grads["[2.0, 1.0]"]  # gradient descent raises / lowers the logits


def test_soft_targets_are_minimised_at_the_target_probability():
    target = torch.tensor([0.2, 0.7]).view(1, 1, 1, 2)
    x = torch.logit(target).clone().requires_grad_(True)
    build_loss(TrainConfig(loss="bce"), 1)(x, target, None).backward()
    assert x.grad.abs().max() < 1e-6


def test_dice_perfect_and_opposite_predictions():
    _, target = _binary_batch()
    fn = build_loss(TrainConfig(loss="dice"), 1)
    perfect = (target * 2 - 1) * 30
    assert fn(perfect, target, None).item() < 1e-3
    assert fn(-perfect, target, None).item() > 0.95
    logits, _ = _binary_batch(1)
    p = torch.sigmoid(logits)
    manual = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    assert torch.allclose(fn(logits, target, None), manual, atol=1e-6)


def test_bce_dice_is_the_sum():
    logits, target = _binary_batch()
    total = build_loss(TrainConfig(loss="bce_dice"), 1)(logits, target, None)
    parts = build_loss(TrainConfig(loss="bce"), 1)(logits, target, None) + build_loss(
        TrainConfig(loss="dice"), 1
    )(logits, target, None)
    assert torch.allclose(total, parts, atol=1e-6)


def test_focal_downweights_easy_pixels():
    _, target = _binary_batch()
    easy = (target * 2 - 1) * 4
    bce = build_loss(TrainConfig(loss="bce"), 1)(easy, target, None)
    focal = build_loss(TrainConfig(loss="focal"), 1)(easy, target, None)
    assert focal < bce * 0.01
    hard = -easy
    assert build_loss(TrainConfig(loss="focal"), 1)(hard, target, None) > 0.9 * build_loss(
        TrainConfig(loss="bce"), 1
    )(hard, target, None)


def test_losses_are_float32_and_finite_under_bf16():
    logits, target = _binary_batch()
    for name in ("bce", "bce_dice", "dice", "focal"):
        x = (logits * 20).to(torch.bfloat16).requires_grad_(True)
        loss = build_loss(TrainConfig(loss=name), 1)(x, target, torch.ones(2, 8, 8))
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(x.grad.float()).all()
    g = torch.Generator().manual_seed(3)
    ml = (torch.randn(2, 3, 8, 8, generator=g) * 50).to(torch.bfloat16)
    mt = torch.randint(0, 3, (2, 8, 8), generator=g)
    for name in ("ce", "ce_dice", "dice", "focal"):
        loss = build_loss(TrainConfig(loss=name), 3)(ml, mt, None)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_multiclass_ce_matches_torch_with_ignore_index():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randint(-1, 4, (2, 8, 8), generator=g)
    loss = build_loss(TrainConfig(loss="ce"), 4)(logits, target, None)
    assert torch.allclose(loss, F.cross_entropy(logits, target, ignore_index=-1), atol=1e-6)
    cw = [0.5, 1.0, 2.0, 3.0]
    weighted = build_loss(TrainConfig(loss="ce", class_weights=cw), 4)(logits, target, None)
    per_pixel = F.cross_entropy(logits, target, weight=torch.tensor(cw), ignore_index=-1, reduction="sum")
    assert torch.allclose(weighted, per_pixel / (target >= 0).sum(), atol=1e-5)
    border = torch.rand(2, 8, 8, generator=g)
    with_map = build_loss(TrainConfig(loss="ce"), 4)(logits, target, border)
    manual = (F.cross_entropy(logits, target.clamp_min(0), reduction="none") * border * (target >= 0)).sum()
    assert torch.allclose(with_map, manual / (target >= 0).sum(), atol=1e-5)


def test_multiclass_dice_perfect_prediction_and_ignore():
    g = torch.Generator().manual_seed(5)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    perfect = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 40
    fn = build_loss(TrainConfig(loss="ce_dice"), 3)
    assert fn(perfect, target, None).item() < 1e-3
    target[:, 0] = -1
    x = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    build_loss(TrainConfig(loss="dice"), 3)(x, target, None).backward()
    assert torch.all(x.grad[:, :, 0] == 0)


def test_loss_names_map_between_binary_and_multiclass():
    logits, target = _binary_batch()
    assert torch.allclose(
        build_loss(TrainConfig(loss="ce"), 1)(logits, target, None),
        build_loss(TrainConfig(loss="bce"), 1)(logits, target, None),
    )


def test_bad_loss_configuration_is_a_user_error():
    with pytest.raises(UnetlabError, match="unknown loss"):
        build_loss(TrainConfig(loss="hinge"), 1)
    with pytest.raises(UnetlabError, match="class_weights"):
        build_loss(TrainConfig(loss="bce", class_weights=[1.0, 2.0, 3.0]), 1)
    with pytest.raises(UnetlabError, match="class_weights"):
        build_loss(TrainConfig(loss="ce", class_weights=[1.0, 2.0]), 3)


def test_distillation_blends_teacher_and_true_mask():
    logits, target = _binary_batch()
    base = build_loss(TrainConfig(loss="bce"), 1)
    hard = base(logits, target, None)
    same = distillation_loss(logits, logits.clone(), target, 0.3, 2.0, base)
    assert torch.allclose(same, 0.7 * hard, atol=1e-5)  # student == teacher: the soft term is 0
    teacher = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    t_soft = torch.sigmoid(teacher / 2.0)
    s_p = torch.sigmoid(logits / 2.0)
    kl = t_soft * torch.log(t_soft / s_p) + (1 - t_soft) * torch.log((1 - t_soft) / (1 - s_p))
    only_soft = distillation_loss(logits, teacher, target, 1.0, 2.0, base)
    assert torch.allclose(only_soft, 4.0 * kl.mean(), atol=1e-5)
    assert torch.allclose(distillation_loss(logits, teacher, None, 0.5, 2.0, base), only_soft, atol=1e-6)
    x = logits.clone().requires_grad_(True)
    distillation_loss(x, teacher, target, 1.0, 2.0, base).backward()
    assert torch.all(torch.sign(x.grad) == torch.sign(logits - teacher))  # pulls the student to the teacher


def test_multiclass_distillation_is_kl_at_temperature():
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 3, 4, 4, generator=g)
    t = torch.randn(2, 3, 4, 4, generator=g)
    target = torch.randint(0, 3, (2, 4, 4), generator=g)
    base = build_loss(TrainConfig(loss="ce"), 3)
    got = distillation_loss(s, t, target, 1.0, 3.0, base)
    kl = F.kl_div(F.log_softmax(s / 3, 1), F.log_softmax(t / 3, 1), log_target=True, reduction="sum") / 32
    assert torch.allclose(got, 9.0 * kl, atol=1e-5)
    with pytest.raises(UnetlabError):
        distillation_loss(s, t[:, :2], target, 0.5, 1.0, base)
