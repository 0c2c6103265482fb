"""unetlab's default predictor against MONAI's sliding_window_inference on one large image, in the same process.

A unet-slim network briefly trained on synthetic cells (cached under benchmarks/results/_runs) predicts a
2048x2048 synthetic 16-bit image with 512 px tiles and 25% overlap, both ways, alternating runs:

- unetlab: ``Predictor.from_run`` defaults (inference mode, BN folded into the convs, channels-last, tiles in
  batches of 4, precision 'auto' = bf16 only where the CPU has native bf16, Gaussian weights computed once);
- MONAI: ``sliding_window_inference(mode="gaussian")`` on the same module in fp32 under ``torch.no_grad()``, as
  a MONAI user runs it (default sw_batch_size=1; a row with sw_batch_size=4 is shown too).

Reported per row: median seconds, megapixels/s, speed-up over MONAI, achieved conv GFLOP/s (FLOPs of the tiles
actually run, counted by hooks on the conv layers) as a share of the conv peak measured in the same run (fp32 and
bf16 measured; the share uses the better one), and the share of mask pixels that agree with MONAI's mask.
Ablation rows switch the predictor's speed-ups off one at a time.

    python benchmarks/bench_inference.py [--size 2048] [--repeats 5] [--device cuda] [--no-ablations]

Needs MONAI (``pip install monai``, the ``bench`` extra). Results: benchmarks/results/bench_inference.json.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from unetlab._runtime import resolve_device, tune_allocator  # noqa: E402
from unetlab.inference.predictor import Predictor, make_predict_fn, resolve_precision  # noqa: E402
from unetlab.runfolder import load_run  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def masks_of(prob: np.ndarray, activation: str) -> np.ndarray:
    """Binary (sigmoid: p > 0.5 per channel) or class (softmax: argmax) masks of a (K, H, W) probability map."""
    return prob > 0.5 if activation == "sigmoid" else prob.argmax(0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=C.description(__doc__))
    p.add_argument("--size", type=int, default=2048, help="image height and width (default 2048)")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--batch-size", type=int, default=4, help="unetlab's tiles per batch (its default, 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each of the two head-to-head rows")
    p.add_argument("--ablation-repeats", type=int, default=2)
    p.add_argument("--no-ablations", action="store_true", help="only unetlab default vs MONAI")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--preset", default="unet-slim")
    p.add_argument("--run", default=None, help="use this trained run folder instead of the cached benchmark one")
    p.add_argument("--retrain", action="store_true", help="train the benchmark model again")
    p.add_argument("--compile", action="store_true", help="add a row with torch.compile (compiles first)")
    p.add_argument("--onnx", action="store_true", help="add a row with the onnxruntime backend")
    p.add_argument("--json", default=None, help="where to write the results (default benchmarks/results/)")
    return p.parse_args(argv)


@dataclass
class Bench:
    """What every timed row shares: the run, the prepared image, and each row's tile counter and output."""

    args: argparse.Namespace
    run: object
    device: torch.device
    x: np.ndarray
    counters: dict[str, C.TileCounter] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)

    def unetlab_row(self, name: str, predictor: Predictor) -> Callable[[], None]:
        """A timed call of ``predictor`` on the image, its tiles counted under ``name``."""
        counter = self.counters[name] = C.TileCounter(predictor.predict_fn, self.run.model, self.device)
        p = replace(predictor, predict_fn=counter)

        def fn() -> None:
            counter.reset()
            self.outputs[name] = p.predict_prepared(self.x)

        return fn

    def monai_row(self, name: str, sw_batch: int) -> Callable[[], None]:
        """A timed MONAI sliding_window_inference on the trained module in fp32, as a MONAI user runs it."""
        from monai.inferers import sliding_window_inference

        plain = copy.deepcopy(self.run.model).float().eval().to(self.device)
        xt = torch.from_numpy(self.x)[None].to(self.device)
        counter = self.counters[name] = C.TileCounter(plain, self.run.model, self.device)
        tile, act = (self.args.tile, self.args.tile), self.run.activation

        def fn() -> None:
            counter.reset()
            with torch.no_grad():
                logits = sliding_window_inference(xt, tile, sw_batch, counter, overlap=self.args.overlap,
                                                  mode="gaussian")
                prob = torch.sigmoid(logits) if act == "sigmoid" else torch.softmax(logits, 1)
            self.outputs[name] = prob[0].cpu().numpy()

        return fn


