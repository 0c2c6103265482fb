"""The training loop: patches in, a run folder out; validation, checkpoints, resume and the collapse guard.

``train(cfg, out)`` is the whole story: read and split the data, build the model, loss, optimiser and schedule,
then per epoch train on random patches, validate on whole images with the tiled predictor, write metrics and
atomic checkpoints. ``train(..., resume=True)`` continues a stopped run exactly where its last checkpoint was.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import logging
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import __version__
from .. import distributed as D
from .._runtime import resolve_device, seed_everything, tune_allocator, use_channels_last
from ..config import RunConfig
from ..data.channels import apply_channels, channels_out
from ..data.dataset import (
    EpochSampler,
    PatchDataset,
    SampleCache,
    default_samples_per_epoch,
    readable_samples,
    resolve_num_workers,
)
from ..data.io import read_image
from ..data.layouts import load_from_config
from ..data.split import load_split, save_split, split_samples
from ..data.targets import target_channels
from ..errors import UnetlabError
from ..evaluation.metrics import batch_dice_counts, dice_from_counts
from ..files import remove_stale_temporaries, write_bytes, write_text
from ..inference.predictor import make_predict_fn, resolve_precision
from ..inference.tiling import tile_predict
from ..runfolder import (
    activation_for,
    checkpoint_path,
    load_checkpoint,
    load_run,
    load_weights,
    read_json,
    save_checkpoint,
    write_json,
)
from .losses import build_loss, distillation_loss
from .schedules import build_optimizer, build_scheduler, scale_lr

log = logging.getLogger(__name__)

RECOVERY_LR_FACTOR = 0.2


@dataclass
class TrainResult:
    """What a finished run reports: where it is, its best score and the history of every evaluation."""

    run_dir: Path
    best_metric: float
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    recoveries: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    bad: list[str] = field(default_factory=list)  # files left out by --skip-bad, one line each
    rank: int = 0  # under torchrun every rank returns the same result; rank 0 is the one to report it


# --- setup ---------------------------------------------------------------------------------------------------


def _prepare_run_dir(out: Path, resume: bool, overwrite: bool, main: bool) -> None:
    if resume:
        if not checkpoint_path(out, "last").exists():
            raise UnetlabError("nothing to resume: no checkpoints/last.pt", out,
                               "start again without --resume, with --overwrite to replace the folder")
        if main:  # a run killed while writing a checkpoint leaves its temporary file behind
            remove_stale_temporaries(out)
        return
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UnetlabError(
            "run folder already exists", out, "use --resume to continue it or --overwrite to start again"
        )
    if main:
        if out.exists() and overwrite:
            for name in ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.csv", "summary.json"):
                (out / name).unlink(missing_ok=True)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)


def distance_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Loss of the 2-channel distance target: BCE on foreground (channel 0) + BCE of the distance on foreground."""
    import torch.nn.functional as F

    logits = logits.float()
    fg = (target > 0).float()
    pix = F.binary_cross_entropy_with_logits(logits[:, :1], fg, reduction="none")
    if weight is not None:
        pix = pix * weight.unsqueeze(1)
    dist = F.binary_cross_entropy_with_logits(logits[:, 1:2], target.clamp(0, 1), reduction="none")
    return pix.mean() + (dist * fg).sum() / fg.sum().clamp_min(1.0)


