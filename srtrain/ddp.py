"""Many processes: ``torchrun --nproc-per-node N -m srtrain ...`` runs DistributedDataParallel.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process and
every helper here is a no-op. NCCL on GPUs, gloo on the CPU (what the CI tests use).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from srdata.loader import parse_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Only the main process logs and writes checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str | None) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes; the device this process trains on."""
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
             int(os.environ.get("LOCAL_RANK", 0)))
    dev = parse_device(device)
    if dev.type == "cuda":  # torchrun's process N trains on GPU N, whatever index was given
        dev = torch.device("cuda", d.local_rank if d.enabled else (dev.index or 0))
        torch.cuda.set_device(dev)
    if d.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return d, dev


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def mean(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over all processes (every process gets it: decisions stay equal)."""
    if d.enabled:
        t = t.clone()
        dist.all_reduce(t)
        t /= d.world_size
    return t


def broadcast_flag(d: Dist, flag: bool, device: torch.device) -> bool:
    """The main process's ``flag``, on every process (stop early, for instance)."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
