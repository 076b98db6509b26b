"""Two-level context parallelism: heads split over an inner group by all-to-all (Ulysses),
then a ringX function over an outer group, then the all-to-all back.

N = Ni * No ranks; the inner group (Ni ranks, meant to be one node: NVLink) trades a sequence
split for a head split, so the outer group (No ranks, across nodes) runs its ringX function on
Ni times longer local sequences with 1/Ni of the heads: No times fewer ring steps across the
slow network, each Ni times larger.

    out = hybrid_attn_func(q, k, v, "ringX3", inner_group, outer_group, causal=True)

q (b, S/N, h, d), k/v (b, S/N, hk, d) in the layout ``hybrid_shard`` gives (see
``hybrid_positions``): the outer function's layout over No ranks (contiguous for ringX1/2,
zigzag for ringX3/4), each outer rank's S/No tokens then cut contiguously over its Ni inner
ranks, in inner-rank order. h must divide by Ni. Grouped-query attention: with hk divisible by
Ni each inner rank gets hk/Ni kv heads; with Ni divisible by hk (more inner ranks than kv heads)
each gets the one kv head its query heads use, replicated only that far (its gradient summed
back). Returns out like q, or (out, lse (b, h, S/N), None) with return_attn_probs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .algorithms import ALGORITHMS
from .comm import GroupComm, node_groups
from .layout import global_positions


def _kv_heads_for(inner: int, heads: int, kv_heads: int) -> list[list[int]]:
    """For each inner rank, the kv heads its query heads [j*h/Ni, (j+1)*h/Ni) use."""
    per, group = heads // inner, heads // kv_heads
    if kv_heads % inner and inner % kv_heads:
        raise ValueError(f"kv heads ({kv_heads}) and the inner group ({inner} ranks) must divide one another")
    return [sorted({q // group for q in range(j * per, (j + 1) * per)}) for j in range(inner)]


class _SeqToHeads(torch.autograd.Function):
    """(Ni, b, s, c, d) chunks, chunk j for inner rank j -> (b, Ni*s, c, d): every rank's chunk
    for me, concatenated along the sequence in rank order. Backward: the inverse exchange."""

    @staticmethod
    def forward(ctx, chunks: torch.Tensor, comm: GroupComm):
        ctx.comm = comm
        recv = comm.all_to_all_new(chunks)
        n, b, s, c, d = recv.shape
        return recv.permute(1, 0, 2, 3, 4).reshape(b, n * s, c, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = ctx.comm.size
        b, ns, c, d = grad.shape
        return ctx.comm.all_to_all_new(grad.reshape(b, n, ns // n, c, d).permute(1, 0, 2, 3, 4)), None


class _HeadsToSeq(torch.autograd.Function):
    """(b, Ni*s, c, d) of my heads for the inner group's sequence -> (b, s, Ni*c, d): my
    sequence piece with every rank's heads (the inverse of _SeqToHeads)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: GroupComm):
        ctx.comm = comm
        n = comm.size
        b, ns, c, d = x.shape
        recv = comm.all_to_all_new(x.reshape(b, n, ns // n, c, d).permute(1, 0, 2, 3, 4))
        return recv.permute(1, 2, 0, 3, 4).reshape(b, ns // n, n * c, d)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = ctx.comm.size
        b, s, nc, d = grad.shape
        recv = ctx.comm.all_to_all_new(grad.reshape(b, s, n, nc // n, d).permute(2, 0, 1, 3, 4))
        return recv.permute(1, 0, 2, 3, 4).reshape(b, n * s, nc // n, d), None


def hybrid_attn_func(q, k, v, fn: str = "ringX3", inner_group=None, outer_group=None, causal: bool = False,
                     softmax_scale=None, window_size=(-1, -1), return_attn_probs: bool = False,
                     cu_seqlens=None, max_seqlen=None):
    """Ulysses over ``inner_group`` x the ringX function ``fn`` over ``outer_group`` (module doc).
    With ``cu_seqlens`` (global document boundaries of one packed sequence, batch 1) the outer
    call is ``fn``'s varlen function: documents attend only to themselves."""
    if fn not in ALGORITHMS:
        raise ValueError(f"fn {fn!r}: expected one of {', '.join(ALGORITHMS)}")
    inner = GroupComm(inner_group)
    ni = inner.size
    b, s, h, d = q.shape
    hk = k.shape[2]
    if h % ni:
        raise ValueError(f"query heads ({h}) must divide by the inner group's {ni} ranks")
    need = _kv_heads_for(ni, h, hk)
    qc = q.reshape(b, s, ni, h // ni, d).permute(2, 0, 1, 3, 4)
    index = torch.tensor([x for heads in need for x in heads], device=k.device)
    kc, vc = (t.index_select(2, index).reshape(b, s, ni, len(need[0]), d).permute(2, 0, 1, 3, 4)
              for t in (k, v))
    ql, kl, vl = (_SeqToHeads.apply(t, inner) for t in (qc, kc, vc))     # (b, Ni*s, heads/Ni, d)
    from . import ATTN_FUNCS, VARLEN_FUNCS
    kw = dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size, group=outer_group,
              return_attn_probs=return_attn_probs)
    if cu_seqlens is not None:
        if b != 1:
            raise ValueError(f"cu_seqlens: one packed sequence (batch 1) is expected, got batch {b}")
        res = VARLEN_FUNCS[fn](ql[0], kl[0], vl[0], cu_seqlens, max_seqlen, **kw)
        res = (res[0][None], res[1][None], None) if return_attn_probs else res[None]
    else:
        res = ATTN_FUNCS[fn](ql, kl, vl, **kw)
    out_l, lse_l = (res[0], res[1]) if return_attn_probs else (res, None)
    out = _HeadsToSeq.apply(out_l, inner)
    if not return_attn_probs:
        return out
    lse = _HeadsToSeq.apply(lse_l.transpose(1, 2).unsqueeze(-1).contiguous(), inner)
    return out, lse.squeeze(-1).transpose(1, 2), None


def hybrid_positions(fn: str, seqlen: int, inner_rank: int, inner: int, outer_rank: int, outer: int,
                     device=None) -> torch.Tensor:
    """Global positions (S/N,) of the tokens rank (inner_rank, outer_rank) holds: the outer
    function's layout over the outer ranks, each outer share cut contiguously over the inner
    ranks. S must divide by N (by 2N for zigzag functions)."""
    layout = ALGORITHMS[fn].layout
    parts = (2 if layout == "zigzag" else 1) * inner * outer
    if seqlen % parts:
        raise ValueError(f"sequence length {seqlen} must divide by {parts} for {fn} over {inner} x {outer} ranks")
    outer_pos = global_positions(layout, seqlen, outer_rank, outer, device=device)
    piece = seqlen // (inner * outer)
    return outer_pos[inner_rank * piece:(inner_rank + 1) * piece]


def hybrid_shard(x: torch.Tensor, fn: str, inner_rank: int, inner: int, outer_rank: int, outer: int,
                 dim: int = 1) -> torch.Tensor:
    """The part of a whole-sequence tensor (sequence along ``dim``) that rank (inner_rank,
    outer_rank) holds for hybrid_attn_func."""
    pos = hybrid_positions(fn, x.shape[dim], inner_rank, inner, outer_rank, outer, device=x.device)
    return x.index_select(dim, pos)


def groups_2d(inner: int, inner_first: bool = True):
    """(inner group, outer group) of this rank for a world of inner x outer ranks: with
    ``inner_first`` the inner groups are consecutive ranks (one node), else strided. Collective:
    every rank of the world must call it."""
    world = dist.get_world_size()
    if world % inner:
        raise ValueError(f"world size {world} does not divide by the inner degree {inner}")
    if inner_first:
        nodes = node_groups(None, inner)
        return nodes.inner, nodes.outer
    nodes = node_groups(None, world // inner)      # strided inner groups: the columns of outer-sized chunks
    return nodes.outer, nodes.inner