def center_crop(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Crop the last two axes of ``t`` to (h, w) around the centre (targets of valid-padding networks)."""
    H, W = t.shape[-2:]
    if (H, W) == (h, w):
        return t
    y, x = (H - h) // 2, (W - w) // 2
    return t[..., y : y + h, x : x + w]


@dataclass
class Setup:
    """Everything built from the config before the first step."""

    cfg: RunConfig
    info: dict
    train_samples: list
    val_samples: list
    model: nn.Module
    patch_in: int
    bad: list[str] = field(default_factory=list)  # files left out (skip_bad), one line each


def build_setup(cfg: RunConfig, run_dir: Path | None, resume: bool, dist_info: D.DistInfo,
                skip_bad: bool = False) -> Setup:
    """Read and split the data, decide channels/classes, build the model (and save split and model info).

    With ``skip_bad``, unpaired files and samples whose image or mask cannot be read (or does not fit) are
    left out with a warning instead of stopping the run.
    """
    from ..models import build_model

    data = load_from_config(cfg.data)
    bad: list[str] = []
    if data.problems:
        if not skip_bad:
            more = f" (and {len(data.problems) - 1} more)" if len(data.problems) > 1 else ""
            raise UnetlabError(f"{data.problems[0]}{more}",
                               hint="`unetlab inspect DATA` lists them; --skip-bad leaves them out")
        bad += data.problems
    if not data.samples:
        raise UnetlabError("no image/mask pairs found", cfg.data.root)
    if skip_bad:
        data.samples, unreadable = readable_samples(data.samples, cfg.data)
        bad += unreadable
        if not data.samples:
            raise UnetlabError(f"no usable image/mask pairs: all {len(unreadable)} are bad", cfg.data.root,
                               f"e.g. {unreadable[0]}" if unreadable else None)
    if bad:
        log.warning("--skip-bad: leaving out %d bad file(s):\n  %s", len(bad), "\n  ".join(bad))
    split_cfg = cfg.data
    if resume and run_dir is not None and (run_dir / "split.json").exists():
        split_cfg = replace(cfg.data, split_file=str(run_dir / "split.json"))
    train_s, val_s = split_samples(data, split_cfg, seed=cfg.train.seed)
    if run_dir is not None and dist_info.is_main and not resume:
        save_split(run_dir / "split.json", train_s, val_s)
    multiclass = data.task == "multiclass"
    first = read_image(train_s[0].image)
    image_channels = first.shape[0]
    in_ch = channels_out(image_channels, cfg.data)
    out_ch = len(data.classes) if multiclass else target_channels(cfg.data.target)
    info = {
        "in_channels": in_ch,
        "out_channels": out_ch,
        "image_channels": image_channels,
        "task": data.task,
        "classes": list(data.classes),
        "target": "classes" if multiclass else cfg.data.target,
        "layout": data.layout,
        "unetlab_version": __version__,
    }
    model = build_model(replace(cfg.model, in_channels=in_ch, out_channels=out_ch))
    patch_in = int(model.valid_input_size(cfg.data.patch_size)) if model.padding == "valid" else cfg.data.patch_size
    return Setup(cfg, info, train_s, val_s, model, patch_in, bad)


def make_loss_fn(cfg: RunConfig, info: dict):
    """The loss for this task/target (binary BCE+Dice, CE for classes/boundary, the distance pair)."""
    if info["target"] == "distance":
        return distance_loss
    return build_loss(cfg.train, 1 if info["out_channels"] == 1 else info["out_channels"])


# --- validation ----------------------------------------------------------------------------------------------


def foreground_counts(prob: torch.Tensor, labels: np.ndarray, info: dict) -> tuple[torch.Tensor, ...]:
    """(intersection, pred_sum, truth_sum) per evaluated class of one whole-image prediction."""
    from ..data.targets import make_target

    if info["task"] == "multiclass":
        logits = prob[None]
        target = torch.from_numpy(labels.astype(np.int64))[None]
        i, p, t = batch_dice_counts(logits, target)
        return i[1:], p[1:], t[1:]  # background excluded
    fg_prob = prob[1:].sum(0) if info["target"] == "boundary" else prob[0]
    target = torch.from_numpy(make_target(labels, "binary").astype(np.float32))
    logit = torch.logit(fg_prob.clamp(1e-6, 1 - 1e-6))
    return batch_dice_counts(logit[None, None], target[None, None])


def _predict_val_image(model: nn.Module, image: np.ndarray, cfg: RunConfig, info: dict, device: torch.device,
                       source, predict=None) -> torch.Tensor:
    """Probabilities (K, H, W) on CPU of one normalised validation image with the tiled predictor."""
    model.eval()
    if predict is None:
        predict = make_predict_fn(model, activation_for(info["task"], info["target"]), device,
                                  precision=cfg.train.precision,
                              channels_last=use_channels_last(cfg.train.channels_last, device, training=False))
    align = int(getattr(model, "size_multiple", 2 ** int(getattr(model, "depth", 4))))
    image = apply_channels(image, cfg.data, None, source=source)
    return tile_predict(predict, image, info["out_channels"], tile=max(cfg.data.patch_size, 256), overlap=0.25,
                        align=align, batch_size=4, output_size=model.output_size,
                        valid_input_size=model.valid_input_size, device=device).cpu()


def validate(
    model: nn.Module, cache: SampleCache, indices: list[int], cfg: RunConfig, info: dict, device: torch.device,
    dist_info: D.DistInfo,
) -> dict:
    """Whole-image validation with the tiled predictor: Dice and IoU reduced exactly over images and ranks."""
    model.eval()
    predict = make_predict_fn(model, activation_for(info["task"], info["target"]), device,
                              precision=cfg.train.precision,
                              channels_last=use_channels_last(cfg.train.channels_last, device, training=False))
    n = info["out_channels"] - 1 if info["task"] == "multiclass" else 1
    counts = torch.zeros(3, n, dtype=torch.float64)
    truth_fg = torch.zeros(2, dtype=torch.float64)  # (truth pixels, all pixels) for the all-foreground Dice
    for i in indices:
        item = cache[i]
        prob = _predict_val_image(model, item.image, cfg, info, device, cache.samples[i].image, predict)
        c = foreground_counts(prob, item.labels, info)
        counts += torch.stack([x.double().reshape(-1) for x in c])
        truth_fg += torch.tensor([float((item.labels > 0).sum()), float(item.labels.size)], dtype=torch.float64)
    counts = D.all_reduce_sum(counts, dist_info)
    truth_fg = D.all_reduce_sum(truth_fg, dist_info)
    inter, psum, tsum = counts
    dice = dice_from_counts(inter, psum, tsum)
    iou = torch.where(psum + tsum - inter > 0, inter / (psum + tsum - inter).clamp_min(1), torch.ones_like(inter))
    out = {"val_dice": float(dice.mean()), "val_iou": float(iou.mean())}
    if info["task"] == "multiclass":
        for name, d in zip(info["classes"][1:], dice.tolist()):
            out[f"val_dice_{name}"] = float(d)
    t, total = truth_fg.tolist()
    out["all_foreground_dice"] = 2 * t / (total + t) if total else 0.0
    return out


# --- the collapse guard --------------------------------------------------------------------------------------


def collapsed(history: list[dict], patience: int) -> str | None:
    """Why the run looks collapsed (Dice stuck at 0 or at the all-foreground value while the loss is flat)."""
    if patience <= 0 or len(history) < patience:
        return None
    recent = history[-patience:]
    if "val_dice" not in recent[-1]:
        return None
    stuck_zero = all(h.get("val_dice", 1.0) < 1e-3 for h in recent)
    stuck_full = all(abs(h.get("val_dice", 0) - h.get("all_foreground_dice", -1)) < 1e-3 for h in recent)
    if not (stuck_zero or stuck_full):
        return None
    losses = [h["train_loss"] for h in recent]
    before = history[-patience - 1]["train_loss"] if len(history) > patience else losses[0] * 1.1 + 1e-9
    if min(losses) < 0.95 * before and losses[-1] < losses[0] * 0.95:
        return None  # still learning
    return "validation Dice stuck at 0" if stuck_zero else "validation Dice stuck at the all-foreground value"


def healthy(row: dict) -> bool:
    """Whether an evaluation row is a state worth returning to: Dice above 0 and not the all-foreground value."""
    dice = row.get("val_dice", 0.0)
    return dice > 1e-3 and abs(dice - row.get("all_foreground_dice", -1.0)) >= 1e-3


# --- the loop ------------------------------------------------------------------------------------------------


class Trainer:
    """One training run; ``fit()`` runs it. Created by :func:`train`."""

    def __init__(self, cfg: RunConfig | None, out: Path | None, resume: bool = False, overwrite: bool = False,
                 skip_bad: bool = False, progress: bool | None = None) -> None:
        tune_allocator()
        self.out = Path(out) if out is not None else None
        self.progress = progress
        if cfg is None:  # resume with the run's own config
            if not resume or self.out is None:
                raise UnetlabError("a config is needed to start a run")
            cfg = RunConfig.load(self.out / "config.yaml")
        device = resolve_device(cfg.train.device)
        self.dist = D.init_distributed(device.type)
        device = D.rank_device(device, self.dist)  # cuda:LOCAL_RANK under torchrun
        if self.dist.enabled and device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        if self.dist.enabled and cfg.train.sync_batchnorm and device.type != "cuda":
            raise UnetlabError("sync_batchnorm needs CUDA GPUs (torch has no SyncBatchNorm on CPU)",
                               hint="use --sync-batchnorm false, or --norm group (independent of the batch)")
        if self.out is not None:  # rank 0 checks and creates the folder, the others wait (and share its error)
            D.run_on_main(partial(_prepare_run_dir, self.out, resume, overwrite, True), self.dist)
        # read the checkpoint to resume before anything is written: a damaged one then changes nothing
        resume_state = load_checkpoint(checkpoint_path(self.out, "last")) if resume and self.out else None
        seed_everything(cfg.train.seed)
        if cfg.train.lr == "auto":
            from .tools import lr_find

            found = lr_find(cfg)
            log.info("lr-find suggests a learning rate of %.2e", found.suggestion)
            cfg.train.lr = D.broadcast_object(float(found.suggestion), self.dist)  # every rank the same
        elif isinstance(cfg.train.lr, str):
            raise UnetlabError(f"bad learning rate '{cfg.train.lr}' (a number or 'auto')")
        self.cfg = cfg
        s = build_setup(cfg, self.out, resume, self.dist, skip_bad=skip_bad)
        self.info, self.train_samples, self.val_samples = s.info, s.train_samples, s.val_samples
        self.bad = s.bad
        self.model = s.model.to(device)
        self.channels_last = use_channels_last(cfg.train.channels_last, device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.dist.enabled and cfg.train.sync_batchnorm:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.net: nn.Module = self.model
        if self.dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.loss_fn = make_loss_fn(cfg, self.info)
        weight_fn = None
        if cfg.train.border_weight:
            from .weightmap import border_weight_map

            weight_fn = partial(border_weight_map, w0=cfg.train.w0, sigma=cfg.train.sigma)
        self.train_cache_dataset = PatchDataset(
            self.train_samples, cfg.data, s.patch_in, 1, multiclass=self.info["task"] == "multiclass",
            weight_fn=weight_fn, seed=cfg.train.seed,
        )
        # read (and cache) every training sample now: bad files fail here, before any training
        empty = check_loaded(self.train_cache_dataset.cache, self.info["image_channels"])
        if len(empty) == len(self.train_samples):
            raise UnetlabError(
                f"all {len(empty)} training masks are empty (no foreground pixels): nothing to learn",
                cfg.data.root, "masks must mark objects with non-zero values; --invert-mask if they mark the "
                "background")
        if empty:
            shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
            log.warning("%d of %d training masks are empty (negative controls, fine when intended): %s",
                        len(empty), len(self.train_samples), shown)
        length = cfg.data.samples_per_epoch or default_samples_per_epoch(self.train_cache_dataset.cache,
                                                                            cfg.data.patch_size)
        # several ranks: a whole number of global batches, so every rank runs the same steps
        length = D.distributed_samples_per_epoch(length, cfg.train.batch_size, self.dist.world_size,
                                                 cfg.train.grad_accumulation)
        self.train_cache_dataset.length = length
        self.sampler = EpochSampler(length, self.dist.rank, self.dist.world_size)
        self.loader = make_train_loader(self.train_cache_dataset, self.sampler, cfg, device, self.dist)
        self.steps_per_epoch = max(1, len(self.loader) // cfg.train.grad_accumulation)
        self.optimizer = build_optimizer(self.model, cfg.train, float(cfg.train.lr))
        self.schedule = build_scheduler(self.optimizer, cfg.train, self.steps_per_epoch, cfg.train.epochs)
        self.val_cache = SampleCache(self.val_samples, cfg.data)
        check_loaded(self.val_cache, self.info["image_channels"])  # a bad validation file fails now too
        self.amp_dtype = resolve_precision(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.teacher = self._load_teacher()
        self.epoch = 0
        self.history: list[dict] = []
        self.recoveries: list[dict] = []
        self.best = -math.inf
        self.best_epoch = -1
        self.good_state: dict | None = None  # the collapse guard's restore point (latest healthy evaluation)
        self.good_epoch = -1
        self.bad_evals = 0
        self.start_time = time.time()
        self.tb = None
        if resume_state is not None:  # before anything is written: a checkpoint that does not fit changes nothing
            self._restore(resume_state)
        if self.out is not None and self.dist.is_main:
            cfg.save(self.out / "config.yaml")
            write_json(self.out / "model.json", self.info)

    # -- state ---------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "history": self.history,
            "recoveries": self.recoveries,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "bad_evals": self.bad_evals,
            # the restore point: usually this very state (then not stored twice), else its own copy
            "good_epoch": self.good_epoch,
            "good_state": self.good_state if self.good_epoch != self.epoch else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state()},
            "config": self.cfg.to_dict(),
            "info": self.info,
            "world_size": self.dist.world_size,
        }

    def _restore(self, state: dict) -> None:
        load_weights(self.model, state["model"], checkpoint_path(self.out, "last"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.recoveries = list(state["recoveries"])
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
        self.bad_evals = int(state.get("bad_evals", 0))
        self.good_epoch = int(state.get("good_epoch", -1))
        if self.good_epoch == self.epoch and self.good_epoch >= 0:
            self.good_state = self._snapshot()
        else:
            self.good_state = state.get("good_state")
        if self.recoveries:  # a recovery reseeded the patch stream
            self.train_cache_dataset.seed = self.cfg.train.seed + 1000 * len(self.recoveries)
        torch.set_rng_state(state["rng"]["torch"])
        _set_numpy_rng_state(state["rng"]["numpy"])
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size and self.dist.is_main:
            b = self.cfg.train.batch_size * self.cfg.train.grad_accumulation
            log.warning("resuming a run trained on %d process(es) with %d: the global batch changes from %d to %d",
                        saved_world, self.dist.world_size, b * saved_world, b * self.dist.world_size)
        log.info("resuming at epoch %d (best %s %.4f at epoch %d)", self.epoch + 1, self.cfg.train.monitor,
                 self.best, self.best_epoch)

    def _snapshot(self) -> dict:
        return {"model": copy.deepcopy(self.model.state_dict()),
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def _load_teacher(self):
        if not self.cfg.train.teacher:
            return None

        teacher = load_run(self.cfg.train.teacher, device=self.device)
        if teacher.out_channels != self.info["out_channels"]:
            raise UnetlabError(
                f"teacher predicts {teacher.out_channels} channel(s), the student {self.info['out_channels']}",
                self.cfg.train.teacher,
            )
        for p in teacher.model.parameters():
            p.requires_grad_(False)
        return teacher.model

    def _teacher_logits(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        t = self.teacher
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

    # -- one epoch -----------------------------------------------------------------------------------------
    def _train_epoch(self) -> float:
        from tqdm.auto import tqdm

        self.net.train()
        self.sampler.set_epoch(self.epoch)
        total, count = 0.0, 0
        accum = self.cfg.train.grad_accumulation
        if not self.dist.is_main or self.progress is False:
            disable: bool | None = True
        else:
            disable = False if self.progress else None  # None: only on a terminal
        bar = tqdm(self.loader, desc=f"epoch {self.epoch + 1}/{self.cfg.train.epochs}", unit="batch",
                   disable=disable, leave=False, dynamic_ncols=True)
        self.optimizer.zero_grad(set_to_none=True)
        for step, batch in enumerate(bar):
            stepping = (step + 1) % accum == 0
            # DDP: gradients are all-reduced only on the micro-batch that steps (no_sync on the others)
            sync = self.net.no_sync() if self.dist.enabled and not stepping else contextlib.nullcontext()
            with sync:
                loss = self._forward_backward(batch, accum)
            if stepping:
                if self.cfg.train.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.schedule.step_batch()
            total += float(loss.detach())
            count += 1
            bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{self.schedule.lr:.2e}")
        bar.close()
        t = D.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64), self.dist)
        return float(t[0] / max(t[1], 1))

    def _forward_backward(self, batch: dict, accum: int) -> torch.Tensor:
        """Loss of one micro-batch, back-propagated (scaled by 1/accum); a non-finite loss on any rank raises."""
        x = batch["image"].to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        target = batch["target"].to(self.device, non_blocking=True)
        weight = batch.get("weight")
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits = self.net(x)
        h, w = logits.shape[-2:]
        target = center_crop(target, h, w)
        if weight is not None:
            weight = center_crop(weight.to(self.device), h, w)
        if self.teacher is not None:
            tl = self._teacher_logits(x, h, w)
            loss = distillation_loss(logits, tl, target, self.cfg.train.distill_weight,
                                     self.cfg.train.distill_temperature, self.loss_fn, weight)
        else:
            loss = self.loss_fn(logits, target, weight)
        bad = not bool(torch.isfinite(loss))
        if D.any_rank(bad, self.dist):  # all ranks stop together: one rank alone would deadlock DDP
            raise _NonFinite(float(loss.detach()) if bad else float("nan"))
        self.scaler.scale(loss / accum).backward()
        return loss

    def _recover(self, reason: str, epoch: int) -> bool:
        """Restore the last good state, lower the learning rate, reseed; False when out of recoveries.

        ``epoch`` (1-based) is the epoch whose training or validation showed the collapse."""
        main = self.dist.is_main  # every rank recovers identically; rank 0 tells
        if len(self.recoveries) >= self.cfg.train.max_recoveries:
            (log.error if main else log.debug)("collapse (%s) and no recoveries left (%d used)", reason,
                                               len(self.recoveries))
            return False
        n = len(self.recoveries) + 1
        if self.good_state is not None:
            self.model.load_state_dict(self.good_state["model"])
            self.optimizer.load_state_dict(self.good_state["optimizer"])
        else:  # nothing good yet: start the weights afresh with another seed
            torch.manual_seed(self.cfg.train.seed + 1000 * n)
            for m in self.model.modules():
                if hasattr(m, "reset_parameters") and m is not self.model:
                    m.reset_parameters()
            self.optimizer.state.clear()
        new_lr = scale_lr(self.schedule, RECOVERY_LR_FACTOR)
        torch.manual_seed(self.cfg.train.seed + 1000 * n)
        self.train_cache_dataset.seed = self.cfg.train.seed + 1000 * n
        event = {"epoch": epoch, "reason": reason, "lr_now": new_lr, "recovery": n,
                 "restored": f"last good state (epoch {self.good_epoch})" if self.good_state else "fresh weights",
                 "history_len": len(self.history)}  # collapse checks look only at evaluations after this
        self.recoveries.append(event)
        (log.warning if main else log.debug)(
            "collapse guard: %s at epoch %d; restored %s, learning rate now %.2e (recovery %d of %d)",
            reason, epoch, event["restored"], new_lr, n, self.cfg.train.max_recoveries)
        return True

    def fit(self) -> TrainResult:
        """Train until the last epoch, early stopping, or an unrecoverable collapse; returns the result."""
        cfg = self.cfg
        main = self.dist.is_main
        val_idx = list(range(self.dist.rank, len(self.val_cache), self.dist.world_size))
        if main and self.out is not None:
            self.tb = _tensorboard(self.out, cfg.train.tensorboard)
        log.info("training %s (%d parameters) on %d images, validating on %d; %d patches of %d px per epoch; "
                 "device %s%s", cfg.model.preset, sum(p.numel() for p in self.model.parameters()),
                 len(self.train_samples), len(self.val_samples), self.train_cache_dataset.length,
                 cfg.data.patch_size, self.device, f", {self.dist.world_size} ranks" if self.dist.enabled else "")
        stop_reason = "finished"
        while self.epoch < cfg.train.epochs:
            t0 = time.time()
            try:
                loss = self._train_epoch()
            except _NonFinite as exc:
                if not self._recover(f"non-finite loss ({exc.value})", self.epoch + 1):
                    stop_reason = "collapsed"
                    break
                continue
            row = {"epoch": self.epoch + 1, "train_loss": loss, "lr": self.schedule.lr}
            last = self.epoch + 1 == cfg.train.epochs
            evaluated = self.val_samples and ((self.epoch + 1) % cfg.train.val_every == 0 or last)
            if evaluated:
                row.update(validate(self.model, self.val_cache, val_idx, cfg, self.info, self.device, self.dist))
            row["seconds"] = time.time() - t0
            self.history.append(row)
            self.epoch += 1
            metric = row.get(cfg.train.monitor, -loss if not self.val_samples else None)
            if evaluated or not self.val_samples:
                self.schedule.step_epoch(metric)
                since = self.recoveries[-1].get("history_len", 0) if self.recoveries else 0
                why = collapsed(self.history[since:], cfg.train.collapse_patience) if evaluated else None
                if why:
                    self._log_epoch(row)
                    if self._recover(why, self.epoch):
                        self.bad_evals = 0
                        continue
                    stop_reason = "collapsed"
                if metric is not None and metric > self.best + 1e-6:
                    self.best, self.best_epoch, self.bad_evals = float(metric), self.epoch, 0
                    if main and self.out is not None:
                        save_checkpoint(checkpoint_path(self.out, "best"),
                                        {"model": self.model.state_dict(), "epoch": self.epoch, "metrics": row,
                                         "config": cfg.to_dict(), "info": self.info})
                else:
                    self.bad_evals += 1
                if evaluated and healthy(row) and not why:
                    self.good_state, self.good_epoch = self._snapshot(), self.epoch
            self._log_epoch(row)
            if main and self.out is not None and (self.epoch % cfg.train.save_every == 0 or last):
                save_checkpoint(checkpoint_path(self.out, "last"), self._state())
                self._write_metrics()
            if stop_reason == "collapsed":
                break
            if cfg.train.early_stopping and self.bad_evals >= cfg.train.early_stopping:
                stop_reason = f"early stopping after {self.bad_evals} evaluations without improvement"
                log.info("%s", stop_reason)
                if main and self.out is not None:
                    save_checkpoint(checkpoint_path(self.out, "last"), self._state())
                break
        seconds = time.time() - self.start_time
        result = TrainResult(self.out, self.best, self.best_epoch, self.epoch, self.history, self.recoveries,
                             seconds, rank=self.dist.rank)
        tuned = None
        if main and self.out is not None:
            self._write_metrics()
            if cfg.train.tune_postprocess and self.info["task"] != "multiclass" and len(self.val_cache):
                tuned = self._tune_postprocess()
            write_json(self.out / "summary.json", {
                "best_metric": self.best, "monitor": cfg.train.monitor, "best_epoch": self.best_epoch,
                "epochs_run": self.epoch, "stop_reason": stop_reason, "recoveries": self.recoveries,
                "seconds_this_session": seconds, "last": self.history[-1] if self.history else {},
                "postprocess": tuned, "left_out": list(self.bad), "unetlab_version": __version__,
            })
            try:
                plot_curves(self.history, self.out / "curves.png")
            except Exception as exc:  # a plot must never lose a run
                log.warning("could not draw curves.png: %s", exc)
        if self.tb is not None:
            self.tb.close()
        D.barrier(self.dist)  # the run folder is complete when train() returns on any rank
        return result

    def _tune_postprocess(self) -> dict | None:
        """Tune threshold/min size (and marker distance) of instance post-processing on the validation images
        with the best weights, and store them in the run's config.yaml (used by ``predict --instances``)."""
        from dataclasses import asdict

        from ..inference.postprocess import tune_postprocess

        best = checkpoint_path(self.out, "best")
        model = copy.deepcopy(self.model)
        if best.exists():
            model.load_state_dict(load_checkpoint(best)["model"])
        probs, truths = [], []
        for i in range(min(len(self.val_cache), 200)):
            item = self.val_cache[i]
            probs.append(_predict_val_image(model, item.image, self.cfg, self.info, self.device,
                                            self.val_cache.samples[i].image).numpy())
            truths.append(item.labels)
        try:
            pp = tune_postprocess(probs, truths, self.info["target"], base=self.cfg.postprocess)
        except Exception as exc:  # tuning is a convenience: never lose a finished run over it
            log.warning("post-processing was not tuned: %s", exc)
            return None
        self.cfg.postprocess = pp
        self.cfg.save(self.out / "config.yaml")
        from ..evaluation.metrics import as_instance_labels, match_objects, pool_matches
        from ..inference.postprocess import probabilities_to_labels

        pooled = pool_matches([match_objects(probabilities_to_labels(p, self.info["target"], pp),
                                             as_instance_labels(t)) for p, t in zip(probs, truths)])
        scores = {"ap50": pooled["ap"][0], "ap_mean": pooled["ap_mean_pooled"], "dsb_score": pooled["dsb_score"],
                  "n_images": len(probs)}
        log.info("post-processing tuned on %d validation images: threshold %.2f, min size %d, prominence %s; "
                 "object AP@0.5 %.3f, mean AP@0.5:0.95 %.3f (DSB score %.3f)", len(probs), pp.threshold,
                 pp.min_size, pp.prominence, scores["ap50"], scores["ap_mean"], scores["dsb_score"])
        return {**asdict(pp), "validation_objects": scores}

    def _log_epoch(self, row: dict) -> None:
        if not self.dist.is_main:
            return
        parts = [f"epoch {row['epoch']}/{self.cfg.train.epochs}", f"loss {row['train_loss']:.4f}"]
        if "val_dice" in row:
            parts.append(f"val Dice {row['val_dice']:.4f}")
        parts += [f"lr {row['lr']:.2e}", f"{row['seconds']:.1f}s"]
        log.info("  ".join(parts))
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["epoch"])

    def _write_metrics(self) -> None:
        keys: list[str] = []
        for r in self.history:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.history)
        text = buf.getvalue()
        write_text(self.out / "metrics.csv", text)