def ablation_rows(b: Bench, default: Predictor, run_dir: Path) -> dict[str, tuple[str, Callable[[], None]]]:
    """The ablation rows (label -> (key, timed call)): the predictor's speed-ups off one at a time, MONAI with
    sw_batch 4, one thread each on a CPU, and --compile / --onnx rows when asked for."""
    args, run, device = b.args, b.run, b.device

    def mk(**kw) -> Predictor:
        return replace(default, predict_fn=make_predict_fn(run.model, run.activation, device, args.precision, **kw))

    preds = {
        "unetlab tiling, plain module (NCHW, no fold, batch 1)": (
            "abl_plain", replace(mk(channels_last=False, fuse=False), batch_size=1)),
        "  + channels-last": ("abl_cl", replace(mk(channels_last=True, fuse=False), batch_size=1)),
        "  + BN folded into convs (batch 1)": ("abl_cl_fold", replace(mk(), batch_size=1)),
    }
    rows = {label: (key, b.unetlab_row(key, pred)) for label, (key, pred) in preds.items()}
    rows["MONAI sliding_window_inference (fp32, sw_batch 4)"] = ("monai_b4", b.monai_row("monai_b4", 4))
    if device.type == "cpu" and torch.get_num_threads() > 1:  # on a shared machine one thread can win
        rows["unetlab default, 1 thread"] = ("unetlab_t1", C.with_threads(b.unetlab_row("unetlab_t1", default), 1))
        rows["MONAI (sw_batch 1), 1 thread"] = ("monai_t1", C.with_threads(b.monai_row("monai_t1", 1), 1))
    if args.compile:
        log("compiling (torch.compile) ...")
        rows["unetlab default + torch.compile"] = ("compiled", b.unetlab_row("compiled", Predictor.from_run(
            run, device=device, precision=args.precision, tile=args.tile, overlap=args.overlap,
            batch_size=args.batch_size, compile=True)))
    if args.onnx:
        from unetlab.inference.export import export_model

        onnx_path = run_dir / "model.onnx"
        if not onnx_path.exists():
            export_model(run.model, "onnx", onnx_path, int(run.info["in_channels"]))
        rows["unetlab tiling + onnxruntime backend"] = ("onnx", b.unetlab_row("onnx", Predictor.from_run(
            run, tile=args.tile, overlap=args.overlap, batch_size=args.batch_size, backend="onnx",
            onnx_path=onnx_path)))
    return rows


def result_rows(b: Bench, timings: dict, names: dict[str, str], peaks: dict) -> list[dict]:
    """One result per timed row: seconds, throughput, speed-up over MONAI, GFLOP/s and share of the conv peak,
    and agreement with MONAI's mask."""
    best = peaks["best"]
    monai_t = timings[next(k for k, v in names.items() if v == "monai")]["median_wall"]
    ref_mask = masks_of(b.outputs["monai"], b.run.activation)
    mpx = b.args.size * b.args.size / 1e6
    rows = []
    for label, t in timings.items():
        key = names[label]
        c, sec = b.counters[key], t["median_wall"]
        gflops = c.flops / sec / 1e9
        rows.append({
            "row": label, "seconds": sec, "cpu_seconds": t["median_cpu"], "runs": len(t["wall"]),
            "mpx_per_s": mpx / sec, "speedup_vs_monai": monai_t / sec, "tiles": c.tiles,
            "gflop": c.flops / 1e9, "gflops": gflops, "peak_share": gflops / peaks[best]["gflops"],
            "median_peak_share": gflops / peaks[best]["median_gflops"],
            "mask_agreement": float((masks_of(b.outputs[key], b.run.activation) == ref_mask).mean()),
            "max_abs_prob_diff": float(np.abs(b.outputs[key] - b.outputs["monai"]).max()),
            "all_seconds": t["wall"],
        })
    return rows


