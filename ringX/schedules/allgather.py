"""The all-gather schedule (ringX3): zigzag (or stripe) layout, balanced.

Rank r of N holds chunks r and 2N-1-r of 2N (two halves of ``half`` tokens). Forward::

    all-gather the fused [k; v] (unexpanded)    -- async, overlaps the local diagonal block
    diagonal block: local q vs local k/v, causal on the local order
    earlier ranks s < r: the whole local q attends the first halves of their k/v, as ONE kernel
        call over the concatenated keys (r * half of them)
    later ranks s > r: the second half of the local q attends all their k/v, as ONE kernel call
        over (N-1-r) * 2 * half keys
    merge the three partials in float32 (ringX.merge)

Backward: all-gather k/v again (overlapped with the diagonal block's backward), the same three
calls, and the [dk; dv] partials for every rank in a float32 buffer reduce-scattered in two
pieces: the second halves (final once the later-rank call is done) go out while the earlier-rank
call computes, the first halves last.

For causal=False the gathered k and v of every rank (its own included) go to ONE kernel call
forward and one backward, after the gather instead of beside a diagonal block: on one NVLink node
one call over S keys beats N calls over S/N by more than the gather costs. That call's out and dq
are final as they come; its dk/dv for every rank's keys are exact in the kernel's dtype, so they
travel in that dtype (all-to-all) and each rank sums the N partials for its keys in float32.

Every rank does the same work; per-rank memory is O(S) for the gathered k/v.
"""
from __future__ import annotations

import torch

from ..api import RunContext
from ..comm import wait, wait_all
from ..merge import acc_copy, accumulate_, merge_, new_accumulators


def _keys(gathered: torch.Tensor, ranks: slice, rows: slice) -> torch.Tensor:
    """gathered (N, 2, b, s, hk, d) -> k/v of ``ranks`` restricted to ``rows``, concatenated
    along the sequence: (2, b, n_ranks * n_rows, hk, d)."""
    part = gathered[ranks, :, :, rows]                       # (n, 2, b, rows, hk, d)
    n, two, b, rows_n, hk, d = part.shape
    return part.permute(1, 2, 0, 3, 4, 5).reshape(two, b, n * rows_n, hk, d)


def _calls(run: RunContext, r: int, n: int, s: int) -> list[tuple[slice, slice, slice, str]]:
    """The non-diagonal kernel calls of rank r, causal: (q rows, source ranks, kv rows of each,
    name)."""
    half = s // 2
    return [(slice(half, s), slice(r + 1, n), slice(0, s), "late"),
            (slice(0, s), slice(0, r), slice(0, half), "early")]


def _diagonal(run: RunContext, r: int, s: int):
    return run.blocks(r, r, s)


def _gather_kv(run: RunContext, k: torch.Tensor, v: torch.Tensor):
    """(gathered (N, 2, b, s, hk, d), its pending all-gather) of every rank's fused [k; v]."""
    kv = torch.stack([k, v])                                          # (2, b, s, hk, d)
    gathered = torch.empty((run.comm.size,) + tuple(kv.shape), dtype=kv.dtype, device=kv.device)
    return gathered, run.comm.all_gather(gathered, kv)


def _rank_major(gathered: torch.Tensor) -> torch.Tensor:
    """(N, b, s, hk, d) -> (b, N * s, hk, d), ranks in order along the sequence (a view when
    b == 1)."""
    n, b, s = gathered.shape[:3]
    return gathered.transpose(0, 1).reshape(b, n * s, *gathered.shape[3:])


def _all_keys(run: RunContext, k: torch.Tensor, v: torch.Tensor):
    """Every rank's k and v in rank order (full attention: any key order will do): two
    (b, N * s, hk, d) tensors, gathered by two all-gathers in flight together."""
    gathered = [torch.empty((run.comm.size,) + tuple(x.shape), dtype=x.dtype, device=x.device)
                for x in (k, v)]
    wait_all([run.comm.all_gather(g, x.contiguous()) for g, x in zip(gathered, (k, v))])
    return [_rank_major(g) for g in gathered]


