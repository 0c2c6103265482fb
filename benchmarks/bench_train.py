"""Training throughput: unetlab's trainer against a plain PyTorch loop over the same model and data, and the
data pipeline's own samples/s, in the same process.

unet-slim on 256x256 patches of synthetic 16-bit cells (batch 8, BCE+Dice, AdamW):

- unetlab: ``Trainer`` as ``unetlab train`` builds it (its defaults: precision 'auto', channels-last, the
  configured ``num_workers``, decoded images cached before worker processes fork), timing one epoch of
  ``--samples`` patches through its own training step (no validation, no checkpoints);
- plain: the same network, loss, optimiser and ``PatchDataset`` in a textbook loop: fp32, contiguous tensors,
  ``DataLoader(dataset, batch_size=8, shuffle=True)`` with default settings.

Runs alternate and the median counts. Rows: samples/s, speed-up over the plain loop, and ablations (workers,
memory format). A second table gives the data pipeline alone (the trainer's DataLoader without the network),
with default and with heavy augmentation, against the samples/s training consumes.

    python benchmarks/bench_train.py [--samples 48] [--repeats 3] [--device cuda] [--no-ablations]

Results: benchmarks/results/bench_train.json.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from unetlab._runtime import resolve_device, tune_allocator, use_channels_last  # noqa: E402
from unetlab.config import RunConfig, apply_overrides  # noqa: E402
from unetlab.data.dataset import PatchDataset, resolve_num_workers  # noqa: E402
from unetlab.data.synthetic import write_synthetic_dataset  # noqa: E402
from unetlab.models import build_model  # noqa: E402
from unetlab.training.schedules import build_optimizer  # noqa: E402
from unetlab.training.setup import make_loss_fn  # noqa: E402
from unetlab.training.trainer import Trainer  # noqa: E402

HEAVY_AUG = {"aug_affine": 0.5, "aug_elastic": 0.5, "aug_brightness": 0.5, "aug_contrast": 0.5, "aug_gamma": 0.3,
             "aug_noise": 0.3, "aug_blur": 0.3}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=C.description(__doc__))
    p.add_argument("--preset", default="unet-slim")
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=48, help="patches per timed epoch (default 48 = 6 batches)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs of each head-to-head row")
    p.add_argument("--ablation-repeats", type=int, default=2)
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="num_workers values for ablation rows")
    p.add_argument("--data-samples", type=int, default=256, help="patches per data-pipeline measurement")
    p.add_argument("--images", type=int, default=8, help="synthetic training images (512x512)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def make_config(root: Path, args: argparse.Namespace, **over) -> RunConfig:
    """The run config ``unetlab train --data root --preset ... --patch-size 256 --batch-size 8`` would build."""
    return apply_overrides(RunConfig(), {"root": str(root), "preset": args.preset, "patch_size": args.patch,
                                         "batch_size": args.batch_size, "samples_per_epoch": args.samples,
                                         "tensorboard": False, "device": args.device, "val_fraction": 0.125,
                                         **over})


def trainer_epoch(cfg: RunConfig) -> tuple[Trainer, Callable[[], None]]:
    """A Trainer without a run folder, and a function running one training epoch of it."""
    trainer = Trainer(cfg, None, progress=False)

    def epoch():
        trainer._train_epoch()
        trainer.epoch += 1

    return trainer, epoch


def plain_epoch(trainer: Trainer, cfg: RunConfig, device: torch.device) -> Callable[[], None]:
    """The textbook loop over the same network (a contiguous copy of the trainer's initial weights), loss,
    optimiser and patches."""
    model_cfg = replace(cfg.model, in_channels=trainer.info["in_channels"], out_channels=trainer.info["out_channels"])
    model = build_model(model_cfg).to(device)
    model.load_state_dict({k: v.detach().contiguous() for k, v in trainer.model.state_dict().items()})
    loss_fn = make_loss_fn(cfg, trainer.info)
    optimizer = build_optimizer(model, cfg.train, float(cfg.train.lr))
    dataset = PatchDataset(trainer.train_samples, cfg.data, cfg.data.patch_size, cfg.data.samples_per_epoch,
                           multiclass=trainer.info["task"] == "multiclass", seed=cfg.train.seed)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True)

    def epoch():
        model.train()
        for batch in loader:
            x, y = batch["image"].to(device), batch["target"].to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(x), y, None)
            loss.backward()
            optimizer.step()

    return epoch


def pipeline_rate(loader: DataLoader, sampler, samples: int) -> float:
    """Samples/s of iterating ``loader`` (an epoch of ``samples``) after one warm-up epoch."""
    rates = []
    for epoch in range(2):
        sampler.set_epoch(100 + epoch)
        t = time.perf_counter()
        n = sum(b["image"].shape[0] for b in loader)
        rates.append(n / (time.perf_counter() - t))
    return rates[-1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tune_allocator()
    C.set_threads(args.threads)
    device = resolve_device(args.device)
    info = C.machine_info(device)
    tmp = tempfile.TemporaryDirectory(prefix="unetlab_bench_train_")
    root = write_synthetic_dataset(Path(tmp.name) / "cells", n_images=args.images, size=(512, 512), seed=2)
    base = make_config(root, args)
    log(f"building the trainer ({args.preset}, {args.patch} px patches, batch {args.batch_size}) ...")
    trainer, unetlab_fn = trainer_epoch(base)
    plain_fn = plain_epoch(trainer, base, device)  # built before the trainer's first step: same initial weights
    cl_default = use_channels_last(base.train.channels_last, device)
    workers_default = resolve_num_workers(base.data.num_workers, device.type)
    cfg_desc = (f"unetlab trainer (defaults: precision {base.train.precision}, channels_last "
                f"{cl_default}, num_workers {workers_default})")
    head = {cfg_desc: unetlab_fn, "plain PyTorch loop (fp32, contiguous, default DataLoader)": plain_fn}
    log(f"head to head: {len(head)} rows x {args.repeats} alternating epochs of {args.samples} patches ...")
    timings = C.time_alternating(head, args.repeats, device, log=log)

    if not args.no_ablations:
        fns = {}
        for w in args.workers:
            if w == workers_default:
                continue
            _t, fns[f"unetlab trainer, num_workers {w}"] = trainer_epoch(make_config(root, args, num_workers=w))
        _t, fns[f"unetlab trainer, channels_last {not cl_default}"] = trainer_epoch(
            make_config(root, args, channels_last=not cl_default))
        if device.type == "cpu" and torch.get_num_threads() > 1:  # on a shared machine one thread can win
            fns["unetlab trainer, 1 thread"] = C.with_threads(unetlab_fn, 1)
            fns["plain PyTorch loop, 1 thread"] = C.with_threads(plain_fn, 1)
        log(f"ablations: {len(fns)} rows x {args.ablation_repeats} alternating epochs ...")
        timings.update(C.time_alternating(fns, args.ablation_repeats, device, log=log))

    plain_key = "plain PyTorch loop (fp32, contiguous, default DataLoader)"
    plain_rate = args.samples / timings[plain_key]["median_wall"]
    rows = []
    for label, t in timings.items():
        rate = args.samples / t["median_wall"]
        rows.append({"row": label, "samples_per_s": rate, "speedup_vs_plain": rate / plain_rate,
                     "seconds_per_epoch": t["median_wall"], "runs": len(t["wall"]), "all_seconds": t["wall"]})
    train_rate = args.samples / timings[cfg_desc]["median_wall"]

    log("data pipeline alone ...")
    pipe_rows = []
    for aug_name, over in (("default augmentation", {}), ("heavy augmentation", HEAVY_AUG)):
        for w in sorted({workers_default, *args.workers}):
            cfg = make_config(root, args, num_workers=w, samples_per_epoch=args.data_samples, **over)
            t = Trainer(cfg, None, progress=False)
            rate = pipeline_rate(t.loader, t.sampler, args.data_samples)
            pipe_rows.append({"row": f"{aug_name}, num_workers {w}", "samples_per_s": rate,
                              "vs_training": rate / train_rate})
            del t

    info["load_average_end"] = C.load_average()
    print(f"\ntraining throughput: {args.preset}, {args.patch}x{args.patch} patches, batch {args.batch_size}, "
          f"device {device}, {info['torch_threads']} thread(s), {args.samples} patches per timed epoch")
    C.print_table(rows, [("row", "", ""), ("samples_per_s", "samples/s", ".2f"),
                         ("speedup_vs_plain", "vs plain", ".2f"), ("seconds_per_epoch", "s/epoch (median)", ".1f"),
                         ("runs", "runs", "d")])
    print(f"\ndata pipeline alone (the trainer's DataLoader, no network); training consumes {train_rate:.2f} "
          "samples/s")
    C.print_table(pipe_rows, [("row", "", ""), ("samples_per_s", "samples/s", ".1f"),
                              ("vs_training", "x training's need", ".0f")])
    print(f"\n{C.contention_note(info)}")
    path = C.write_results("bench_train", {
        "benchmark": "train", "command": " ".join(["python", "benchmarks/bench_train.py", *sys.argv[1:]]),
        "args": vars(args), "machine": info, "rows": rows, "data_pipeline": pipe_rows,
        "training_samples_per_s": train_rate, "median_data_rate": statistics.median(r["samples_per_s"]
                                                                                     for r in pipe_rows),
        "contention": C.contention_note(info),
    }, args.json)
    print(f"results: {path}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
