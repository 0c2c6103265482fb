"""The training loop: patches in, a run folder out; validation, checkpoints, resume and the collapse guard.

``train(cfg, out)`` is the whole story: read and split the data, build the model, loss, optimiser and schedule
(:mod:`.setup`), then per epoch train on random patches, validate on whole images with the tiled predictor
(:mod:`.validation`), write metrics and atomic checkpoints (:mod:`.reporting`), and recover a collapsed run
(:mod:`.guard`). ``train(..., resume=True)`` continues a stopped run exactly where its last checkpoint was.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .. import distributed as D
from .._runtime import (
    resolve_device,
    rng_state,
    seed_everything,
    set_deterministic,
    set_rng_state,
    tune_allocator,
    use_channels_last,
)
from ..config import RunConfig
from ..data.dataset import SampleCache
from ..data.split import load_split
from ..errors import UnetlabError
from ..inference.predictor import precision_name, resolve_precision
from ..runfolder import checkpoint_path, load_checkpoint, load_weights, read_json, save_checkpoint, write_json
from .decisions import (
    best_in_history,
    check_monitor,
    decide,
    micro_batch_plan,
    monitor_mode,
    monitored,
    optimizer_steps,
    worst,
)
from .ema import weight_average
from .guard import recover
from .losses import distillation_loss
from .lrfind import lr_find
from .reporting import (
    draw_curves,
    log_epoch,
    plot_curves,
    tensorboard_writer,
    time_budget_reached,
    write_metrics,
    write_summary,
)
from .schedules import build_optimizer, build_scheduler
from .setup import (
    Setup,
    bad_file_hint,
    build_setup,
    build_train_data,
    center_crop,
    check_loaded,
    finished_note,
    make_loss_fn,
    prepare_run_dir,
    remove_unstarted_run,
)
from .sizefit import fit_size_model_after_training
from .teacher import load_teacher, teacher_logits
from .tuning import score_test_split, tune_on_validation
from .validation import validate

log = logging.getLogger(__name__)


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
    monitor: str = ""  # what best_metric measures: train.monitor, or train_loss for a run without validation


class Trainer:
    """One training run; ``fit()`` runs it. Created by :func:`train`."""

    def __init__(self, cfg: RunConfig | None, out: Path | None, resume: bool = False, overwrite: bool = False,
                 skip_bad: bool = False, progress: bool | None = None) -> None:
        """Build everything for the run (and check or create its folder); ``resume`` restores its last checkpoint."""
        tune_allocator()
        self.out = Path(out) if out is not None else None
        self.progress = progress
        cfg = self._checked_config(cfg, resume)  # before anything is written
        self._start_device(cfg)
        if self.out is not None:  # rank 0 checks and creates the folder, the others wait (and share its error)
            D.run_on_main(partial(prepare_run_dir, self.out, resume, overwrite, True, cfg), self.dist)
        # read the checkpoint to resume before anything is written: a damaged one then changes nothing
        resume_state = load_checkpoint(checkpoint_path(self.out, "last")) if resume and self.out else None
        seed_everything(cfg.train.seed)
        self._resolve_lr(cfg)
        self.cfg = cfg
        s = build_setup(cfg, self.out, resume, self.dist, skip_bad=skip_bad)
        check_monitor(cfg.train.monitor, s.info["task"], s.info["classes"])  # a class name, now they are known
        self.info, self.train_samples, self.val_samples = s.info, s.train_samples, s.val_samples
        self.bad, self.test_samples = s.bad, s.test_samples
        self._build_model(s)
        self._build_training(s)
        self._start_state()
        if resume_state is not None:  # before anything is written: a checkpoint that does not fit changes nothing
            self._restore(resume_state)
        if self.out is not None and self.dist.is_main:
            cfg.save(self.out / "config.yaml")
            write_json(self.out / "model.json", self.info)

    # -- building, step by step ----------------------------------------------------------------------------
    def _checked_config(self, cfg: RunConfig | None, resume: bool) -> RunConfig:
        """The run's config (a resumed run's own when ``cfg`` is None), its monitor and device name checked."""
        if cfg is None:  # resume with the run's own config
            if not resume or self.out is None:
                raise UnetlabError("a config is needed to start a run")
            cfg = RunConfig.load(self.out / "config.yaml")
        check_monitor(cfg.train.monitor)
        return cfg

    def _start_device(self, cfg: RunConfig) -> None:
        """The device (cuda:LOCAL_RANK under torchrun), the process group and the determinism settings."""
        device = resolve_device(cfg.train.device)
        set_deterministic(cfg.train.deterministic, device)  # before the first CUDA operation
        self.dist = D.init_distributed(device.type)
        device = D.rank_device(device, self.dist)  # cuda:LOCAL_RANK under torchrun
        if self.dist.enabled and device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        if self.dist.enabled and cfg.train.sync_batchnorm and device.type != "cuda":
            raise UnetlabError("sync_batchnorm needs CUDA GPUs (torch has no SyncBatchNorm on CPU)",
                               hint="use --sync-batchnorm false, or --norm group (independent of the batch)")

    def _resolve_lr(self, cfg: RunConfig) -> None:
        """``--lr auto``: run the learning-rate finder (every rank gets the same rate); refuse other words."""
        if cfg.train.lr == "auto":
            found = lr_find(cfg)
            log.info("lr-find suggests a learning rate of %.2e", found.suggestion)
            cfg.train.lr = D.broadcast_object(float(found.suggestion), self.dist)  # every rank the same
        elif isinstance(cfg.train.lr, str):
            raise UnetlabError(f"bad learning rate '{cfg.train.lr}' (a number or 'auto')")

    def _build_model(self, s: Setup) -> None:
        """The network on its device and memory format, SyncBatchNorm and DDP when distributed."""
        self.model = s.model.to(self.device)
        self.channels_last = use_channels_last(self.cfg.train.channels_last, self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.dist.enabled and self.cfg.train.sync_batchnorm:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.ema = weight_average(self.model, float(self.cfg.train.ema))  # --ema: None when off
        self.scored = self.ema.model if self.ema is not None else self.model  # what validation and best.pt see
        self.net: nn.Module = self.model
        if self.dist.enabled:
            self.net = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    def _build_training(self, s: Setup) -> None:
        """Loss, patches and loader, optimiser and schedule, validation images, precision and teacher."""
        cfg, device = self.cfg, self.device
        self.loss_fn = make_loss_fn(cfg, self.info)
        # every training sample is read (and cached) now: bad files fail here, before any training
        self.train_cache_dataset, self.sampler, self.loader = build_train_data(cfg, s, device, self.dist)
        if self.info["task"] != "multiclass":  # the objects' size, for predict --diameter
            d = self.train_cache_dataset.diameter
            self.info["diameter"] = round(d, 2) if d is not None else None
        self.steps_per_epoch = optimizer_steps(len(self.loader), cfg.train.grad_accumulation)
        self.optimizer = build_optimizer(self.model, cfg.train, float(cfg.train.lr))
        self.schedule = build_scheduler(self.optimizer, cfg.train, self.steps_per_epoch, cfg.train.epochs)
        self.val_cache = SampleCache(self.val_samples, cfg.data)
        check_loaded(self.val_cache, self.info["image_channels"])  # a bad validation file fails now too
        self.amp_dtype = resolve_precision(cfg.train.precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.teacher = load_teacher(cfg, self.info, device)

    def _start_state(self) -> None:
        """The run's progress before its first epoch: history, best score, the collapse guard's restore point."""
        self.monitor = monitored(self.cfg.train.monitor, bool(self.val_samples))
        self.mode = monitor_mode(self.monitor)  # which way the monitor is better (a loss: lower)
        if self.monitor != self.cfg.train.monitor:
            log.info("no validation images: the best checkpoint is the one with the lowest %s", self.monitor)
        self.epoch = 0
        self.history: list[dict] = []
        self.recoveries: list[dict] = []
        self.best = worst(self.mode)
        self.best_epoch = -1
        self.good_state: dict | None = None  # the collapse guard's restore point (latest healthy evaluation)
        self.good_epoch = -1
        self.bad_evals = 0
        self.start_time = time.time()
        self.tb = None

    # -- state ---------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        """Everything a checkpoint needs to resume this run exactly (weights, optimiser, schedule, RNG, ...)."""
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "history": self.history, "recoveries": self.recoveries,
            "best": self.best, "best_epoch": self.best_epoch,
            "monitor": self.monitor,  # what best measures (a resume with another monitor recomputes it)
            "bad_evals": self.bad_evals,
            # the restore point: usually this very state (then not stored twice), else its own copy
            "good_epoch": self.good_epoch,
            "good_state": self.good_state if self.good_epoch != self.epoch else None,
            "rng": rng_state(),
            "config": self.cfg.to_dict(),
            "info": self.info,
            "world_size": self.dist.world_size,
        }

    def _restore(self, state: dict) -> None:
        """Continue from a checkpoint's :meth:`_state` (a resume)."""
        load_weights(self.model, state["model"], checkpoint_path(self.out, "last"))
        if self.ema is not None:
            self.ema.resume(state.get("ema"), self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.history = list(state["history"])
        self.recoveries = list(state["recoveries"])
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
        # a checkpoint without a monitor is from a version that maximised every monitor, losses too
        if state.get("monitor", self.monitor if self.mode == "max" else None) != self.monitor:
            self.best, self.best_epoch = best_in_history(self.history, self.monitor, bool(self.val_samples))
            log.info("best %s recomputed from the run's history: %.4f at epoch %d", self.monitor, self.best,
                     self.best_epoch)
        self.bad_evals = int(state.get("bad_evals", 0))
        self.good_epoch = int(state.get("good_epoch", -1))
        if self.good_epoch == self.epoch and self.good_epoch >= 0:
            self.good_state = self._snapshot()
        else:
            self.good_state = state.get("good_state")
        if self.recoveries:  # a recovery reseeded the patch stream
            self.train_cache_dataset.seed = self.cfg.train.seed + 1000 * len(self.recoveries)
        set_rng_state(state["rng"])
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size and self.dist.is_main:
            b = self.cfg.train.batch_size * self.cfg.train.grad_accumulation
            log.warning("resuming a run trained on %d process(es) with %d: the global batch changes from %d to %d",
                        saved_world, self.dist.world_size, b * saved_world, b * self.dist.world_size)
        log.info("resuming at epoch %d (best %s %.4f at epoch %d)%s", self.epoch + 1, self.cfg.train.monitor,
                 self.best, self.best_epoch, finished_note(self.epoch, self.cfg.train.epochs))

    def _snapshot(self) -> dict:
        """A copy of the weights and optimiser state: the collapse guard's restore point."""
        return {"model": copy.deepcopy(self.model.state_dict()),
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    # -- one epoch -----------------------------------------------------------------------------------------
    def _train_epoch(self) -> float:
        """Train one epoch on the patch loader; the mean training loss over all ranks."""
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
        # groups of `accum` micro-batches, the last one of the epoch shorter when `accum` does not divide
        plan = micro_batch_plan(len(self.loader), accum)
        for step, batch in enumerate(bar):
            group, stepping = plan[step]
            # DDP: gradients are all-reduced only on the micro-batch that steps (no_sync on the others)
            sync = self.net.no_sync() if self.dist.enabled and not stepping else contextlib.nullcontext()
            with sync:
                loss = self._forward_backward(batch, group)
            if stepping:
                if self.cfg.train.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.schedule.step_batch()
                if self.ema is not None:
                    self.ema.update(self.model)
            total += float(loss.detach())
            count += 1
            bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{self.schedule.lr:.2e}")
        bar.close()
        t = D.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64), self.dist)
        return float(t[0] / max(t[1], 1))

    def _forward_backward(self, batch: dict, group: int) -> torch.Tensor:
        """Loss of one micro-batch, back-propagated scaled by 1/``group`` (the size of its accumulation group, so
        a step follows the group's mean gradient); a non-finite loss on any rank raises."""
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
            tl = teacher_logits(self.teacher, x, h, w)
            loss = distillation_loss(logits, tl, target, self.cfg.train.distill_weight,
                                     self.cfg.train.distill_temperature, self.loss_fn, weight)
        else:
            loss = self.loss_fn(logits, target, weight)
        bad = not bool(torch.isfinite(loss))
        if D.any_rank(bad, self.dist):  # all ranks stop together: one rank alone would deadlock DDP
            raise _NonFinite(float(loss.detach()) if bad else float("nan"))
        self.scaler.scale(loss / group).backward()
        return loss

    def _recover(self, reason: str, epoch: int) -> bool:
        """The collapse guard's recovery (:func:`guard.recover`); False when out of recoveries."""
        return recover(self, reason, epoch)

    def fit(self) -> TrainResult:
        """Train until the last epoch, early stopping, or an unrecoverable collapse; returns the result."""
        cfg = self.cfg
        main = self.dist.is_main
        val_idx = list(range(self.dist.rank, len(self.val_cache), self.dist.world_size))
        if main and self.out is not None:
            self.tb = tensorboard_writer(self.out, cfg.train.tensorboard)
        log.info("training %s (%d parameters) on %d images, validating on %d; %d patches of %d px per epoch; "
                 "device %s, precision %s%s", cfg.model.preset, sum(p.numel() for p in self.model.parameters()),
                 len(self.train_samples), len(self.val_samples), self.train_cache_dataset.length, cfg.data.patch_size,
                 self.device, precision_name(self.amp_dtype), f", {self.dist.world_size} ranks" if self.dist.enabled else "")
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
            evaluated = bool(self.val_samples) and ((self.epoch + 1) % cfg.train.val_every == 0 or last)
            if evaluated:
                row.update(validate(self.scored, self.val_cache, val_idx, cfg, self.info, self.device, self.dist))
            row["seconds"] = time.time() - t0
            self.history.append(row)
            self.epoch += 1
            stop = self._end_epoch(row, evaluated, last)
            if stop == _RECOVERED:
                continue
            if stop:
                stop_reason = stop
                break
            out_of_time = time_budget_reached(time.time() - self.start_time, row["seconds"], cfg.train.max_minutes)
            if D.any_rank(out_of_time, self.dist):  # every rank stops at the same epoch
                stop_reason = f"time budget of {cfg.train.max_minutes:g} min (max_minutes) reached"
                log.info("%s after epoch %d", stop_reason, self.epoch)
                if main and self.out is not None:
                    save_checkpoint(checkpoint_path(self.out, "last"), self._state())
                break
        seconds = time.time() - self.start_time
        result = TrainResult(self.out, self.best, self.best_epoch, self.epoch, self.history, self.recoveries,
                             seconds, rank=self.dist.rank, monitor=self.monitor)
        tuned = None
        if main and self.out is not None:
            self._write_metrics()
            if cfg.train.tune_postprocess and len(self.val_cache):  # instance targets only (tuning's rule)
                tuned = tune_on_validation(self.model, self.out, cfg, self.info, self.val_cache, self.device)
            # the size model (size_model.json) of --diameter auto, fitted on the best weights after training
            fit_size_model_after_training(self.out, cfg, self.info, self.train_samples, self.val_samples)
            test = score_test_split(self.model, self.out, cfg, self.info, self.test_samples, self.device)
            write_summary(self.out / "summary.json", best_metric=self.best, monitor=self.monitor,
                          best_epoch=self.best_epoch, epochs_run=self.epoch, stop_reason=stop_reason,
                          recoveries=self.recoveries, seconds=seconds, history=self.history, postprocess=tuned,
                          left_out=self.bad, test=test, precision=precision_name(self.amp_dtype))
            draw_curves(self.history, self.out / "curves.png")
        if self.tb is not None:
            self.tb.close()
        D.barrier(self.dist)  # the run folder is complete when train() returns on any rank
        return result

    def _end_epoch(self, row: dict, evaluated: bool, last: bool) -> str | None:
        """Act on the epoch's :func:`~.decisions.decide`: schedule, guard, best and last checkpoints; why to stop
        (``_RECOVERED``: the guard restored an earlier state, go on with the next epoch)."""
        cfg = self.cfg
        since = self.recoveries[-1].get("history_len", 0) if self.recoveries else 0
        d = decide(row, self.history[since:], evaluated=evaluated, has_val=bool(self.val_samples),
                   monitor=cfg.train.monitor, best=self.best, bad_evals=self.bad_evals,
                   collapse_patience=cfg.train.collapse_patience, early_stopping=cfg.train.early_stopping)
        if d.counted:
            self.schedule.step_epoch(d.metric, self.mode)
        stop = d.stop
        if d.collapse and self.epoch < cfg.train.epochs:  # at the last epoch best.pt already holds the best
            self._log_epoch(row)  # the collapsed epoch's line, before the guard's
            if self._recover(d.collapse, self.epoch):
                self.bad_evals = 0
                return _RECOVERED
            stop = "collapsed"
        self.bad_evals = d.bad_evals
        if d.improved:
            self.best, self.best_epoch = float(d.metric), self.epoch
            self._save_best(row)
        if d.restore_point:
            self.good_state, self.good_epoch = self._snapshot(), self.epoch
        if not d.collapse:  # a collapsed epoch's line is logged above
            self._log_epoch(row)
        if d.stop:
            log.info("%s", d.stop)
        if self.dist.is_main and self.out is not None and (self.epoch % cfg.train.save_every == 0 or last or d.stop):
            save_checkpoint(checkpoint_path(self.out, "last"), self._state())
            self._write_metrics()
        return stop

    def _save_best(self, row: dict) -> None:
        """Write checkpoints/best.pt (rank 0): the weights of this epoch, its metrics, config and model info."""
        if self.dist.is_main and self.out is not None:
            save_checkpoint(checkpoint_path(self.out, "best"),
                            {"model": self.scored.state_dict(), "epoch": self.epoch, "metrics": row,
                             "config": self.cfg.to_dict(), "info": self.info})

    def _log_epoch(self, row: dict) -> None:
        """Log an epoch's line (and its TensorBoard scalars) on rank 0."""
        if self.dist.is_main:
            log_epoch(row, self.cfg.train.epochs, self.tb, self.history, self.cfg.train.max_minutes)

    def _write_metrics(self) -> None:
        """Write the history so far to the run's metrics.csv."""
        write_metrics(self.history, self.out / "metrics.csv")


