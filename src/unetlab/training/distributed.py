"""torch.distributed glue: detect a torchrun launch, set up the process group, reduce exactly, rank-0 output."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UnetlabError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the world (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or a compatible launcher) set WORLD_SIZE/RANK for this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(device_type: str = "cpu") -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, Gloo on CPU); single-process otherwise."""
    if not launched_by_torchrun():
        return DistInfo()
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UnetlabError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
    if not 0 <= rank < world:
        raise UnetlabError(f"RANK={rank} is outside WORLD_SIZE={world}; launch with torchrun")
    if world == 1:
        return DistInfo(0, 1, local)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend)
        except Exception as exc:
            raise UnetlabError(f"could not join the distributed process group ({exc})".splitlines()[0],
                               hint="check MASTER_ADDR/MASTER_PORT and --nnodes/--rdzv settings") from exc
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place; no-op single-process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
