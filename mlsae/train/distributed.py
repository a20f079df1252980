"""torch.distributed glue for `torchrun -m mlsae train`: every helper is a no-op in one process.
Uses torch.distributed only.

Each rank streams its own slice of every global batch (sequence i of a batch goes to rank
i % world); the loss is written so that the SUM over ranks of its gradients equals the
gradient of the single-process loss on the whole batch (denominators are all-reduced), so
gradients are all-reduced with SUM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def timeout() -> timedelta:
    """Collective timeout: $MLSAE_DIST_TIMEOUT seconds, default 2 hours. Ranks wait in a
    barrier while rank 0 writes the held-out summary; torch's default (10-30 min) could
    abort them on a long evaluation."""
    return timedelta(seconds=float(os.environ.get("MLSAE_DIST_TIMEOUT", 7200)))


def init_from_env(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else a single process.
    Returns this rank's Dist and device: on CUDA one GPU per rank, `cuda:$LOCAL_RANK`, made
    current BEFORE the process group starts (NCCL binds to the current device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=timeout())
        _owned["group"] = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size()), device


_owned = {"group": False}


def shutdown() -> None:
    """Leave the process group `init_from_env` joined, once every rank got here. Left to
    interpreter exit instead, gloo could abort a rank whose peer had already gone (seen in
    CI). Called by the CLI after its command, so several `train()` calls in one process
    (baselines) share one group."""
    if _owned["group"] and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _owned["group"] = False


def all_reduce_(t: torch.Tensor, d: Dist, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=op)
    return t


def all_gather_rows(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate `x [n_r, ...]` of every rank (rows may differ in number)."""
    if not d.enabled:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(d.world)]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    padded = torch.zeros(top, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
