"""The paired schedule (ringX2, causal): contiguous layout, balanced by pairing ranks.

Rank r holds tokens [r*S/N, (r+1)*S/N). Of the N(N+1)/2 causal blocks (q_i, kv_j), j <= i, rank r
computes its diagonal block and then, at steps d = 1 .. N//2, one block of distance d or N-d::

    step d: rank r sends to r+d (mod N) and receives from r-d (mod N)
      r-d >= 0: it receives kv_{r-d} and computes (q_r, kv_{r-d})          (distance d)
      r-d <  0: it receives q_{r-d+N} and computes (q_{r-d+N}, kv_r)        (distance N-d),
                returning the partial (out, lse) forward, the partial dq backward
    for even N the last step, d = N/2, pairs r and r+N/2 (mod N) over one block, split by query
    rows: the upper rank computes the first half with the kv it receives, the lower rank the
    second half with the queries it receives.

So every rank computes N/2 blocks (the diagonal counting half): the load is balanced without
changing the layout. The backward exchanges the same pairs (kv one way, q/dout/out/lse the other)
and returns partial dk/dv or dq to their owners. Messages are point-to-point; step d+1's exchange
is posted before step d's block, and step d's returned partial is merged after step d+1's block.
Partial outputs, lse and gradients are accumulated in float32 at their owners. Under a mask a
step whose blocks have no visible pair sends nothing. For full attention ringX.algorithms picks
the broadcast schedules instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..api import RunContext
from ..comm import wait_all
from ..merge import acc_copy, accumulate_, add_block_, merge_


@dataclass(frozen=True)
class _Step:
    """Step d of rank r: peers, what travels, and which of its query rows stay or travel."""
    dst: int            # this rank sends to dst ...
    src: int            # ... and receives from src
    send_kv: bool       # True: sends its kv; False: sends its q (rows ``sent``)
    recv_kv: bool       # True: receives src's kv; False: receives src's q (rows ``sent`` of src)
    kept: slice         # this rank's query rows it computes itself with a received kv
    sent: slice         # this rank's query rows that travel when it sends q


def _steps(r: int, n: int, s: int) -> list[_Step]:
    half = s // 2
    steps = []
    for d in range(1, n // 2 + 1):
        split = 2 * d == n                         # the shared block of an even N
        steps.append(_Step(dst=(r + d) % n, src=(r - d) % n, send_kv=r + d < n, recv_kv=r - d >= 0,
                           kept=slice(0, half) if split else slice(0, s),
                           sent=slice(half, s) if split else slice(0, s)))
    return steps


def _rows(sl: slice) -> int:
    return sl.stop - sl.start


def _shift(rows: slice, inner: slice) -> slice:
    """Rows ``inner`` of the sub-range ``rows``, as rows of the whole."""
    return slice(rows.start + inner.start, rows.start + inner.stop)


@dataclass(frozen=True)
class _Need:
    """The blocks of one step of rank r, from the mask (every rank derives the same; an empty
    block means no message): ``mine`` this rank's kept rows against src's kv (recv_kv), or src's
    sent rows against this rank's kv; ``theirs`` dst's kept rows against this rank's kv
    (send_kv), or this rank's sent rows against dst's kv."""
    mine: list
    theirs: list


def _needs(run: RunContext, st: _Step, r: int, s: int) -> _Need:
    mine = (run.blocks(r, st.src, s, q_rows=st.kept) if st.recv_kv
            else run.blocks(st.src, r, s, q_rows=st.sent))
    theirs = (run.blocks(st.dst, r, s, q_rows=st.kept) if st.send_kv
              else run.blocks(r, st.dst, s, q_rows=st.sent))
    return _Need(mine, theirs)


def paired_forward(run: RunContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q: (b, s, h, d), k/v: (b, s, hk, d) -> (out (b, s, h, d), lse (b, h, s)) in acc dtype."""
    comm, acc = run.comm, run.acc_dtype
    n, r, s = comm.size, comm.rank, q.shape[1]
    b, _, h, d = q.shape
    kv = torch.stack([k, v])                                          # (2, b, s, hk, d)
    steps = _steps(r, n, s)
    needs = [_needs(run, st, r, s) for st in steps]

    def post(i: int):
        st, need = steps[i], needs[i]
        send = recv = None
        if need.theirs:
            send = kv if st.send_kv else q[:, st.sent].contiguous()
        if need.mine:
            recv = torch.empty_like(kv) if st.recv_kv else q.new_empty((b, _rows(st.sent), h, d))
        works = comm.exchange([(send, st.dst)] if send is not None else [],
                              [(recv, st.src)] if recv is not None else [])
        return works, recv, send

    posted = post(0)
    o, l = run.block_forward(run.blocks(r, r, s)[0], q, k, v)        # the diagonal block
    out = acc_copy(o, acc)
    lse = l.to(acc).contiguous()
    back = None                                     # the previous step's returned partial
    for i, st in enumerate(steps):
        need = needs[i]
        works, recv, sent = posted
        posted = post(i + 1) if i + 1 < len(steps) else None
        wait_all(works)
        del sent                                    # the sent tensors lived until here
        sends, recvs = [], []
        for blk in need.mine:
            if st.recv_kv:                          # this rank's kept rows, src's keys
                o, l = run.block_forward(blk, q[:, st.kept], recv[0], recv[1])
                rows = _shift(st.kept, blk.q_rows)
                merge_(out[:, rows], lse[:, :, rows], o, l)
            else:                                   # src's queries against this rank's keys
                o, l = run.rows_forward(blk, recv, k, v)
                sends = [(o.to(q.dtype).contiguous(), st.src), (l.to(acc).contiguous(), st.src)]
        if not st.send_kv and need.theirs:          # dst returns the partial of this rank's queries
            got = (q.new_empty((b, _rows(st.sent), h, d)),
                   torch.empty((b, h, _rows(st.sent)), dtype=acc, device=q.device))
            recvs = [(got[0], st.dst), (got[1], st.dst)]
        works = comm.exchange(sends, recvs)         # sends are waited for too, and kept till then
        if back is not None:
            _merge_back(out, lse, *back)
        back = (works, recvs, st.sent, sends)
    _merge_back(out, lse, *back)
    return out, lse


