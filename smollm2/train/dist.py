"""Several processes, one run: the torchrun environment, the process group, and rank-0-only output.

`torchrun --nproc-per-node N -m smollm2 train ...` starts N copies of the command with RANK, LOCAL_RANK and
WORLD_SIZE set (nanochat's compute_init does the same). Gloo runs the collectives on CPU, so DDP is testable
without GPUs; NCCL runs them on CUDA. A single plain process is world size 1 and never creates a group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int  # this process among all of them
    local_rank: int  # this process on this machine: picks its GPU
    world_size: int
    device: torch.device
    owns_group: bool = False  # setup() created the process group, so teardown() is ours to call

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_ranks() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) for a plain process."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise ValueError(f"RANK / LOCAL_RANK / WORLD_SIZE must be integers ({e})") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    return rank, local_rank, world_size


def pick_device(name: str, local_rank: int) -> torch.device:
    """'auto' is this process's GPU when CUDA is available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device (use cpu, cuda, cuda:N, mps or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine")
    return device


def setup(device_name: str) -> DistContext:
    """Pick this process's device and, under torchrun, join the process group (NCCL on CUDA, else gloo)."""
    rank, local_rank, world_size = env_ranks()
    device = pick_device(device_name, local_rank)
    owns_group = False
    # Under torchrun a group is made even for one process, so --fsdp works with --nproc-per-node 1 too.
    if (world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns_group = True
    return DistContext(rank, local_rank, world_size, device, owns_group)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args: object, **kwargs: object) -> None:
    """print, on rank 0 only: N processes printing the same line N times helps nobody."""
    if is_main():
        print(*args, **kwargs)  # noqa: T201 (the training command's output)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes, in place; the identity in a single process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
