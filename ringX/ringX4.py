"""ringX4: causal context-parallel attention, zigzag layout, balanced, broadcast-reduce.

Forward: each owner rank s in turn broadcasts its fused [k_s; v_s] (unexpanded, received into up
to three buffers, each broadcast posted as soon as its buffer is free); every rank first attends
its local q to its own k/v (the diagonal block, while the first broadcasts travel), then to each
other owner's with the zigzag block plan of ringX3, merging the partials in float32.
Backward: the broadcast-kv / reduce-dkv schedule of ringX1 with the zigzag block plan.

Every rank does the same work and per-rank memory stays O(S/N).
"""
from __future__ import annotations

import torch

from .varlen import varlen_attention
from .api import Algorithm, RunContext, ring_attention
from .comm import broadcast_rounds
from .merge import acc_copy, merge_
from .ringX1 import bcast_kv_backward


def bcast_kv_forward(run: RunContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q: (b, s, h, d), k/v: (b, s, hk, d) -> (out (b, s, h, d), lse (b, h, s)) in acc dtype."""
    comm = run.comm
    r = comm.rank
    kv = torch.stack([k, v])                                          # (2, b, s, hk, d)
    out = lse = None
    for i, kv_i in broadcast_rounds(comm, kv, own_first=True, owners=run.owners("kv", q.shape[1])):
        for blk in run.blocks(r, i, q.shape[1]):
            qs = blk.q_rows
            o, l = run.block_forward(blk, q, kv_i[0], kv_i[1])
            if out is None:               # the own (diagonal) block comes first and covers every row
                out = acc_copy(o, run.acc_dtype)
                lse = torch.empty(l.shape, dtype=run.acc_dtype, device=l.device).copy_(l)
            else:
                merge_(out[:, qs], lse[:, :, qs], o, l)
    return out, lse


ALGORITHM = Algorithm(name="ringX4", code=4, layout="zigzag", forward=bcast_kv_forward,
                      backward=bcast_kv_backward, other_layouts=("stripe",))


def ringX4_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                     alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                     backend=None, layout=None):
    """Causal attention over a zigzag split, broadcast-reduce schedule. Arguments and returns as
    ringX1_attn_func; seqlen_local must be even. layout="stripe" takes the striped layout
    instead (rank r holds tokens r, r+N, ...; see ringX.layout)."""
    return ring_attention(ALGORITHM, q, k, v, dropout_p, softmax_scale, causal, window_size,
                          alibi_slopes, deterministic, return_attn_probs, group, backend,
                          layout=layout)


def ringX4_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                            causal=False, window_size=(-1, -1), alibi_slopes=None,
                            deterministic=False, return_attn_probs=False, group=None,
                            backend=None, layout=None):
    """ringX4 over (S/N, heads, headdim) shards of one packed sequence of documents with global
    ``cu_seqlens``; see ringX.varlen for the contract."""
    return varlen_attention(ALGORITHM, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                            causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                            group, backend, layout=layout)