def _numpy_rng_state() -> dict:
    """numpy's global RNG state as plain values and a tensor (a checkpoint loads with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_rng_state(state: dict) -> None:
    """Inverse of :func:`_numpy_rng_state`."""
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]))


class _NonFinite(Exception):
    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


def _tensorboard(out: Path, enabled: bool):
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        log.warning("TensorBoard logging skipped: %s (pip install \"unetlab[tensorboard]\", or --tensorboard "
                    "false to silence this); metrics.csv and curves.png are written as usual", exc)
        return None
    try:
        return SummaryWriter(log_dir=str(out / "tensorboard"))
    except OSError as exc:
        log.warning("TensorBoard logging skipped: cannot write %s (%s)", out / "tensorboard", exc)
        return None


def plot_curves(history: list[dict], path: Path) -> Path:
    """Training loss and validation metrics against epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(ep, [h["train_loss"] for h in history], "-o", ms=3, label="training loss")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.set_yscale("log")
    a.legend()
    vals = [(h["epoch"], h["val_dice"], h.get("val_iou")) for h in history if "val_dice" in h]
    if vals:
        b.plot([v[0] for v in vals], [v[1] for v in vals], "-o", ms=3, label="validation Dice")
        b.plot([v[0] for v in vals], [v[2] for v in vals], "-s", ms=3, label="validation IoU")
        best = max(vals, key=lambda v: v[1])
        b.axvline(best[0], color="gray", ls=":", lw=1)
        b.set_title(f"best Dice {best[1]:.4f} at epoch {best[0]}")
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    data = buf.getvalue()
    return write_bytes(path, data)