def _full_forward(run: RunContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    keys, values = _all_keys(run, k, v)
    o, l = run.kernel.forward(q, keys, values, False, run.scale)
    return o, l.to(run.acc_dtype).contiguous()           # one call over all keys: o is final


def _full_backward(run: RunContext, dout, q, k, v, out, lse):
    n, s = run.comm.size, k.shape[1]
    keys, values = _all_keys(run, k, v)
    dq, dk_b, dv_b = run.kernel.backward(dout, q, keys, values, out, lse, False, run.scale)
    del keys, values
    # This rank's partial dk (and dv) for rank j's keys is one kernel output, exact in the kernel's
    # dtype: it travels in that dtype (all-to-all, half a float32 reduce-scatter's bytes) and each
    # rank sums the N partials for its keys in acc dtype, rounding once as a float32 reduction
    # would. (b, N * s, hk, d) -> (N, b, s, hk, d): a view when b == 1.
    parts = [g.unflatten(1, (n, s)).transpose(0, 1).contiguous() for g in (dk_b, dv_b)]
    received = [torch.empty_like(p) for p in parts]          # [j]: rank j's partial for mine
    wait_all([run.comm.all_to_all(r, p) for r, p in zip(received, parts)])
    dk, dv = (r.sum(0, dtype=run.acc_dtype) for r in received)
    return dq, dk, dv                                         # dq: one call over all keys, final


def _masked_others(run: RunContext, r: int, n: int, s: int):
    """The masked blocks of this rank's queries against the keys of the ranks before it and
    after it, each over their keys concatenated in rank order: [(ranks, block)]."""
    out = []
    for ranks in (slice(0, r), slice(r + 1, n)):
        if ranks.stop > ranks.start:
            k_runs = sum((run.runs(j, s) for j in range(ranks.start, ranks.stop)), ())
            blk = run.runs_block(run.runs(r, s), k_runs)
            if blk is not None:
                out.append((ranks, blk))
    return out


def _masked_forward(run: RunContext, q, k, v):
    """Documents, windows or the stripe layout: the diagonal block while k/v are gathered, then
    the planner's blocks against the other ranks' keys (skipped when nothing is visible)."""
    n, r, s = run.comm.size, run.comm.rank, q.shape[1]
    gathered, work = _gather_kv(run, k, v)
    diag = run.blocks(r, r, s)[0]
    o, l = run.block_forward(diag, q, k, v)
    out = acc_copy(o, run.acc_dtype)
    lse = l.to(run.acc_dtype).contiguous()
    wait(work)
    for ranks, blk in _masked_others(run, r, n, s):
        keys = _keys(gathered, ranks, slice(0, s))
        o, l = run.block_forward(blk, q, keys[0], keys[1])
        merge_(out[:, blk.q_rows], lse[:, :, blk.q_rows], o, l)
    return out, lse


def _masked_backward(run: RunContext, dout, q, k, v, out, lse):
    comm, acc = run.comm, run.acc_dtype
    n, r, s = comm.size, comm.rank, q.shape[1]
    b, _, hk, d = k.shape
    gathered, work = _gather_kv(run, k, v)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dkv_all = torch.zeros((n, 2, b, s, hk, d), dtype=acc, device=q.device)
    dq_b, dk_b, dv_b = run.block_backward(run.blocks(r, r, s)[0], dout, q, k, v, out, lse)
    accumulate_(dq, dq_b, first=True)
    accumulate_(dkv_all[r, 0], dk_b)
    accumulate_(dkv_all[r, 1], dv_b)
    wait(work)
    for ranks, blk in _masked_others(run, r, n, s):
        keys = _keys(gathered, ranks, slice(0, s))
        dq_b, dk_b, dv_b = run.block_backward(blk, dout, q, keys[0], keys[1], out, lse)
        accumulate_(dq[:, blk.q_rows], dq_b)
        for c0 in range(blk.kv_rows.start - blk.kv_rows.start % s, blk.kv_rows.stop, s):
            j = ranks.start + c0 // s                 # rank j's keys: concatenated [c0, c0 + s)
            lo, hi = max(c0, blk.kv_rows.start), min(c0 + s, blk.kv_rows.stop)
            src = slice(lo - blk.kv_rows.start, hi - blk.kv_rows.start)
            accumulate_(dkv_all[j, 0][:, lo - c0:hi - c0], dk_b[:, src])
            accumulate_(dkv_all[j, 1][:, lo - c0:hi - c0], dv_b[:, src])
    dkv = torch.empty((2, b, s, hk, d), dtype=acc, device=q.device)
    wait(comm.reduce_scatter(dkv, dkv_all))
    return dq, dkv[0], dkv[1]


def allgather_forward(run: RunContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q: (b, s, h, d), k/v: (b, s, hk, d) -> (out (b, s, h, d), lse (b, h, s)) in acc dtype."""
    if run.mask is not None:
        return _masked_forward(run, q, k, v)
    if not run.causal:
        return _full_forward(run, q, k, v)
    comm = run.comm
    n, r, s = comm.size, comm.rank, q.shape[1]
    gathered, work = _gather_kv(run, k, v)
    out, lse = new_accumulators(q, run.acc_dtype)
    for blk in _diagonal(run, r, s):
        o, l = run.kernel.forward(q[:, blk.q_rows], k[:, blk.kv_rows], v[:, blk.kv_rows], blk.causal, run.scale)
        merge_(out[:, blk.q_rows], lse[:, :, blk.q_rows], o, l)
    wait(work)
    for q_rows, ranks, kv_rows, _ in _calls(run, r, n, s):
        if ranks.stop <= ranks.start:
            continue
        keys = _keys(gathered, ranks, kv_rows)
        o, l = run.kernel.forward(q[:, q_rows], keys[0], keys[1], False, run.scale)
        merge_(out[:, q_rows], lse[:, :, q_rows], o, l)
    return out, lse


def allgather_backward(run: RunContext, dout, q, k, v, out, lse):
    """Gradients (dq, dk, dv) in acc dtype for this rank's shards; shapes as q, k, v."""
    if run.mask is not None:
        return _masked_backward(run, dout, q, k, v, out, lse)
    if not run.causal:
        return _full_backward(run, dout, q, k, v, out, lse)
    comm, acc = run.comm, run.acc_dtype
    n, r, s = comm.size, comm.rank, q.shape[1]
    half = s // 2 if s % 2 == 0 else s
    pieces = s // half                                                # 2 halves (1 if s is odd)
    gathered, work = _gather_kv(run, k, v)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    # dkv_all[p, src]: the [dk; dv] partial for rank src's rows [p*half, (p+1)*half)
    b, _, hk, d = k.shape
    dkv_all = torch.zeros((pieces, n, 2, b, half, hk, d), dtype=acc, device=q.device)

    def add_dkv(ranks: slice, kv_rows: slice, dk_b, dv_b) -> None:
        n_src = ranks.stop - ranks.start
        for j, grad in enumerate((dk_b, dv_b)):
            g = grad.reshape(b, n_src, kv_rows.stop - kv_rows.start, hk, d)
            for p in range(pieces):
                lo, hi = max(kv_rows.start, p * half), min(kv_rows.stop, (p + 1) * half)
                if lo < hi:
                    dkv_all[p, ranks, j, :, lo - p * half:hi - p * half] += \
                        g[:, :, lo - kv_rows.start:hi - kv_rows.start].transpose(0, 1)

    def block_backward(q_rows, kk, vv, causal):
        return run.kernel.backward(dout[:, q_rows], q[:, q_rows], kk, vv, out[:, q_rows],
                                   lse[:, :, q_rows], causal, run.scale)

    for blk in _diagonal(run, r, s):
        dq_b, dk_b, dv_b = block_backward(blk.q_rows, k[:, blk.kv_rows], v[:, blk.kv_rows], blk.causal)
        accumulate_(dq[:, blk.q_rows], dq_b)
        add_dkv(slice(r, r + 1), blk.kv_rows, dk_b, dv_b)
    wait(work)
    dkv = torch.empty((pieces, 2, b, half, hk, d), dtype=acc, device=q.device)
    posted = []
    for q_rows, ranks, kv_rows, name in _calls(run, r, n, s):
        if ranks.stop > ranks.start:
            keys = _keys(gathered, ranks, kv_rows)
            dq_b, dk_b, dv_b = block_backward(q_rows, keys[0], keys[1], False)
            accumulate_(dq[:, q_rows], dq_b)
            add_dkv(ranks, kv_rows, dk_b, dv_b)
        if name == "late" and pieces == 2:
            # second halves are final now (earlier-rank calls touch first halves only)
            posted.append(comm.reduce_scatter(dkv[1], dkv_all[1]))
    for p in range(pieces if not posted else pieces - 1):
        posted.append(comm.reduce_scatter(dkv[p], dkv_all[p]))
    wait_all(posted)
    dk = dkv[:, 0].transpose(0, 1).reshape(b, s, hk, d)
    dv = dkv[:, 1].transpose(0, 1).reshape(b, s, hk, d)
    return dq, dk, dv
