"""Shared helpers of the benchmarks: machine description, measured conv peak, FLOP counting, alternating timing,
tables and JSON results (written to ``benchmarks/results/<name>.json``, which git ignores).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


# --- the machine ---------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The vector-instruction flags that matter for conv speed (avx2, avx512*, amx*)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma")))
            break
    return sorted(flags)


def load_average() -> float:
    """The 1-minute load average (0 where unknown)."""
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return 0.0


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on: CPU, cores, threads, torch, GPU, and the load when the run started."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores_available": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "device": str(device),
        "load_average_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def contention_note(info: dict) -> str:
    """One line saying whether other processes were competing for the cores during the run (the 1-minute load
    average before the run, and after it less this benchmark's own threads)."""
    start, end = info.get("load_average_start", 0.0), info.get("load_average_end", load_average())
    cores = info.get("cores_available") or 1
    own = min(info.get("torch_threads") or 1, cores)
    others = max(start, end - own)
    what = "SHARED: other processes were busy" if others > 0.5 else "quiet"
    return (f"load average {start:.1f} before, {end:.1f} after (this benchmark: up to {own}) on {cores} "
            f"core(s): {what}")


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU) so that wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- FLOPs and the conv peak ---------------------------------------------------------------------------------


def conv_flops(module: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Multiply-adds x 2 of one Conv2d/ConvTranspose2d call (bias additions not counted)."""
    k = module.kernel_size[0] * module.kernel_size[1]
    if isinstance(module, nn.ConvTranspose2d):
        return 2 * inp.numel() * (module.out_channels // module.groups) * k
    return 2 * out.numel() * (module.in_channels // module.groups) * k


def count_flops(model: nn.Module, shape: Sequence[int], device: torch.device | str = "cpu") -> int:
    """FLOPs of the convolutions of one forward pass of ``model`` on a zero input of ``shape``, by hooks."""
    total = 0

    def hook(m, i, o):
        nonlocal total
        total += conv_flops(m, i[0], o)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.inference_mode():
            model(torch.zeros(tuple(shape), device=device))
    finally:
        for h in handles:
            h.remove()
    return total


_FLOPS_PER_TILE: dict[tuple, int] = {}  # (id(model), tile shape) -> FLOPs, shared by all counters


class TileCounter:
    """Wraps a batch function, counting the tiles it runs and their conv FLOPs (per input shape, by hooks)."""

    def __init__(self, fn: Callable, model: nn.Module, device: torch.device | str = "cpu") -> None:
        self.fn, self.model, self.device = fn, model, device
        self.tiles = 0
        self.flops = 0

    def __call__(self, x, *args, **kwargs):
        shape = tuple(x.shape)
        key = (id(self.model), shape[1:])
        per_tile = _FLOPS_PER_TILE.get(key)
        if per_tile is None:
            per_tile = _FLOPS_PER_TILE[key] = count_flops(self.model, (1, *shape[1:]), self.device)
        self.tiles += shape[0]
        self.flops += per_tile * shape[0]
        return self.fn(x, *args, **kwargs)

    def reset(self) -> None:
        """Forget the counts (the FLOPs per tile shape stay cached)."""
        self.tiles, self.flops = 0, 0


PEAK_SHAPES = ((128, 128, 128), (64, 64, 256), (256, 256, 64))  # (in, out, size) of 3x3 convs, batch 1


def conv_peak(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 1.5,
              shapes: Sequence[tuple[int, int, int]] = PEAK_SHAPES) -> dict:
    """Measured GFLOP/s of large 3x3 convolutions (best of contiguous/channels-last and a few shapes).

    Reduced precisions run through autocast (what the predictor uses); each shape runs for about ``seconds``
    and its best call counts ('median_gflops': its median call, the throughput available on a busy machine).
    Returns {'gflops', 'median_gflops', 'shape', 'layout', 'calls'} of the best shape and layout.
    """
    best = {"gflops": 0.0}
    budget = seconds if dtype == torch.float32 or device.type == "cuda" else seconds / 3
    for cin, cout, size in shapes:
        if dtype != torch.float32 and device.type == "cpu":
            size = min(size, 64)  # emulated bf16/fp16 is slow: keep the call short
        for layout in (torch.contiguous_format, torch.channels_last):
            conv = nn.Conv2d(cin, cout, 3, padding=1).to(device).eval().to(memory_format=layout)
            x = torch.randn(1, cin, size, size, device=device).contiguous(memory_format=layout)
            flops = 2 * size * size * cin * cout * 9
            times = []
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                conv(x)
                sync(device)
                t_end = time.perf_counter() + budget
                while time.perf_counter() < t_end or len(times) < 2:
                    t = time.perf_counter()
                    conv(x)
                    sync(device)
                    times.append(time.perf_counter() - t)
            g = flops / min(times) / 1e9
            if g > best["gflops"]:
                best = {"gflops": g, "median_gflops": flops / statistics.median(times) / 1e9,
                        "shape": f"{cin}->{cout} 3x3 @ {size}x{size}", "calls": len(times),
                        "layout": "channels_last" if layout == torch.channels_last else "contiguous"}
    return best


def conv_peaks(device: torch.device, seconds: float = 1.5) -> dict:
    """fp32 and reduced-precision conv peaks; 'best' names the precision with the higher one."""
    peaks = {"fp32": conv_peak(device, torch.float32, seconds), "bf16": conv_peak(device, torch.bfloat16, seconds)}
    if device.type == "cuda":
        peaks["fp16"] = conv_peak(device, torch.float16, seconds)
    best = max(peaks, key=lambda k: peaks[k]["gflops"])
    return {**peaks, "best": best}


def merge_peaks(a: dict, b: dict) -> dict:
    """The higher of two conv-peak measurements per precision (measured before and after the timed runs)."""
    out = {}
    for k in a:
        if k == "best":
            continue
        other = b.get(k, {"gflops": 0.0, "median_gflops": 0.0})
        out[k] = dict(a[k] if a[k]["gflops"] >= other["gflops"] else other)
        out[k]["median_gflops"] = max(a[k].get("median_gflops", 0.0), other.get("median_gflops", 0.0))
    out["best"] = max(out, key=lambda k: out[k]["gflops"])
    return out


# --- timing --------------------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def time_alternating(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                     warmup: bool = True, log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Run each function ``repeats`` times, alternating between them (order reversed every round), so that
    changes in machine load hit all of them alike. Returns per name: wall/cpu seconds lists and medians."""
    names = list(fns)
    out = {n: {"wall": [], "cpu": []} for n in names}
    if warmup:
        for n in names:
            fns[n]()
            sync(device)
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            c, t = cpu_seconds(), time.perf_counter()
            fns[n]()
            sync(device)
            wall, cpu = time.perf_counter() - t, cpu_seconds() - c
            out[n]["wall"].append(wall)
            out[n]["cpu"].append(cpu)
            if log:
                log(f"  round {r + 1}/{repeats}  {n:<40s} {wall:8.2f} s")
    for n in names:
        out[n]["median_wall"] = statistics.median(out[n]["wall"])
        out[n]["median_cpu"] = statistics.median(out[n]["cpu"])
        out[n]["min_wall"] = min(out[n]["wall"])
    return out


# --- output --------------------------------------------------------------------------------------------------


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as an aligned text table; ``columns`` are (key, header, format) triples."""
    cells = [[h for _k, h, _f in columns]]
    for r in rows:
        line = []
        for k, _h, f in columns:
            v = r.get(k)
            line.append("-" if v is None else (format(v, f) if f else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for j, line in enumerate(cells):
        print("  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(line, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def write_results(name: str, payload: dict, path: str | Path | None = None) -> Path:
    """Write the benchmark's results as JSON (default ``benchmarks/results/<name>.json``); returns the path."""
    path = Path(path) if path else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def with_threads(fn: Callable[[], object], threads: int) -> Callable[[], object]:
    """``fn`` run with ``threads`` intra-op threads (the previous number restored afterwards)."""

    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def set_threads(threads: int | None) -> None:
    """Use ``threads`` intra-op threads (None: torch's default)."""
    if threads:
        torch.set_num_threads(int(threads))


# --- data and a trained model --------------------------------------------------------------------------------


def synthetic_fields(n: int, field: int = 512, seed: int = 0) -> list:
    """``n`` synthetic 16-bit fluorescence fields of ``field`` x ``field`` pixels (unetlab.data.synthetic)."""
    import numpy as np

    from unetlab.data.synthetic import make_synthetic_cells

    rng = np.random.default_rng(seed)
    return [make_synthetic_cells((field, field), seed=rng)[0] for _ in range(n)]


def mosaic_rows(height: int, width: int, fields: list, seed: int = 0, band: int | None = None):
    """Yield (y0, rows uint16) bands of a ``height`` x ``width`` mosaic of randomly flipped ``fields``.

    Big synthetic images are built from a few small fields, band by band, so that no full-size array exists.
    """
    import numpy as np

    f = fields[0].shape[0]
    band = band or f
    rng = np.random.default_rng(seed)
    nx = -(-width // f)
    choice = rng.integers(len(fields), size=(-(-height // f), nx))
    flips = rng.integers(4, size=choice.shape)
    for by in range(choice.shape[0]):
        row = np.concatenate([_flip(fields[choice[by, bx]], flips[by, bx]) for bx in range(nx)], 1)[:, :width]
        y0 = by * f
        row = row[: min(f, height - y0)]
        for s in range(0, row.shape[0], band):
            yield y0 + s, row[s : s + band]


def _flip(a, k: int):
    return a[::-1] if k == 1 else (a[:, ::-1] if k == 2 else (a[::-1, ::-1] if k == 3 else a))


def mosaic(height: int, width: int, fields: list, seed: int = 0):
    """The whole mosaic of :func:`mosaic_rows` as one (H, W) uint16 array (for images that fit in memory)."""
    import numpy as np

    out = np.empty((height, width), np.uint16)
    for y0, rows in mosaic_rows(height, width, fields, seed):
        out[y0 : y0 + rows.shape[0]] = rows
    return out


BENCH_TRAIN = {
    "patch_size": 128, "batch_size": 8, "samples_per_epoch": 96, "epochs": 3, "lr": 3e-3, "val_fraction": 0.25,
    "aug_brightness": 0.3, "aug_contrast": 0.3, "tensorboard": False, "seed": 0,
}


def trained_run(preset: str = "unet-slim", retrain: bool = False, extra: dict | None = None,
                root: Path | None = None, log: Callable[[str], None] | None = None) -> Path:
    """A run folder of ``preset`` briefly trained on synthetic cells (cached under benchmarks/results/_runs).

    A trained network gives masks with real structure, so that agreement between two predictors is measured on
    realistic probability maps rather than the near-constant output of random weights.
    """
    from unetlab.config import RunConfig, apply_overrides
    from unetlab.data.synthetic import write_synthetic_dataset
    from unetlab.training import train

    key = preset + "".join(f"_{k}{v}" for k, v in sorted((extra or {}).items()))
    root = Path(root) if root else RESULTS / "_runs"
    run = root / key
    if (run / "checkpoints" / "best.pt").exists() and not retrain:
        return run
    data = root / "_data"
    if not (data / "images").exists():
        write_synthetic_dataset(data, n_images=12, size=(256, 256), seed=11)
    if log:
        log(f"training a {preset} model on synthetic cells for the benchmark (cached in {run}) ...")
    cfg = apply_overrides(RunConfig(), {**BENCH_TRAIN, "root": str(data), "preset": preset, **(extra or {})})
    train(cfg, run, overwrite=True, progress=False)
    return run


# --- benchmarks that score one split of a run ---------------------------------------------------------------------


def split_arguments(p) -> None:
    """Add the arguments of a benchmark that scores one split of a run: run, --data, --split, --limit, --json."""
    p.add_argument("run", help="run folder or pretrained model name")
    p.add_argument("--data", type=Path, required=True, help="the dataset folder the run was trained on")
    p.add_argument("--split", default="val", choices=["train", "val", "test"],
                   help="val or train to choose settings; test only to report")
    p.add_argument("--limit", type=int, default=0, help="at most N images of the split, drawn with seed 0 (0: all)")
    p.add_argument("--json", type=Path, default=None, help="where to write the results (default benchmarks/results/)")


def split_samples(run_dir: Path, data: Path, split: str, layout: str | None, limit: int) -> list:
    """The samples of ``split`` (the run's split.json) found in ``data``, one per image file (the nuclei recipe
    lists each tissue image under three names), at most ``limit`` of them drawn with seed 0 (0: all)."""
    import random

    from unetlab.data.layouts import load_dataset
    from unetlab.data.split import load_split

    by_name = {s.name: s for s in load_dataset(data, layout).samples}
    seen, samples = set(), []
    for name in load_split(run_dir)[split]:
        s = by_name.get(name)
        if s is not None and os.path.realpath(s.image) not in seen:
            seen.add(os.path.realpath(s.image))
            samples.append(s)
    if limit and len(samples) > limit:
        samples = random.Random(0).sample(samples, limit)
    if not samples:
        raise SystemExit(f"no {split} image of {Path(run_dir) / 'split.json'} is in {data}")
    return samples


def split_run(args) -> tuple[Path, object, list]:
    """(run folder, loaded run, samples) of :func:`split_arguments`' parsed ``args``."""
    from unetlab.runfolder import load_run, resolve_run_dir

    run_dir = resolve_run_dir(args.run)
    run = load_run(run_dir)
    return run_dir, run, split_samples(run_dir, args.data, args.split, run.config.data.layout, args.limit)


def description(doc: str | None) -> str:
    """A script's --help description: the first paragraph of its module docstring, as one line."""
    return " ".join((doc or "").split("\n\n")[0].split())