def report(b: Bench, rows: list[dict], timings: dict, names: dict[str, str], peaks: dict, info: dict,
           run_dir: Path) -> Path:
    """Print the table, the speed-up and its ceiling at the conv peak; write the JSON; return its path."""
    args = b.args
    best = peaks["best"]
    peak = peaks[best]["gflops"]
    print(f"\nunetlab vs MONAI sliding-window inference: {args.preset}, {args.size}x{args.size} image, tile "
          f"{args.tile}, overlap {args.overlap}, device {b.device}, {info['torch_threads']} thread(s)")
    print(f"conv peak measured in this run: fp32 {peaks['fp32']['gflops']:.1f} GFLOP/s best call, "
          f"{peaks['fp32']['median_gflops']:.1f} median call ({peaks['fp32'].get('shape')}, "
          f"{peaks['fp32'].get('layout')}); bf16 {peaks['bf16']['gflops']:.1f} / "
          f"{peaks['bf16']['median_gflops']:.1f} GFLOP/s -> shares against {best}")
    C.print_table(rows, [("row", "", ""), ("seconds", "s (median)", ".2f"), ("runs", "runs", "d"),
                         ("mpx_per_s", "Mpx/s", ".3f"), ("speedup_vs_monai", "vs MONAI", ".2f"),
                         ("tiles", "tiles", "d"), ("gflops", "GFLOP/s", ".1f"), ("peak_share", "of peak", ".0%"),
                         ("median_peak_share", "of median peak", ".0%"),
                         ("mask_agreement", "mask agree", ".4%")])
    monai_t = timings[next(k for k, v in names.items() if v == "monai")]["median_wall"]
    un = timings[next(k for k, v in names.items() if v == "unetlab")]["median_wall"]
    monai_b4 = timings.get("MONAI sliding_window_inference (fp32, sw_batch 4)", {}).get("median_wall")
    line = f"\nunetlab default is {monai_t / un:.2f}x MONAI's default (sw_batch 1)"
    if monai_b4:
        line += f" and {monai_b4 / un:.2f}x MONAI with sw_batch 4"
    ceiling = monai_t / (b.counters["unetlab"].flops / (peak * 1e9))
    print(line + f"; {C.contention_note(info)}")
    print(f"ceiling: running every conv at the {best} peak ({peak:.0f} GFLOP/s), unetlab would be "
          f"{ceiling:.2f}x MONAI's default on these {b.counters['unetlab'].tiles} tiles")
    return C.write_results("bench_inference", {
        "benchmark": "inference", "command": " ".join(["python", "benchmarks/bench_inference.py", *sys.argv[1:]]),
        "args": vars(args), "machine": info, "conv_peak": peaks, "rows": rows,
        "run": str(run_dir), "contention": C.contention_note(info), "speedup_ceiling_at_peak": ceiling,
        "flops_note": "conv multiply-adds x2 of the tiles actually run, counted by forward hooks; bias, "
                      "activation, pooling, up-sampling and blending not counted",
    }, args.json)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    tune_allocator()
    C.set_threads(args.threads)
    import monai.inferers  # noqa: F401  (fails here, before any work, when MONAI is missing)

    device = resolve_device(args.device)
    info = C.machine_info(device)
    run_dir = Path(args.run) if args.run else C.trained_run(args.preset, args.retrain, log=log)
    run = load_run(run_dir, device=device)
    log(f"measuring the conv peak on {device} ...")
    peak_before = C.conv_peaks(device)

    fields = C.synthetic_fields(4, 512, seed=5)
    image = C.mosaic(args.size, args.size, fields, seed=5)[None].astype(np.float32)
    default = Predictor.from_run(run, device=device, precision=args.precision, tile=args.tile,
                                 overlap=args.overlap, batch_size=args.batch_size)
    b = Bench(args, run, device, default.prepare(image))
    prec = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_precision(args.precision, device)]
    head = {
        f"unetlab default ({prec}, fold+CL, batch {args.batch_size})": b.unetlab_row("unetlab", default),
        "MONAI sliding_window_inference (fp32, sw_batch 1)": b.monai_row("monai", 1),
    }
    log(f"head to head: {len(head)} rows x {args.repeats} alternating runs on a {args.size}x{args.size} image ...")
    timings = C.time_alternating(head, args.repeats, device, log=log)
    names = dict(zip(head, ["unetlab", "monai"]))
    if not args.no_ablations:
        ablations = ablation_rows(b, default, run_dir)
        names.update({label: key for label, (key, _fn) in ablations.items()})
        log(f"ablations: {len(ablations)} rows x {args.ablation_repeats} alternating runs ...")
        timings.update(C.time_alternating({label: fn for label, (_k, fn) in ablations.items()},
                                          args.ablation_repeats, device, warmup=False, log=log))

    peaks = C.merge_peaks(peak_before, C.conv_peaks(device))
    info["load_average_end"] = C.load_average()
    rows = result_rows(b, timings, names, peaks)
    path = report(b, rows, timings, names, peaks, info, run_dir)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
