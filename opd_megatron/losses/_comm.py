"""Tensor-parallel group resolution and the few collectives the losses need.

None of these collectives is differentiable, on purpose. Every loss in this package is a
`torch.autograd.Function` whose backward is written out analytically: the cross-rank part of a
vocab-parallel softmax gradient (the global normaliser, which megatron's
`reduce_from_tensor_model_parallel_region` gets wrong by passing gradients through unchanged)
enters through per-position scalars saved in forward, and a value read from another rank's shard
sends its gradient back by a scatter into the owning rank's gradient only. The backward passes
therefore need no communication at all.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def resolve_tp_group(tp_group):
    """The group to reduce over: the given one, else megatron's tensor-parallel group when megatron
    is initialised, else None (TP=1, no communication)."""
    if tp_group is not None:
        return tp_group
    # Megatron cannot be initialised without torch.distributed; checking first avoids importing it.
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce_(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_reduce_columns(columns: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    """Sum-reduce named [n] or [n, k] tensors with one collective (one latency, not several)."""
    if not columns or group_size(group) == 1:
        return columns
    flat = [c.reshape(c.shape[0], -1) for c in columns.values()]
    packed = all_reduce_(torch.cat(flat, dim=1), group)
    parts = packed.split([f.shape[1] for f in flat], dim=1)
    return {name: part.reshape(c.shape) for (name, c), part in zip(columns.items(), parts)}


def all_gather_cat(tensor: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Every rank's `tensor`, concatenated along `dim` in rank order."""
    world = group_size(group)
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
