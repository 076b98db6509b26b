"""ringX3: causal context-parallel attention, zigzag layout, balanced, all-gather.

Rank r of N holds chunks r and 2N-1-r of 2N. Forward: all-gather the fused [k; v] (unexpanded)
asynchronously while the local diagonal block computes; then for each earlier rank s < r the whole
local q attends the first half of s's k/v, and for each later rank s > r only the second half of
the local q attends all of s's k/v (see ringX.layout.block_plan). Partials merge in float32.
Backward: all-gather k/v again (overlapped with the diagonal block's backward), accumulate dq
locally and every rank's [dk; dv] partial in an (N, 2, ...) float32 buffer, and reduce-scatter it.

Every rank does the same work; per-rank memory is O(S) for the gathered k/v.
"""
from __future__ import annotations

import torch

from .api import Algorithm, RunContext, ring_attention
from .comm import wait
from .layout import block_plan
from .merge import merge_, new_accumulators


def _others(n: int, r: int) -> list[int]:
    return [s for s in range(n) if s != r]


def allgather_forward(run: RunContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q: (b, s, h, d), k/v: (b, s, hk, d) -> (out (b, s, h, d), lse (b, h, s)) in acc dtype."""
    comm = run.comm
    n, r = comm.size, comm.rank
    kv = torch.stack([k, v])                                          # (2, b, s, hk, d)
    gathered = torch.empty((n,) + tuple(kv.shape), dtype=kv.dtype, device=kv.device)
    work = comm.all_gather(gathered, kv)
    out, lse = new_accumulators(q, run.acc_dtype)
    for src, kv_src in [(r, kv)] + [(s, None) for s in _others(n, r)]:
        if kv_src is None:
            wait(work)
            work = None
            kv_src = gathered[src]
        for blk in block_plan(run.layout, run.causal, r, src, q.shape[1]):
            qs, ks = blk.q_rows, blk.kv_rows
            o, l = run.kernel.forward(q[:, qs], kv_src[0][:, ks], kv_src[1][:, ks], blk.causal, run.scale)
            merge_(out[:, qs], lse[:, :, qs], o, l)
    wait(work)
    return out, lse


def allgather_backward(run: RunContext, dout, q, k, v, out, lse):
    """Gradients (dq, dk, dv) in acc dtype for this rank's shards; shapes as q, k, v."""
    comm, acc = run.comm, run.acc_dtype
    n, r = comm.size, comm.rank
    kv = torch.stack([k, v])
    gathered = torch.empty((n,) + tuple(kv.shape), dtype=kv.dtype, device=kv.device)
    work = comm.all_gather(gathered, kv)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv_all = torch.zeros((n,) + tuple(kv.shape), dtype=acc, device=q.device)
    for src, kv_src in [(r, kv)] + [(s, None) for s in _others(n, r)]:
        if kv_src is None:
            wait(work)
            work = None
            kv_src = gathered[src]
        for blk in block_plan(run.layout, run.causal, r, src, q.shape[1]):
            qs, ks = blk.q_rows, blk.kv_rows
            dq_b, dk_b, dv_b = run.kernel.backward(
                dout[:, qs], q[:, qs], kv_src[0][:, ks], kv_src[1][:, ks], out[:, qs],
                lse[:, :, qs], blk.causal, run.scale)
            dq[:, qs] += dq_b
            dkv_all[src, 0][:, ks] += dk_b
            dkv_all[src, 1][:, ks] += dv_b
    wait(work)
    dkv = torch.empty(kv.shape, dtype=acc, device=q.device)
    wait(comm.reduce_scatter(dkv, dkv_all))
    return dq, dkv[0], dkv[1]


ALGORITHM = Algorithm(name="ringX3", code=3, layout="zigzag", forward=allgather_forward,
                      backward=allgather_backward)


def ringX3_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                     alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                     backend=None):
    """Causal attention over a zigzag split (rank r holds chunks r and 2N-1-r of 2N; see
    ringX.layout). Arguments and returns as ringX1_attn_func; seqlen_local must be even."""
    return ring_attention(ALGORITHM, q, k, v, dropout_p, softmax_scale, causal, window_size,
                          alibi_slopes, deterministic, return_attn_probs, group, backend)
