"""Data-parallel training in a few lines: who this process is, and how the processes meet.

``torchrun --nproc_per_node=N train.py`` starts ``N`` copies of the script with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` in their environment.  Each copy trains the same model on its
own batches; ``DistributedDataParallel`` averages the gradients, so every copy takes the same
optimiser step.  What the loop needs besides that:

* :class:`Distributed`, :func:`init_distributed` -- join the process group (NCCL on GPUs, gloo
  on CPUs) and pick this process's device; a plain ``python train.py`` is a group of one.
* :func:`barrier`, :func:`all_gather_objects` -- wait for every rank; collect each rank's data
  position and RNG state so rank 0 saves them all in one checkpoint.
* :func:`shutdown_distributed` -- leave the group cleanly.

Cost: one all-reduce of the gradients per step (overlapped with the backward pass by DDP),
and an all-gather of a few small objects per checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Tuple

import torch

from .machine import resolve_device


@dataclass
class Distributed:
    """Who this process is.  ``enabled`` is False for a plain ``python train.py`` run."""

    enabled: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs and progress bars."""
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> Tuple[Distributed, torch.device]:
    """Join the process group if launched by ``torchrun`` (``RANK``/``WORLD_SIZE`` set).

    Backend: NCCL when each process drives a CUDA GPU (``cuda:<LOCAL_RANK>``), gloo on CPU.
    Returns the :class:`Distributed` description and the device this process should use.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 1:
        return Distributed(), resolve_device(device_name)
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        if device.type == "mps":
            device = torch.device("cpu")  # MPS has no collective backend
        dist.init_process_group("gloo")
    return Distributed(True, rank, local_rank, world), device


def barrier(ctx: Distributed) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if ctx.enabled:
        torch.distributed.barrier()


def all_gather_objects(ctx: Distributed, obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` when not distributed)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def shutdown_distributed(ctx: Distributed) -> None:
    """Leave the process group cleanly.

    Delete every ``DistributedDataParallel`` wrapper *before* calling this: with torch 2.13 a
    process whose group is destroyed while a DDP module is alive aborts at exit with
    "terminate called without an active exception".  The barrier makes sure no rank still
    needs the group when another one tears it down.
    """
    if ctx.enabled and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
