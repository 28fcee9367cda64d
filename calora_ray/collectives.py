"""The collective operations of the training and scoring loops, on torch.distributed.

Plain torch: in a single process they are no-ops, so the same loop runs alone or in every worker
of a process group (Ray Train sets one up; calora_ray.distributed is the Ray side).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all workers (in place); a no-op in a single process."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of `params` (the trainable LoRA weights only) over workers.

    One flat buffer, one all-reduce: the frozen base weights are neither wrapped nor reduced.
    """
    world = rank_and_world()[1]
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()
