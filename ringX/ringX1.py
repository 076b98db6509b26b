"""ringX1: bidirectional context-parallel attention, contiguous layout, reduced message load.

Forward, for each owner rank i in turn (i = 0 .. N-1)::

    owner i broadcasts q_i                      (posted one step ahead: overlaps step i-1)
    every rank j: (o_ij, lse_ij) = attn(q_i, k_j, v_j)
    m_i = all-reduce MAX over j of lse_ij       (posted async; waited one step later)
    every rank j: w_ij = exp(lse_ij - m_i); packs (o_ij * w_ij, w_ij)  (float32, one message)
    reduce SUM of the packs to owner i          (async, double-buffered)
    owner i: out_i = sum(o w) / sum(w), lse_i = m_i + log(sum(w))

Backward, for each owner rank i in turn: owner i broadcasts its fused [k_i; v_i] (one message,
kv heads unexpanded); every rank accumulates its own dq locally and its partial [dk_i; dv_i]
(float32), which is reduced to owner i. The same backward serves ringX2 and ringX4.

Per-rank memory is O(S/N); messages are q-sized forward and kv-sized backward. On two ranks
each reduce is one message from the peer, and the partials travel as the kernel wrote them
(ringX.pair).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .varlen import varlen_attention
from .api import Algorithm, RunContext, ring_attention
from .comm import broadcast_rounds, wait
from .merge import add_block_, weigh_
from .pair import pair_kv_backward, pair_q_forward


class _Pack:
    """One reduce message of the broadcast-q forward: a flat float buffer viewed as ``ow``
    (b, s, h, d) and ``w`` (b, s, h), so both parts keep aligned rows and travel together."""

    def __init__(self, b: int, s: int, h: int, d: int, dtype: torch.dtype, device):
        n = b * s * h
        self.flat = torch.empty(n * (d + 1), dtype=dtype, device=device)
        self.ow = self.flat[: n * d].view(b, s, h, d)
        self.w = self.flat[n * d:].view(b, s, h)


def bcast_q_forward(run: RunContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Broadcast-q forward. q: (b, s, h, d), k/v: (b, s, hk, d) local shards ->
    (out (b, s, h, d), lse (b, h, s)) in run.acc_dtype for this rank's queries."""
    if run.comm.size == 2:
        return pair_q_forward(run, q, k, v)
    comm, acc = run.comm, run.acc_dtype
    r = comm.rank
    b, s, h, d = q.shape
    packs = [_Pack(b, s, h, d, acc, q.device) for _ in range(2)]
    maxes = [torch.empty((b, h, s), dtype=acc, device=q.device) for _ in range(2)]
    out = torch.empty((b, s, h, d), dtype=acc, device=q.device)
    lse = torch.empty((b, h, s), dtype=acc, device=q.device)
    pending_reduce: list = [None, None]
    pending_max = None
    prev = None  # (owner, slot, block out, block lse) of the step whose reduce is not yet posted

    def finish_reduce(slot: int, owner: int) -> None:
        wait(pending_reduce[slot])
        pending_reduce[slot] = None
        if owner == r:
            den = packs[slot].w                                    # (b, s, h)
            torch.div(packs[slot].ow, den.unsqueeze(-1), out=out)
            lse.copy_(maxes[slot] + torch.log(den).transpose(1, 2))

    def post_reduce(owner: int, slot: int, o_blk, lse_blk) -> None:
        wait(pending_max)
        pack = packs[slot]
        if o_blk is None:
            pack.flat.zero_()
        else:
            weigh_(pack.ow, pack.w, o_blk, lse_blk, maxes[slot])
        pending_reduce[slot] = comm.reduce(pack.flat, dst=owner)

    owners_in_slot = [None, None]
    needed = run.owners("q", s)
    for i, q_i in broadcast_rounds(comm, q, owners=needed):
        if needed is not None and i not in needed:   # no other rank sees these queries
            o_own, l_own = run.whole_block_forward(q, k, v, q_rank=r, kv_rank=r)
            out.copy_(o_own)
            lse.copy_(l_own)
            continue
        slot = i % 2
        if prev is not None:              # the previous owner's reduce runs beside this block
            post_reduce(*prev)
        o_blk, lse_blk = run.whole_block_forward(q_i, k, v, q_rank=i, kv_rank=r)
        if owners_in_slot[slot] is not None:
            finish_reduce(slot, owners_in_slot[slot])
        m = maxes[slot]
        if lse_blk is None:
            m.fill_(float("-inf"))
        else:
            m.copy_(lse_blk)
        pending_max = comm.all_reduce(m, op=dist.ReduceOp.MAX)
        prev, owners_in_slot[slot] = (i, slot, o_blk, lse_blk), i
    if prev is not None:
        post_reduce(*prev)
    for slot in range(2):
        if owners_in_slot[slot] is not None:
            finish_reduce(slot, owners_in_slot[slot])
    return out, lse


