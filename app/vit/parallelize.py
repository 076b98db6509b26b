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

from ringX import ATTN_FUNCS, ContextParallel
from ringX.baseline import allgather_attention

from .data import token_range

ATTN_CHOICES = tuple(ATTN_FUNCS) + ("allgather",)


def cp_attention(attn: str, cp_group, inner=None):
    """Bidirectional attention over the cp group: a ringX function (causal=False) or the
    all-gather baseline. ``inner``: (inner group, outer group) of a two-level cp group: heads
    over the inner group by all-to-all, the function over the outer group (ringX.hybrid; the
    token order does not matter without a mask, so the contiguous ranges stay)."""
    if attn == "allgather":     # the seed's baseline: all-gather k/v, one local kernel
        return functools.partial(allgather_attention, group=cp_group)
    if attn not in ATTN_FUNCS:
        raise ValueError(f"attention {attn!r}: expected one of {', '.join(ATTN_CHOICES)}")
    return functools.partial(ContextParallel(attn, cp_group, inner=inner).attention, causal=False)


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
