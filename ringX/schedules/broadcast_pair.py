"""The broadcast schedules (ringX1's, ringX4's backward, ringX2's full attention) on a group of
two ranks.

With two ranks, the reduce of a partial result to its owner has one contributor besides the
owner: it is one message from the peer. So each partial travels as the kernel wrote it, point to
point, and the owner merges it in acc dtype (float32)::

    forward, owner i:   the peer sends (o, lse) of (q_i, its k/v): o in the kernel's dtype
                        the owner merges it into its own block's result (ringX.merge)
    backward, owner i:  the peer sends dk, dv of (its q, k/v_i), the key rows its block covers,
                        in the kernel's dtype; the owner adds them to its own block's

Every partial is one kernel output, exact in its dtype, so the owner computes what the float32
reduces of the N-rank schedules compute (the backward's sums are the same, bit for bit), with
half their bytes in bf16 and no max all-reduce forward. Beyond two ranks a reduce moves fewer
bytes into the owner than the N - 1 messages would, so ringX1 keeps its reduces there.
"""
from __future__ import annotations

import torch

from ..api import RunContext
from ..comm import broadcast_rounds, wait_all
from ..merge import acc_copy, add_block_, merge_


def pair_q_forward(run: RunContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """ringX1's broadcast-q forward on two ranks. q: (b, s, h, d), k/v: (b, s, hk, d) local
    shards -> (out (b, s, h, d), lse (b, h, s)) in run.acc_dtype for this rank's queries."""
    comm, acc, s = run.comm, run.acc_dtype, q.shape[1]
    r, peer = comm.rank, 1 - comm.rank
    out = lse = None
    works, sent, got = [], [], []
    for i, q_i in broadcast_rounds(comm, q, owners=run.owners("q", s)):
        o, l = run.whole_block_forward(q_i, k, v, q_rank=i, kv_rank=r)
        if o is None:
            continue
        if i != r:                                                    # the owner merges it
            sent.append([(o.contiguous(), i), (l.to(acc).contiguous(), i)])
            works += comm.exchange(sent[-1], [])
            continue
        out, lse = acc_copy(o, acc), l.to(acc).contiguous()         # the own (diagonal) block
        peer_blocks = run.blocks(r, peer, s)                         # the peer computes one too
        if peer_blocks:
            dtype = run.result_dtype(peer_blocks[0], q.dtype, rows=s)
            got = [torch.empty(o.shape, dtype=dtype, device=o.device), torch.empty_like(lse)]
            works += comm.exchange([], [(t, peer) for t in got])
    wait_all(works)
    if got:
        merge_(out, lse, got[0], got[1])
    return out, lse


def pair_kv_backward(run: RunContext, dout, q, k, v, out, lse):
    """The broadcast-kv backward on two ranks, any layout with a block plan. dout/q/out:
    (b, s, h, d), k/v: (b, s, hk, d), lse: (b, h, s) -> (dq, dk, dv) in run.acc_dtype."""
    comm, acc, s = run.comm, run.acc_dtype, q.shape[1]
    r, peer = comm.rank, 1 - comm.rank
    b, _, hk, d = k.shape
    kv = torch.stack([k, v])                                          # (2, b, s, hk, d)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dkv = torch.empty(kv.shape, dtype=acc, device=q.device)          # this rank's keys
    dq_fresh = dkv_fresh = True           # the first block that covers every row writes
    works, sent, got = [], [], []
    for i, kv_i in broadcast_rounds(comm, kv, owners=run.owners("kv", s)):
        for blk in run.blocks(r, i, s):
            dq_b, dk_b, dv_b = run.block_backward(blk, dout, q, kv_i[0], kv_i[1], out, lse)
            dq_fresh = add_block_(dq, blk.q_rows, dq_b, dq_fresh)
            if i != r:                                                # the owner adds them
                sent.append([(dk_b.contiguous(), i), (dv_b.contiguous(), i)])
                works += comm.exchange(sent[-1], [])
                continue
            add_block_(dkv[0], blk.kv_rows, dk_b, dkv_fresh)
            dkv_fresh = add_block_(dkv[1], blk.kv_rows, dv_b, dkv_fresh)
        if i == r:
            for pblk in run.blocks(peer, r, s):   # the peer's on my keys
                rows = pblk.kv_rows
                bufs = [torch.empty((b, rows.stop - rows.start, hk, d), dtype=run.result_dtype(pblk, k.dtype),
                                    device=q.device) for _ in range(2)]
                got.append((rows, bufs))
                works += comm.exchange([], [(t, peer) for t in bufs])
    wait_all(works)
    for rows, (dk_p, dv_p) in got:
        add_block_(dkv[0], rows, dk_p, dkv_fresh)
        dkv_fresh = add_block_(dkv[1], rows, dv_p, dkv_fresh)
    if dq_fresh:
        dq.zero_()
    if dkv_fresh:
        dkv.zero_()
    return dq, dkv[0], dkv[1]
