"""The all-gather baseline that ringX is compared against (the seed project's): no ring, no
overlap. Each rank all-gathers k and v of the whole sequence, differentiably, and attends its own
queries to all of them with one SDPA call; the backward reduce-scatters dk/dv in their own dtype.
Per-rank memory for k/v is O(S), and the reduction of dk/dv runs in bf16 when the inputs are bf16.
Bidirectional attention only (a contiguous split's causal mask is not SDPA's top-left one).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def sdpa_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional attention of q (b, sq, h, d) over k/v (b, sk, hk, d) -> (b, sq, h, d), one
    SDPA call (GQA: h % hk == 0)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          enable_gqa=True).transpose(1, 2)


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


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None) -> torch.Tensor:
    """Bidirectional attention over a contiguous split: q (b, s_local, h, d), k/v
    (b, s_local, hk, d) on each rank of ``group`` (None: the default group, or one process when
    torch.distributed is not initialised) -> out (b, s_local, h, d)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return sdpa_bshd(q, k, v)
    group = dist.group.WORLD if group is None else group
    return sdpa_bshd(q, _GatherSequence.apply(k, group), _GatherSequence.apply(v, group))
