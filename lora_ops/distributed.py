"""Data-parallel training over torch.distributed (no ComfyUI imports).

PyTorch's DistributedDataParallel does the gradient averaging (bucketed all-reduce overlapping the
backward, `no_sync` for gradient accumulation); this module only adapts the LoRA trainer to it:
the trainable factors are the DDP module's parameters, and each micro-batch's loss is computed
inside the DDP forward so the reducer sees one forward per backward. `World` is the trainer's view
of the process group: a single process is a world of size 1 that never touches torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Only this rank writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def mean(self, value: float, device: torch.device) -> float:
        """The average of `value` over the ranks (the loss every rank logs and saves)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.size

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on one (a cancel seen by one rank stops all together)."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def world_from_env(device: torch.device, timeout_s: float) -> World:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT); without
    them a single-process world. NCCL on GPUs, gloo on the CPU; `timeout_s` bounds every
    collective, so a rank that died makes the others fail instead of waiting forever."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size())


def rank_slots(global_batch: int, world: World) -> range:
    """The positions of a global batch this rank computes: a contiguous block of equal size."""
    if global_batch % world.size:
        raise ValueError(f"a global batch of {global_batch} does not split over {world.size} ranks")
    per_rank = global_batch // world.size
    return range(world.rank * per_rank, (world.rank + 1) * per_rank)


class _LossModule(torch.nn.Module):
    """Holds the trained tensors as parameters; its forward runs the given loss computation."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        super().__init__()
        self.trained = torch.nn.ParameterList(params)

    def forward(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        return compute()


class GradientSync:
    """Backpropagates loss computations so that gradients are averaged over the ranks."""

    def __init__(self, params: Sequence[torch.Tensor], world: World):
        self.ddp = None
        if world.distributed:
            if not all(isinstance(p, torch.nn.Parameter) for p in params):
                raise TypeError("distributed training needs the trained tensors to be nn.Parameter")
            # DDP broadcasts rank 0's parameters here: every rank starts from the same factors.
            self.ddp = torch.nn.parallel.DistributedDataParallel(_LossModule(list(params)))

    def backward(self, compute: Callable[[], torch.Tensor], sync: bool) -> float:
        """Runs `compute()` (the loss) and its backward; returns the loss. With `sync` False (all
        but the last micro-batch of an accumulation) gradients only accumulate locally."""
        if self.ddp is None:
            loss = compute()
            loss.backward()
            return loss.item()
        with contextlib.nullcontext() if sync else self.ddp.no_sync():
            loss = self.ddp(compute)
            loss.backward()
        return loss.item()
