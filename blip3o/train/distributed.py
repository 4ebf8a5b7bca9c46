"""Process-group setup shared by the trainer: single process, torchrun/DDP, DeepSpeed launcher, Slurm.

All launchers end up exporting RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (the deepspeed
launcher also passes --local_rank, which the CLI accepts). CPU uses gloo, CUDA nccl.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"train.device={pref} but CUDA is not available")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_pref: str = "auto", need_group: bool = False) -> DistInfo:
    """Initialises torch.distributed when launched with several processes (or when DeepSpeed needs a
    group even for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local)
    if (world > 1 or need_group) and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(local))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max(x: float) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_mean(x: float) -> float:
    if not dist.is_initialized():
        return x
    t = torch.tensor([x], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Makes every rank's buffers equal to rank `src`'s (what DDP does before each forward; DeepSpeed does it
    only at initialisation, so buffers set from rank-local data afterwards, such as target statistics taken
    from the first batch, would otherwise differ between ranks)."""
    if not dist.is_initialized():
        return
    for b in module.buffers():
        dist.broadcast(b.data, src=src)
