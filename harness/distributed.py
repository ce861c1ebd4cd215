"""Sharding a benchmark over the processes torchrun starts (one process = plain single run).

Each rank evaluates examples rank, rank + world, ... with its own model copy (on cuda:LOCAL_RANK when
CUDA is used) and appends its records to its own shard file on its own storage. When all ranks are
done, every rank sends its records to rank 0 over the process group (gloo: works across nodes without
a shared filesystem), and rank 0 writes the merged examples.jsonl and summary.json. Only small Python
objects are exchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class Dist:
    """Where this process sits among the benchmark's processes."""

    rank: int  # global rank (0 = the one that merges and reports)
    world: int  # number of processes
    local_rank: int  # rank on this machine (selects the GPU)

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Dist(0, 1, 0)  # one process: a plain run


def init() -> Dist:
    """Join the process group torchrun prepared (no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return Dist(0, 1, 0)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)))


def device_for(device: str, d: Dist) -> str:
    """Each rank gets its own GPU when CUDA is asked for (or chosen by auto)."""
    if not d.active:
        return device
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"cuda:{d.local_rank}"
    return device


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's value of `obj`, on every rank."""
    if not d.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, d: Dist) -> Optional[list]:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others); over gloo, no shared storage."""
    if not d.active:
        return [obj]
    import torch.distributed as dist

    out = [None] * d.world if d.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.barrier()


def finish(d: Dist) -> None:
    if d.active:
        import torch.distributed as dist

        dist.destroy_process_group()
