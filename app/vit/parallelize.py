"""Context parallelism for the climate ViT: each cp rank holds a contiguous range of patch
tokens (the layout of ringX1, and of ringX2-4 with causal=False, where the layout does not
matter), attention runs through a ringX function bound to the cp group or through the all-gather
baseline, and the loss is the exact mean over the whole grid.

Gradients: each rank back-propagates its own tokens' squared error divided by the *global*
element count, so the full gradient of a shared weight is the SUM over cp ranks; the position
embedding's rows are touched only by the rank that holds them.
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ringX import ATTN_FUNCS

from .data import token_range
from .model import sdpa_full

ATTN_CHOICES = tuple(ATTN_FUNCS) + ("allgather",)


class _GatherSequence(torch.autograd.Function):
    """(b, s_local, ...) on each rank of ``group`` -> (b, s_local * N, ...) in rank order; the
    backward sums the gradients of every rank's copy and returns this rank's slice
    (reduce-scatter on NCCL, all-reduce then slice elsewhere)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, n = group, dist.get_world_size(group)
        x = x.contiguous()
        out = torch.empty((n * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        return out.unflatten(0, (n, x.shape[0])).transpose(0, 1).flatten(1, 2)

    @staticmethod
    def backward(ctx, grad):
        group, n = ctx.group, dist.get_world_size(ctx.group)
        parts = grad.unflatten(1, (n, -1)).transpose(0, 1).contiguous()    # (n, b, s_local, ...)
        if dist.get_backend(group) == "nccl":
            mine = torch.empty_like(parts[0])
            dist.reduce_scatter_tensor(mine, parts, group=group)
            return mine, None
        dist.all_reduce(parts, group=group)
        return parts[dist.get_rank(group)], None


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group) -> torch.Tensor:
    """The baseline: all-gather k and v (differentiably) over ``group`` and attend the local
    queries to the whole sequence with the local kernel. q, k, v: (b, s_local, heads, d)."""
    if group is None or dist.get_world_size(group) == 1:
        return sdpa_full(q, k, v)
    return sdpa_full(q, _GatherSequence.apply(k, group), _GatherSequence.apply(v, group))


def cp_attention(attn: str, cp_group):
    """Bidirectional attention over the cp group: a ringX function (causal=False) or the
    all-gather baseline."""
    if attn == "allgather":
        return functools.partial(allgather_attention, group=cp_group)
    if attn not in ATTN_FUNCS:
        raise ValueError(f"attention {attn!r}: expected one of {', '.join(ATTN_CHOICES)}")
    return functools.partial(ATTN_FUNCS[attn], causal=False, group=cp_group)


def local_positions(tokens: int, cp_group, device=None) -> torch.Tensor:
    """Global token indices (S_local,) of this cp rank's contiguous range."""
    n = dist.get_world_size(cp_group) if cp_group is not None else 1
    r = dist.get_rank(cp_group) if cp_group is not None else 0
    start, end = token_range(tokens, r, n)
    return torch.arange(start, end, device=device)


def cp_mse(pred: torch.Tensor, target: torch.Tensor, cp_group):
    """Mean squared error over every element of the whole grid (all cp ranks).

    Returns (loss to back-propagate on this rank, global mean as a detached tensor)."""
    local = (pred.float() - target.float()).pow(2).sum()
    counts = torch.stack([torch.tensor(float(target.numel()), dtype=torch.float64, device=local.device),
                          local.detach().double()])
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        dist.all_reduce(counts, group=cp_group)
    return local / counts[0].to(local.dtype), (counts[1] / counts[0]).float()