def train(cfg: RunConfig | None, out: str | Path | None, resume: bool = False, overwrite: bool = False,
          progress: bool | None = None, skip_bad: bool = False) -> TrainResult:
    """Train a U-Net as ``cfg`` describes, writing the run folder ``out``; ``resume`` continues a stopped run.

    ``skip_bad`` leaves out unreadable, unpaired or mismatched files (listed in ``TrainResult.bad``) instead
    of stopping. A new run that fails before its first checkpoint leaves no run folder behind.
    """
    out = Path(out) if out is not None else None
    existed = out is not None and out.exists()
    new = out is not None and not resume and (not existed or (out.is_dir() and not any(out.iterdir())))
    new = new and D.launch_rank() == 0  # under torchrun rank 0 owns the folder (and undoes it)
    try:
        trainer = Trainer(cfg, out, resume=resume, overwrite=overwrite, skip_bad=skip_bad, progress=progress)
    except BaseException:
        if new:
            _remove_unstarted_run(out, existed)
        raise
    try:
        result = trainer.fit()
        result.bad = list(trainer.bad)
        return result
    except BaseException:
        if new:
            _remove_unstarted_run(out, existed)
        raise
    finally:
        D.cleanup(trainer.dist)


def make_train_loader(dataset: PatchDataset, sampler: EpochSampler, cfg: RunConfig, device: torch.device,
                      dist_info: D.DistInfo) -> DataLoader:
    """The training DataLoader: patches cut and augmented in ``cfg.data.num_workers`` worker processes (None or
    negative: :func:`default_num_workers`), which fork after the images are decoded so they share the cache."""
    workers = resolve_num_workers(cfg.data.num_workers, device.type, dist_info.local_world_size)
    if workers > 0:
        dataset.precompute()  # decoded images, foreground indices and weight maps: made once, shared
    return DataLoader(
        dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=workers, drop_last=True,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        pin_memory=device.type == "cuda",
    )


def check_loaded(cache: SampleCache, image_channels: int) -> list[str]:
    """Read every sample of ``cache`` (kept when caching) and check its channels; the names of empty masks."""
    empty = []
    for i in range(len(cache)):
        item = cache[i]
        if item.image.shape[0] != image_channels:
            raise UnetlabError(
                f"image has {item.image.shape[0]} channel(s), the first training image has {image_channels}",
                cache.samples[i].image, "give all images the same channels, or --skip-bad leaves it out")
        if not item.labels.any():
            empty.append(cache.samples[i].name)
    return empty


def _remove_unstarted_run(out: Path, existed: bool) -> None:
    """Undo the folder of a new run that stopped before its first checkpoint, so the command can run again."""
    import shutil

    if not out.is_dir() or any((out / "checkpoints").glob("*.pt")):
        return
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in out.iterdir():  # the folder was there (empty) before: keep it, empty again
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


__all__ = ["TrainResult", "Trainer", "train", "plot_curves", "load_split", "read_json"]
