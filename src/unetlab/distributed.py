"""torch.distributed glue: detect a torchrun launch, set up the process group, reduce exactly, rank-0 output.

``torchrun --nproc_per_node=N -m unetlab train ...`` starts N processes with WORLD_SIZE/RANK/LOCAL_RANK and
MASTER_ADDR/MASTER_PORT set; :func:`init_distributed` joins them (NCCL on CUDA, Gloo on CPU). Everything else
here is a no-op in a single process, so the trainer and the predictor call it unconditionally.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import UnetlabError

log = logging.getLogger(__name__)
T = TypeVar("T")

LAUNCH_HINT = "launch with torchrun, e.g. torchrun --nproc_per_node=2 -m unetlab train ..."


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the world (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    owns_group: bool = False  # True when init_distributed created the process group (and cleanup ends it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise UnetlabError(f"environment variable {name} is not set", hint=LAUNCH_HINT)
        return default
    try:
        return int(value)
    except ValueError:
        raise UnetlabError(f"environment variable {name}={value!r} is not an integer", hint=LAUNCH_HINT) from None


def launch_rank() -> int:
    """This process's RANK as the launcher set it (0 when not launched, or when RANK is not a number)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def world_from_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from the launcher's variables, checked for consistency."""
    has_world, has_rank = "WORLD_SIZE" in os.environ, "RANK" in os.environ
    if has_world != has_rank:
        given, missing = ("WORLD_SIZE", "RANK") if has_world else ("RANK", "WORLD_SIZE")
        raise UnetlabError(f"{given} is set but {missing} is not; the distributed world is misconfigured",
                           hint=LAUNCH_HINT)
    if not has_world:
        return 0, 1, 0, 1
    world, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    local = _env_int("LOCAL_RANK", rank % max(local_world, 1))
    if world < 1:
        raise UnetlabError(f"WORLD_SIZE={world} must be at least 1", hint=LAUNCH_HINT)
    if not 0 <= rank < world:
        raise UnetlabError(f"RANK={rank} is outside WORLD_SIZE={world}", hint=LAUNCH_HINT)
    if not 0 <= local < max(local_world, 1) or local_world > world:
        raise UnetlabError(f"LOCAL_RANK={local} does not fit LOCAL_WORLD_SIZE={local_world} of WORLD_SIZE={world}",
                           hint=LAUNCH_HINT)
    return rank, world, local, local_world


def init_distributed(device_type: str = "cpu", backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, Gloo otherwise); single-process when not launched.

    On ranks other than 0 the ``unetlab`` logger drops INFO messages, so logs come from rank 0 only.
    """
    rank, world, local, local_world = world_from_env()
    if world == 1:
        return DistInfo(0, 1, local, 1)
    owns = False
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if device_type == "cuda" and dist.is_nccl_available() else "gloo"
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise UnetlabError(f"WORLD_SIZE={world} but {var} is not set; the distributed world is "
                                   "misconfigured", hint=LAUNCH_HINT)
        try:
            dist.init_process_group(backend=backend)
        except Exception as exc:
            raise UnetlabError(f"could not join the distributed process group ({exc})".splitlines()[0],
                               hint="check MASTER_ADDR/MASTER_PORT and the --nnodes/--rdzv settings") from exc
        owns = True
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise UnetlabError(f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) does not match "
                           f"RANK={rank} WORLD_SIZE={world}")
    if device_type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
    if rank != 0:
        quiet = logging.getLogger("unetlab")
        if quiet.getEffectiveLevel() < logging.WARNING:
            quiet.setLevel(logging.WARNING)
    return DistInfo(rank, world, local, local_world, owns)


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for CUDA under torchrun (checked against the visible GPUs)."""
    if device.type != "cuda" or not info.enabled:
        return device
    n = torch.cuda.device_count()
    if info.local_rank >= n:
        raise UnetlabError(
            f"LOCAL_RANK={info.local_rank} but only {n} CUDA GPU(s) are visible on this machine",
            hint="use --nproc_per_node at most the number of GPUs (or --device cpu)",
        )
    return torch.device("cuda", info.local_rank)


def distributed_samples_per_epoch(length: int, batch_size: int, world_size: int, grad_accumulation: int = 1) -> int:
    """Patches per epoch so that every rank runs the same whole number of optimiser steps.

    Single-process runs keep ``max(length, batch_size)``; with several ranks the length is rounded down to a
    multiple of the global batch ``batch_size * world_size * grad_accumulation`` (at least one global batch).
    """
    if world_size <= 1:
        return max(length, batch_size)
    unit = batch_size * world_size * max(grad_accumulation, 1)
    return max(unit, length // unit * unit)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place; no-op single-process); CPU tensors work under NCCL too."""
    if not info.enabled:
        return t
    dev = _collective_device()
    if t.device == dev:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    else:
        buf = t.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        t.copy_(buf)
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a non-finite loss on one rank only)."""
    if not info.enabled:
        return bool(flag)
    t = all_reduce_sum(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64), info)
    return bool(t.item() > 0)


def _collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: T, info: DistInfo) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` single-process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn: Callable[[], T], info: DistInfo) -> T:
    """Run ``fn`` on rank 0 only and return its result on every rank; when it fails, every rank raises."""
    if not info.enabled:
        return fn()
    result, error, failure = None, None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # other ranks must not wait forever for a rank that failed
            failure = exc
            error = str(exc) if isinstance(exc, UnetlabError) else f"rank 0 failed: {type(exc).__name__}: {exc}"
    result, error = broadcast_object((result, error.splitlines()[0] if error else None), info)
    if failure is not None:
        raise failure
    if error is not None:
        raise UnetlabError(error)
    return result


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group (only when :func:`init_distributed` created it)."""
    if info.enabled and info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
