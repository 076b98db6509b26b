"""The broadcast schedules: each owner rank in turn broadcasts its queries or keys/values, every
rank computes its block against them, and partial results are reduced to their owner.

bcast_q_forward (ringX1's forward, and ringX2's for full attention), for each owner i in turn::

    owner i broadcasts q_i                      (posted one step ahead: overlaps step i-1)
    every rank j: (o_ij, lse_ij) = attn(q_i, k_j, v_j)
    m_i = all-reduce MAX over j of lse_ij       (posted async; waited one step later)
    every rank j: w_ij = exp(lse_ij - m_i); packs (o_ij * w_ij, w_ij)  (float32, one message)
    reduce SUM of the packs to owner i          (async, double-buffered)
    owner i: out_i = sum(o w) / sum(w), lse_i = m_i + log(sum(w))

bcast_kv_forward (ringX4's forward): each owner in turn broadcasts its fused [k; v] (unexpanded,
received into up to three buffers, each broadcast posted as soon as its buffer is free); every
rank first attends its local q to its own k/v (the diagonal block, while the first broadcasts
travel), then to each other owner's, merging the partials in float32: up to four at a time in one
pass (ringX.merge.PendingMerges; at most 256 MiB of partials held), the last pass writing the
output in q's dtype.

bcast_kv_backward (ringX1's, ringX2's for full attention, ringX4's): owner i broadcasts its fused
[k_i; v_i] (one message, kv heads unexpanded); every rank accumulates its own dq locally (up to
four blocks per float32 pass, ringX.merge.PendingSums) and its partial [dk_i; dv_i] (float32),
which is reduced to owner i.

Per-rank memory is O(S/N). Under a mask an owner whose tensor no other rank needs is left out of
the broadcasts and reduces (RunContext.owners). On two ranks ringX.schedules.broadcast_pair
replaces the reduces by point-to-point partials.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..api import RunContext
from ..comm import broadcast_rounds, wait
from ..merge import PendingMerges, PendingSums, add_block_, weigh_


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
    (dq in q's dtype (summed in acc dtype, rounded once), dk, dv in run.acc_dtype). Works for any
    layout that has a block plan."""
    comm, acc = run.comm, run.acc_dtype
    r = comm.rank
    kv = torch.stack([k, v])                                          # (2, b, s, hk, d)
    dkv_bufs = [torch.empty(kv.shape, dtype=acc, device=q.device) for _ in range(2)]
    dkv_own = torch.empty(kv.shape, dtype=acc, device=q.device)
    dq_sums = PendingSums(q.shape, q.device, acc)     # the blocks' dq summed four at a time
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
            dq_sums.add(qs, dq_b)
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
    return dq_sums.finish(q.dtype), dkv_own[0], dkv_own[1]


def bcast_kv_forward(run: RunContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q: (b, s, h, d), k/v: (b, s, hk, d) -> (out (b, s, h, d) in q's dtype, merged in acc
    dtype and rounded once; lse (b, h, s) in acc dtype)."""
    comm = run.comm
    r = comm.rank
    kv = torch.stack([k, v])                                          # (2, b, s, hk, d)
    s = q.shape[1]
    merges = PendingMerges(q.shape, q.device, run.acc_dtype)     # the partials merged four at a time
    for i, kv_i in broadcast_rounds(comm, kv, own_first=True, owners=run.owners("kv", s)):
        for blk in run.blocks(r, i, s):
            merges.add(blk.q_rows, *run.block_forward(blk, q, kv_i[0], kv_i[1]))
    return merges.finish(q.dtype)                   # out final in q's dtype, lse in acc dtype