_RECOVERED = "recovered"  # _end_epoch: the collapse guard restored an earlier state


class _NonFinite(Exception):
    """A training loss that is not finite (on any rank): the collapse guard takes over."""

    def __init__(self, value: float) -> None:
        """Remember the offending loss ``value``."""
        super().__init__(value)
        self.value = value


def train(cfg: RunConfig | None, out: str | Path | None, resume: bool = False, overwrite: bool = False,
          progress: bool | None = None, skip_bad: bool = False) -> TrainResult:
    """Train a U-Net as ``cfg`` describes, writing the run folder ``out`` (None: nothing is written, the result
    is only returned); ``resume`` continues a stopped run.

    ``skip_bad`` leaves out unreadable, unpaired or mismatched files (listed in ``TrainResult.bad``) instead of
    stopping. A new run that fails before its first checkpoint leaves no run folder behind."""
    out = Path(out) if out is not None else None
    existed = out is not None and out.exists()
    new = out is not None and not resume and (not existed or (out.is_dir() and not any(out.iterdir())))
    new = new and D.launch_rank() == 0  # under torchrun rank 0 owns the folder (and undoes it)
    try:
        with bad_file_hint(skip_bad):
            trainer = Trainer(cfg, out, resume=resume, overwrite=overwrite, skip_bad=skip_bad, progress=progress)
    except BaseException:
        if new:
            remove_unstarted_run(out, existed)
        raise
    try:
        result = trainer.fit()
        result.bad = list(trainer.bad)
        return result
    except BaseException:
        if new:
            remove_unstarted_run(out, existed)
        raise
    finally:
        D.cleanup(trainer.dist)


__all__ = ["TrainResult", "Trainer", "train", "plot_curves", "load_split", "read_json"]
