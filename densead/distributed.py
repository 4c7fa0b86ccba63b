"""torch.distributed plumbing for torchrun: process group from the environment, rank helpers.

Every helper is a no-op (or the identity) in a single process, so library code
calls them unconditionally and plain ``python tools/...`` runs stay unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "finish",
    "gather_concat",
    "init_from_env",
    "is_distributed",
    "is_main",
    "rank",
    "shard",
    "shard_range",
    "world_size",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only the main process writes checkpoints, configs and reports."""
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); return this rank's device.

    NCCL on CUDA (one GPU per local rank), gloo on CPU. Without torchrun,
    returns ``device`` unchanged.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not is_distributed():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (picklable; the identity in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish() -> None:
    """Wait for every rank, then leave the process group (a rank exiting early aborts gloo/NCCL)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: Tensor) -> Tensor:
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_mean(t: Tensor) -> Tensor:
    return all_reduce_sum(t) / world_size() if is_distributed() else t


def shard(batch: Tensor) -> Tensor:
    """This rank's contiguous slice of a global batch (sizes must divide evenly)."""
    n, w = batch.shape[0], world_size()
    if n % w:
        raise ValueError(f"global batch of {n} does not split over {w} processes; use a multiple of {w}")
    per = n // w
    return batch[rank() * per : (rank() + 1) * per]


def shard_range(n: int) -> slice:
    """This rank's contiguous part of ``n`` items (the first ranks take one more when uneven)."""
    base, extra = divmod(n, world_size())
    r = rank()
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def gather_concat(array: np.ndarray) -> np.ndarray:
    """Concatenate every rank's array in rank order (the identity in one process)."""
    if not is_distributed():
        return array
    parts: list[np.ndarray | None] = [None] * world_size()
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)
