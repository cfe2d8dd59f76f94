"""The collectives of training and evaluation, each a no-op in a single process.

Tensors: ``all_reduce`` (sum or max), ``all_gather`` (concatenated in rank order), and the
``global_sum`` / ``global_mean`` of a tensor's elements over all ranks. Python objects:
``broadcast_object`` (rank 0's value everywhere) and ``gather_objects`` (every rank's, in
rank order). Under NCCL a tensor collective runs on the GPU; ``device`` says where (the
values come back there), and CPU tensors stay on the CPU under gloo.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def all_reduce(values: torch.Tensor, device: torch.device | None = None, op: str = "sum") -> torch.Tensor:
    """``values`` summed (or, op="max", the largest) over the ranks; the tensor itself in one process."""
    if initialized():
        values = values.to(device if device is not None and device.type == "cuda" else "cpu")
        dist.all_reduce(values, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return values


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` [n, ...] concatenated in rank order: [W*n, ...]."""
    if not initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def global_sum(x: torch.Tensor, device: torch.device | None = None) -> float:
    """The sum of ``x``'s elements over all ranks (float64)."""
    return all_reduce(torch.tensor([x.sum().item()], dtype=torch.float64), device).item()


def global_mean(x: torch.Tensor, device: torch.device | None = None) -> float:
    """The mean of ``x``'s elements over all ranks' elements (float64; an empty set gives 0)."""
    pair = all_reduce(torch.tensor([x.sum().item(), x.numel()], dtype=torch.float64), device)
    return (pair[0] / pair[1].clamp(min=1)).item()


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a barrier as well)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order."""
    if world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
