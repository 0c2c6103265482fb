"""Process-level settings: allocator tuning, device choice, threads, seeding (and RNG states) and determinism."""

from __future__ import annotations

import ctypes
import logging
import os
import random

import numpy as np

log = logging.getLogger(__name__)
_TUNED = False


def tune_allocator() -> None:
    """Raise glibc's mmap/trim thresholds so large activations are not re-faulted on every step.

    Without this, CPU convolutions at batch > 1 run about half as fast on glibc systems. No-op elsewhere.
    """
    global _TUNED
    if _TUNED:
        return
    _TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    size = 1 << 30
    try:
        libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(size // 2))  # glibc caps the mmap threshold at 32 MiB on 64-bit
        libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(size))
    except AttributeError:
        pass


def set_threads(threads: int | None = None) -> None:
    """Set PyTorch's CPU thread count from ``threads`` or ``$UNETLAB_THREADS``; leave it alone when neither is set."""
    from .errors import UnetlabError

    if threads is None:
        env = os.environ.get("UNETLAB_THREADS", "").strip()
        if not env:
            return
        try:
            threads = int(env)
        except ValueError:
            raise UnetlabError(f"UNETLAB_THREADS must be a whole number, not '{env}'") from None
    if threads < 1:
        raise UnetlabError(f"--threads must be at least 1 (got {threads})")
    import torch

    torch.set_num_threads(threads)


def resolve_device(name: str = "auto"):
    """'auto' -> cuda if available, else cpu (never mps: name 'mps' to train on an Apple GPU); otherwise the
    named torch device, which must be available."""
    import torch

    from .errors import UnetlabError

    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UnetlabError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnetlabError("--device cuda was asked for but no CUDA GPU is available (use --device cpu)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UnetlabError("--device mps was asked for but no Apple GPU (MPS) is available (use --device cpu)")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's RNGs.

    String hashing (``PYTHONHASHSEED``) is fixed only when the interpreter starts, so it is not set here; nothing
    in unetlab depends on the order of a set of strings."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """torch's and numpy's global RNG states as tensors and plain values (a checkpoint loads with
    ``weights_only=True``)."""
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state}


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))


# cuBLAS needs a fixed workspace to be deterministic; it is read when the first cuBLAS handle is created
CUBLAS_WORKSPACE = ":4096:8"


def set_deterministic(on: bool, device=None) -> None:
    """``train.deterministic``: make torch choose deterministic kernels (warning where an op has none), turn off
    cuDNN's benchmark search and, on CUDA, give cuBLAS its fixed workspace; ``False`` leaves the settings alone.

    Call it before the first CUDA operation: ``CUBLAS_WORKSPACE_CONFIG`` is read when cuBLAS starts."""
    if not on:
        return
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    log.info("deterministic algorithms on (slower; an op without a deterministic kernel warns)")


def use_channels_last(setting: bool | None, device, training: bool = True) -> bool:
    """Whether to run the network in channels-last memory format: ``setting`` when given, else automatic.

    Automatic means always for inference, and for training only on CUDA: on CPU the channels-last backward pass
    measured about 28% slower (benchmarks/bench_train.py).
    """
    if setting is not None:
        return bool(setting)
    return (not training) or getattr(device, "type", str(device)) == "cuda"