def _merge_back(out, lse, works, recvs, rows: slice, _sends) -> None:
    wait_all(works)
    if recvs:
        merge_(out[:, rows], lse[:, :, rows], recvs[0][0], recvs[1][0])


def paired_backward(run: RunContext, dout, q, k, v, out, lse):
    """Gradients (dq, dk, dv) in acc dtype; dout/q/out: (b, s, h, d), k/v: (b, s, hk, d),
    lse: (b, h, s)."""
    comm, acc = run.comm, run.acc_dtype
    n, r, s = comm.size, comm.rank, q.shape[1]
    b, _, h, d = q.shape
    hk = k.shape[2]
    kv = torch.stack([k, v])
    steps = _steps(r, n, s)
    needs = [_needs(run, st, r, s) for st in steps]
    whole = slice(0, s)

    def post(i: int):
        st, need = steps[i], needs[i]
        send, recv = [], []
        if need.theirs:
            if st.send_kv:
                send = [kv]
            else:
                rows = st.sent
                send = [torch.stack([q[:, rows], dout[:, rows], out[:, rows]]),
                        lse[:, :, rows].contiguous()]
        if need.mine:
            if st.recv_kv:
                recv = [torch.empty_like(kv)]
            else:
                m = _rows(st.sent)
                recv = [q.new_empty((3, b, m, h, d)),
                        torch.empty((b, h, m), dtype=lse.dtype, device=q.device)]
        return comm.exchange([(t, st.dst) for t in send], [(t, st.src) for t in recv]), recv, send

    posted = post(0)
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dkv = torch.empty(kv.shape, dtype=acc, device=q.device)
    diag = run.blocks(r, r, s)[0]
    dq_b, dk_b, dv_b = run.block_backward(diag, dout, q, k, v, out, lse)
    add_block_(dq, whole, dq_b, True)
    add_block_(dkv[0], whole, dk_b, True)
    add_block_(dkv[1], whole, dv_b, True)
    back = None
    for i, st in enumerate(steps):
        need = needs[i]
        works, recv, sent = posted
        posted = post(i + 1) if i + 1 < len(steps) else None
        wait_all(works)
        del sent                                    # the sent tensors lived until here
        sends = []
        for blk in need.mine:
            if st.recv_kv:                          # this rank's queries, src's keys: dkv goes back
                rows = st.kept
                dq_b, dk_b, dv_b = run.block_backward(blk, dout[:, rows], q[:, rows], recv[0][0],
                                                      recv[0][1], out[:, rows], lse[:, :, rows])
                accumulate_(dq[:, _shift(rows, blk.q_rows)], dq_b)
                sends = [(torch.stack([dk_b, dv_b]).to(q.dtype), st.src)]
            else:                                   # src's queries, this rank's keys: dq goes back
                qp, lse_p = recv
                dq_b, dk_b, dv_b = run.block_backward(blk, qp[1], qp[0], k, v, qp[2], lse_p)
                accumulate_(dkv[0][:, blk.kv_rows], dk_b)
                accumulate_(dkv[1][:, blk.kv_rows], dv_b)
                sends = [(dq_b.to(q.dtype).contiguous(), st.src)]
        got, rows = [], None
        for blk in need.theirs:
            if st.send_kv:                          # dst returns its partial dk/dv of these keys
                got, rows = [torch.empty((2, b, _rows(blk.kv_rows), hk, d), dtype=q.dtype,
                                         device=q.device)], ("kv", blk.kv_rows)
            else:                                   # dst returns the partial dq of the sent rows
                got, rows = [q.new_empty((b, _rows(blk.q_rows), h, d))], ("q", _shift(st.sent, blk.q_rows))
        works = comm.exchange(sends, [(t, st.dst) for t in got])
        if back is not None:
            _add_back(dq, dkv, *back)
        back = (works, got, rows, sends)            # sends kept until their works are waited
    _add_back(dq, dkv, *back)
    return dq, dkv[0], dkv[1]


def _add_back(dq, dkv, works, got, rows, _sends) -> None:
    wait_all(works)
    if not got:
        return
    kind, sl = rows
    if kind == "kv":
        accumulate_(dkv[0][:, sl], got[0][0])
        accumulate_(dkv[1][:, sl], got[0][1])
    else:
        accumulate_(dq[:, sl], got[0])