def bcast_kv_backward(run: RunContext, dout, q, k, v, out, lse):
    """Broadcast-kv backward. dout/q/out: (b, s, h, d), k/v: (b, s, hk, d), lse: (b, h, s) ->
    (dq, dk, dv) in run.acc_dtype. Works for any layout that has a block plan."""
    if run.comm.size == 2:
        return pair_kv_backward(run, dout, q, k, v, out, lse)
    comm, acc = run.comm, run.acc_dtype
    r = comm.rank
    kv = torch.stack([k, v])                                          # (2, b, s, hk, d)
    dkv_bufs = [torch.empty(kv.shape, dtype=acc, device=q.device) for _ in range(2)]
    dkv_own = torch.empty(kv.shape, dtype=acc, device=q.device)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dq_fresh = True                       # the first block that covers every row writes dq
    pending: list = [None, None]
    owners_in_slot = [None, None]
    needed = run.owners("kv", q.shape[1])

    def finish(slot: int) -> None:
        wait(pending[slot])
        pending[slot] = None
        if owners_in_slot[slot] == r:
            dkv_own.copy_(dkv_bufs[slot])

    for i, kv_i in broadcast_rounds(comm, kv, owners=needed):
        slot = i % 2
        if owners_in_slot[slot] is not None:
            finish(slot)
        dkv, dkv_fresh = dkv_bufs[slot], True
        for blk in run.blocks(r, i, q.shape[1]):
            qs, ks = blk.q_rows, blk.kv_rows
            dq_b, dk_b, dv_b = run.block_backward(blk, dout, q, kv_i[0], kv_i[1], out, lse)
            dq_fresh = add_block_(dq, qs, dq_b, dq_fresh)
            add_block_(dkv[0], ks, dk_b, dkv_fresh)
            dkv_fresh = add_block_(dkv[1], ks, dv_b, dkv_fresh)
        if dkv_fresh:                     # no block of this rank touches owner i's keys
            dkv.zero_()
        if needed is not None and i not in needed:   # only this rank sees its keys: no reduce
            dkv_own.copy_(dkv)
            continue
        pending[slot] = comm.reduce(dkv, dst=i)
        owners_in_slot[slot] = i
    for slot in range(2):
        if owners_in_slot[slot] is not None:
            finish(slot)
    if dq_fresh:
        dq.zero_()
    return dq, dkv_own[0], dkv_own[1]


ALGORITHM = Algorithm(name="ringX1", code=1, layout="contiguous", forward=bcast_q_forward,
                      backward=bcast_kv_backward)


def ringX1_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                     alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                     backend=None):
    """Exact attention over a sequence split contiguously across the ranks of ``group``.

    Args:
        q: (batch, seqlen_local, heads, headdim); rank r of N holds tokens [r*S/N, (r+1)*S/N).
        k, v: (batch, seqlen_local, kv_heads, headdim), heads % kv_heads == 0 (GQA/MQA; k/v
            travel between ranks unexpanded).
        dropout_p: must be 0.0 (NotImplementedError otherwise).
        softmax_scale: default headdim ** -0.5.
        causal: mask keys after the query's global position. Causal blocks are square and
            aligned on the diagonal (query t sees keys 0..t of the global sequence)::

                q\\k  r0 r1 r2
                r0   \\  .  .        \\ = causal diagonal block, # = full block, . = skipped
                r1   #  \\  .
                r2   #  #  \\
        window_size: must be (-1, -1); alibi_slopes: must be None (NotImplementedError).
        deterministic: accepted; ringX's own reductions run in a fixed order, and kernel
            determinism follows torch.use_deterministic_algorithms.
        return_attn_probs: also return lse.
        group: any torch.distributed process group (strided sub-groups too); None = default
            group (or a single process when torch.distributed is not initialised).
        backend: force a local kernel backend by name (see ringX.kernels); default: the first
            that supports the inputs, or $RINGX_BACKEND.

    Returns:
        out (batch, seqlen_local, heads, headdim) in q's dtype, or (out, lse, None) with
        lse (batch, heads, seqlen_local) float32 (natural log) if return_attn_probs.
    """
    return ring_attention(ALGORITHM, q, k, v, dropout_p, softmax_scale, causal, window_size,
                          alibi_slopes, deterministic, return_attn_probs, group, backend)


def ringX1_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                            causal=False, window_size=(-1, -1), alibi_slopes=None,
                            deterministic=False, return_attn_probs=False, group=None,
                            backend=None):
    """ringX1 over (S/N, heads, headdim) shards of one packed sequence of documents with global
    ``cu_seqlens``; see ringX.varlen for the contract."""
    return varlen_attention(ALGORITHM, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                            causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                            group, backend)
