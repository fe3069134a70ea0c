"""This process's place in a torchrun job and its device."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..device import resolve_device


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), False)

    def start(self, device: torch.device) -> None:
        """init_process_group: nccl on GPUs, gloo on CPU (PyTorch's own engine, never a home-made one)."""
        if self.world_size > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
            self.active = True

    def all_ok(self, ok: bool, device: torch.device) -> bool:
        """True when every rank is ok: keeps ranks from waiting forever on one that failed."""
        if not self.active:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def stop(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self.active = False


def _process_device(requested: str, dist: Dist) -> torch.device:
    device = resolve_device(requested)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device
