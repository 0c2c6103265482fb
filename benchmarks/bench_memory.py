"""Peak resident memory of predicting a huge image: a 16384x16384 16-bit TIFF, streamed tile by tile.

Writes the TIFF into a temporary folder (a mosaic of synthetic cell fields, written band by band), then runs
``unetlab predict`` on it in a child process and reads the child's peak resident set size (``ru_maxrss`` from
``wait4``). Images over 64 Mpx are read by rows, normalised from a strided subsample and written band by band,
so memory is bounded by one band of tiles. For scale, a smaller image is also predicted both ways (in memory
and streamed).

The network defaults to a tiny U-Net (preset unet, depth 3, width 8) because unet-slim needs ~116 TFLOP for the
1849 tiles of a 16k image, over 20 minutes on 2 CPU cores: ``--model slim`` runs it anyway. Memory depends on
the tile batch and the network's widest activations, not on the image size, as the rows show.

    python benchmarks/bench_memory.py [--size 16384] [--model tiny|slim] [--layout raw|tiled|ome-tiff|ome-zarr]
        [--threads N]

Results: benchmarks/results/bench_memory.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MODELS = {
    "tiny": ("unet", {"depth": 3, "base_width": 8}),
    "slim": ("unet-slim", {}),
}
LIMIT_GIB = 3.0
LAYOUTS = {"raw": ".tif", "tiled": ".tif", "ome-tiff": ".ome.tif", "ome-zarr": ".ome.zarr"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=C.description(__doc__))
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--model", choices=list(MODELS), default="tiny")
    p.add_argument("--layout", choices=list(LAYOUTS), default="raw",
                   help="raw: uncompressed TIFF; tiled: zlib-compressed 512 px tiles; ome-tiff: the same as an "
                   "OME-TIFF; ome-zarr: an OME-Zarr (NGFF 0.4) image in 512 px chunks")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--compare-size", type=int, default=4096,
                   help="also predict an image of this size in memory and streamed (0: skip)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the child (default: torch's)")
    p.add_argument("--probabilities", action="store_true", help="also write the float32 probability TIFF")
    p.add_argument("--workdir", default=None, help="where the TIFF and outputs go (default: a temp folder)")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def write_big_tiff(path: Path, size: int, layout: str) -> Path:
    """A ``size`` x ``size`` uint16 mosaic of synthetic cell fields, written without holding the image."""
    import tifffile

    from unetlab.files import atomic_output
    from unetlab.inference.streaming import BandTiffWriter

    fields = C.synthetic_fields(6, 512, seed=9)
    if layout == "raw":
        with atomic_output(path) as tmp:
            w = BandTiffWriter(tmp, (size, size), np.uint16)
            try:
                for y0, rows in C.mosaic_rows(size, size, fields, seed=9):
                    w.write_rows(y0, rows)
            finally:
                w.close()
        return path

    if layout == "ome-zarr":  # written chunk row by chunk row; the NGFF metadata by hand (one level)
        import zarr

        group = zarr.open_group(str(path), mode="w", zarr_format=2)
        array = group.create_array("0", shape=(size, size), chunks=(512, 512), dtype=np.uint16)
        for y0, rows in C.mosaic_rows(size, size, fields, seed=9):
            array[y0 : y0 + rows.shape[-2]] = rows.reshape(-1, size)
        group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "y", "type": "space"},
                                                                  {"name": "x", "type": "space"}],
                                       "datasets": [{"path": "0", "coordinateTransformations": [
                                           {"type": "scale", "scale": [1.0, 1.0]}]}]}]
        return path

    def tiles():
        for _y0, rows in C.mosaic_rows(size, size, fields, seed=9):  # 512-row bands = one row of tiles
            for x in range(0, size, 512):
                yield rows[:, x : x + 512]

    ome = {"ome": True, "metadata": {"axes": "YX", "PhysicalSizeX": 0.65, "PhysicalSizeY": 0.65}} if (
        layout == "ome-tiff") else {}
    tifffile.imwrite(path, tiles(), shape=(size, size), dtype=np.uint16, tile=(512, 512), compression="zlib",
                     photometric="minisblack", **ome)
    return path


def run_child(cmd: list[str], threads: int | None) -> dict:
    """Run ``cmd``; its wall time, exit code and peak resident memory (MiB) from wait4."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    proc.stdout.close()
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        raise RuntimeError(f"child failed ({rc}): {' '.join(cmd)}\n{out[-3000:]}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "exit_code": rc}


def mask_summary(path: Path) -> dict:
    """Shape, storage and foreground share of a mask TIFF, read band by band."""
    import tifffile

    from unetlab.inference.streaming import TiffRows

    with tifffile.TiffFile(path) as t:
        page = t.pages[0]
        storage = {"tiled": bool(page.is_tiled), "compression": str(page.compression.name)}
    fg = 0
    with TiffRows(path) as v:
        _c, h, w = v.shape
        for y0 in range(0, h, 2048):
            fg += int((v[:, y0 : y0 + 2048] > 0).sum())
    return {"shape": [h, w], "foreground_share": fg / (h * w), "file_mib": path.stat().st_size / 2**20, **storage}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    info = C.machine_info(torch.device("cpu"))
    if args.threads:
        info["torch_threads"] = args.threads
    preset, extra = MODELS[args.model]
    run = C.trained_run(preset, extra=extra, log=log)
    tmp = tempfile.TemporaryDirectory(prefix="unetlab_bench_memory_") if not args.workdir else None
    work = Path(args.workdir) if args.workdir else Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    sizes = [args.size] + ([args.compare_size] if args.compare_size else [])
    try:
        for size in sizes:
            folder = work / f"in_{size}"
            folder.mkdir(exist_ok=True)
            image = folder / f"cells_{size}{LAYOUTS[args.layout]}"
            if not image.exists():
                log(f"writing a {size}x{size} 16-bit TIFF ({args.layout}) ...")
                t = time.perf_counter()
                write_big_tiff(image, size, args.layout)
                disk = sum(p.stat().st_size for p in image.rglob("*")) if image.is_dir() else image.stat().st_size
                log(f"  {disk / 2**20:.0f} MiB in {time.perf_counter() - t:.0f} s")
            modes = ["streamed"] if size == args.size else ["in memory", "streamed"]
            for mode in modes:
                out = work / f"out_{size}_{mode.replace(' ', '_')}"
                threshold = "None" if mode == "in memory" else "0"
                code = ("import logging; logging.basicConfig(level=logging.WARNING);"
                        "from unetlab.inference.predict import predict;"
                        f"predict({str(run)!r}, {str(folder)!r}, {str(out)!r}, tile={args.tile}, "
                        f"batch_size={args.batch_size}, device='cpu', probabilities={args.probabilities}, "
                        f"overwrite=True, progress=False, stream_threshold={threshold})")
                if mode == "streamed" and size > 8000:  # the real command line (streams above 64 Mpx)
                    cmd = [sys.executable, "-m", "unetlab", "predict", "--model", str(run), "--input", str(folder),
                           "--out", str(out), "--device", "cpu", "--tile", str(args.tile), "--batch-size",
                           str(args.batch_size), "--overwrite", "--no-progress"]
                    if args.probabilities:
                        cmd.append("--probabilities")
                else:
                    cmd = [sys.executable, "-c", code]
                log(f"predicting {size}x{size} ({mode}) in a child process ...")
                r = run_child(cmd, args.threads)
                stem = image.name[: -len(LAYOUTS[args.layout])]
                mask = out / "masks" / (f"{stem}.tif" if mode == "streamed" else f"{stem}.png")
                summary = mask_summary(mask) if mask.suffix == ".tif" else {"shape": [size, size]}
                rows.append({"image": f"{size}x{size}", "path": mode, "model": f"{args.model} ({preset})",
                             "mpx": size * size / 1e6, "mpx_per_s": size * size / 1e6 / r["seconds"],
                             "under_limit": r["peak_rss_mib"] < LIMIT_GIB * 1024, "mask": summary, **r})
                log(f"  peak RSS {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.0f} s")
    finally:
        if tmp is not None:
            tmp.cleanup()
    info["load_average_end"] = C.load_average()
    print(f"\npeak resident memory of prediction in a child process (ru_maxrss); tile {args.tile}, batch "
          f"{args.batch_size}, input {args.layout}, model {args.model} = {preset} {extra or ''}")
    if args.model == "tiny":
        print("(tiny model: unet-slim needs ~116 TFLOP for a 16k image, over 20 min on 2 cores; --model slim)")
    C.print_table(rows, [("image", "image", ""), ("path", "path", ""), ("model", "model", ""),
                         ("peak_rss_mib", "peak RSS MiB", ".0f"), ("seconds", "seconds", ".0f"),
                         ("mpx_per_s", "Mpx/s", ".2f"), ("under_limit", f"< {LIMIT_GIB:g} GiB", "")])
    print(f"\n{C.contention_note(info)}")
    path = C.write_results("bench_memory", {
        "benchmark": "memory", "command": " ".join(["python", "benchmarks/bench_memory.py", *sys.argv[1:]]),
        "args": vars(args), "machine": info, "rows": rows, "limit_gib": LIMIT_GIB, "run": str(run),
        "contention": C.contention_note(info),
    }, args.json)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
