"""Running one masked block: the planner's calls (ringX.plan) on the block's kernels, merged.

A masked block's calls cover disjoint (row, key) pairs of the block's q rows and keys. Forward,
each call gives (out, lse) for its rows, merged by log-sum-exp in the accumulation dtype; rows no
call covers keep out 0 and lse -inf. Backward, each call is given the merged out and lse of its
rows (the block's share of the global softmax), and its dq, dk, dv are added in the accumulation
dtype. FULL and CAUSAL calls run on the block's kernel, BAND and VARLEN calls on its window kernel.
"""
from __future__ import annotations

import torch

from .merge import add_block_, merge_, new_accumulators
from .plan import CAUSAL, FULL, VARLEN, Call


def _varlen_args(call: Call, device) -> tuple[torch.Tensor, int]:
    cu = [p0 - call.r0 for p0, _ in call.pieces] + [call.r1 - call.r0]
    longest = max(p1 - p0 for p0, p1 in call.pieces)
    return torch.tensor(cu, dtype=torch.int32, device=device), longest


def _window(kernel, call: Call, rows: int, keys: int) -> tuple[int, int] | None:
    """None when the block's kernel runs ``call`` (a FULL or CAUSAL call of a shape it takes),
    else the flash-attn window (left, right) the window kernel runs it with (-1 unbounded)."""
    if call.kind in (FULL, CAUSAL):
        if kernel.takes_shape(rows, keys):
            return None
        return -1, 0 if call.kind == CAUSAL else -1         # the window kernel takes any shape
    return call.left, call.right


def call_forward(kernel, band_kernel, call: Call, q, k, v, scale: float):
    """(out, lse) of one call; q (b, rows, h, d) and k/v (b, keys, hk, d) already cut to it."""
    window = _window(kernel, call, q.shape[1], k.shape[1])
    if window is None:
        return kernel.forward(q, k, v, call.kind == CAUSAL, scale)
    if call.kind == VARLEN:
        cu, longest = _varlen_args(call, q.device)
        return band_kernel.forward_varlen(q, k, v, cu, longest, *window, scale)
    return band_kernel.forward_band(q, k, v, *window, scale)


def call_backward(kernel, band_kernel, call: Call, dout, q, k, v, out, lse, scale: float):
    """(dq, dk, dv) of one call given its rows' merged out and lse."""
    window = _window(kernel, call, q.shape[1], k.shape[1])
    if window is None:
        return kernel.backward(dout, q, k, v, out, lse, call.kind == CAUSAL, scale)
    if call.kind == VARLEN:
        cu, longest = _varlen_args(call, q.device)
        return band_kernel.backward_varlen(dout, q, k, v, out, lse, cu, longest, *window, scale)
    return band_kernel.backward_band(dout, q, k, v, out, lse, *window, scale)


def calls_forward(run, calls: tuple[Call, ...], q, k, v):
    """q (b, sq, h, d), k/v (b, sk, hk, d): the block's rows and keys -> (out (b, sq, h, d),
    lse (b, h, sq)); out in the kernel's dtype when one call covers every row, else acc dtype."""
    sq = q.shape[1]
    if len(calls) == 1 and calls[0].r0 == 0 and calls[0].r1 == sq:
        c = calls[0]
        return call_forward(run.kernel, run.band_kernel, c, q, k[:, c.keys], v[:, c.keys], run.scale)
    out, lse = new_accumulators(q, run.acc_dtype)
    for c in calls:
        o, l = call_forward(run.kernel, run.band_kernel, c, q[:, c.rows], k[:, c.keys], v[:, c.keys],
                            run.scale)
        merge_(out[:, c.rows], lse[:, :, c.rows], o, l)
    return out, lse


def calls_backward(run, calls: tuple[Call, ...], dout, q, k, v, out, lse):
    """The block's (dq (b, sq, h, d), dk, dv (b, sk, hk, d)) given its rows' merged out/lse."""
    sq, sk = q.shape[1], k.shape[1]
    if len(calls) == 1 and (calls[0].r0, calls[0].r1, calls[0].k0, calls[0].k1) == (0, sq, 0, sk):
        return call_backward(run.kernel, run.band_kernel, calls[0], dout, q, k, v, out, lse, run.scale)
    acc = run.acc_dtype
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dk = torch.empty(k.shape, dtype=acc, device=q.device)
    dv = torch.empty(v.shape, dtype=acc, device=q.device)
    dq_fresh = dkv_fresh = True
    for c in calls:
        rs, ks = c.rows, c.keys
        g = call_backward(run.kernel, run.band_kernel, c, dout[:, rs], q[:, rs], k[:, ks], v[:, ks],
                          out[:, rs], lse[:, :, rs], run.scale)
        dq_fresh = add_block_(dq, rs, g[0], dq_fresh)
        add_block_(dk, ks, g[1], dkv_fresh)
        dkv_fresh = add_block_(dv, ks, g[2], dkv_fresh)
    for t, fresh in ((dq, dq_fresh), (dk, dkv_fresh), (dv, dkv_fresh)):
        if fresh:
            t.zero_()
    return dq, dk, dv
