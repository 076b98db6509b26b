"""Stable log-sum-exp merge of partial attention results.

A partial result over a subset of keys is (out_blk, lse_blk) with
out_blk = softmax-weighted values over that subset and lse_blk = log(sum(exp(scores))).
Merging two partials a and b:

    lse = logaddexp(lse_a, lse_b)
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

``torch.logaddexp`` computes max + log1p(exp(-|a - b|)), which never overflows. Rows that have
seen no keys yet carry lse = -inf and get weight 0, so they stay exactly 0, never NaN.
"""
from __future__ import annotations

import torch

from . import fused


def merge_(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor,
           lse_blk: torch.Tensor) -> None:
    """Merge a partial block into the accumulators, in place.

    out_acc: (batch, rows, heads, headdim) float32 (or float64), possibly a row-slice view.
    lse_acc: (batch, heads, rows) same dtype as out_acc, possibly a view.
    out_blk: (batch, rows, heads, headdim) any float dtype.
    lse_blk: (batch, heads, rows) float32.

    On GPUs with float32 accumulators this runs as one fused kernel (ringX.fused).
    """
    if out_acc.dtype == torch.float32 and fused.usable(out_acc, out_blk):
        fused.merge(out_acc, lse_acc, out_blk, lse_blk)
    else:
        merge_formula_(out_acc, lse_acc, out_blk, lse_blk)


def merge_formula_(out_acc, lse_acc, out_blk, lse_blk) -> None:
    """merge_ in plain PyTorch operations (any device and dtype); the fused kernel's reference."""
    lse_blk = lse_blk.to(lse_acc.dtype)
    new_lse = torch.logaddexp(lse_acc, lse_blk)
    empty = new_lse == float("-inf")
    safe = torch.where(empty, torch.zeros_like(new_lse), new_lse)
    w_acc = torch.where(empty, torch.zeros_like(new_lse), torch.exp(lse_acc - safe))
    w_blk = torch.where(empty, torch.zeros_like(new_lse), torch.exp(lse_blk - safe))
    # (batch, heads, rows) -> (batch, rows, heads, 1) to scale (batch, rows, heads, headdim)
    out_acc.mul_(w_acc.transpose(1, 2).unsqueeze(-1))
    out_acc.addcmul_(out_blk, w_blk.transpose(1, 2).unsqueeze(-1))
    lse_acc.copy_(new_lse)


def weigh_(ow: torch.Tensor, w: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor,
           m: torch.Tensor) -> None:
    """The reduce message of the broadcast-q schedule (ringX1/ringX2), in place.

    ow: (batch, rows, heads, headdim) float32 (or float64) <- out_blk * w and w: (batch, rows,
    heads) same dtype <- exp(lse_blk - m); out_blk: (batch, rows, heads, headdim) any float
    dtype; lse_blk and m: (batch, heads, rows), m the maximum of lse over the ranks. Summing
    (ow, w) over the ranks gives sum(o w) and sum(w), whose ratio is the merged output. ow and w
    are usually two views of one flat buffer, reduced as one message. One fused kernel on GPUs.
    """
    if ow.dtype == torch.float32 and fused.usable(ow, out_blk):
        fused.weigh(ow, w, out_blk, lse_blk, m)
    else:
        weigh_formula_(ow, w, out_blk, lse_blk, m)


def weigh_formula_(ow, w, out_blk, lse_blk, m) -> None:
    """weigh_ in plain PyTorch operations; the fused kernel's reference."""
    torch.exp(lse_blk.to(ow.dtype) - m, out=w.transpose(1, 2))           # (batch, rows, heads)
    torch.mul(out_blk, w.unsqueeze(-1), out=ow)


def accumulate_(dst: torch.Tensor, src: torch.Tensor, first: bool = False) -> None:
    """dst += src (dst = src if ``first``) for a block's gradient or output: dst (batch, rows,
    heads, headdim) float32 or float64 (a row-slice view allowed), src the same shape in any float
    dtype. One fused kernel on GPUs for float32 accumulators, reading src in any strides;
    PyTorch's add or copy elsewhere (the same float32 values)."""
    if dst.dtype == torch.float32 and fused.usable(dst, src):
        fused.accumulate(dst, src, add=not first)
    elif first:
        dst.copy_(src)
    else:
        dst.add_(src)


def acc_copy(src: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """A new ``acc_dtype`` tensor holding ``src`` (batch, rows, heads, headdim), written by
    accumulate_ (on GPUs the fused cast, which reads src in any strides)."""
    dst = torch.empty(src.shape, dtype=acc_dtype, device=src.device)
    accumulate_(dst, src, first=True)
    return dst


def add_block_(dst: torch.Tensor, rows: slice, src: torch.Tensor, fresh: bool) -> bool:
    """dst[:, rows] += src, where ``fresh`` says dst holds nothing yet: then a block that covers
    every row is written (no zero fill, no read of dst) and a partial one is added to zeros.
    dst (batch, seqlen, heads, headdim) float32/64, src (batch, len(rows), heads, headdim).
    Returns the new ``fresh`` (False). A buffer still fresh after its last block is all zeros."""
    covers = rows.indices(dst.shape[1]) == (0, dst.shape[1], 1)
    if fresh and not covers:
        dst.zero_()
    accumulate_(dst[:, rows], src, first=fresh and covers)
    return False


def new_accumulators(q: torch.Tensor, acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty accumulators for queries q (batch, seqlen, heads, headdim):
    out (batch, seqlen, heads, headdim) zeros and lse (batch, heads, seqlen) = -inf."""
    b, s, h, _ = q.shape
    out = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    lse = torch.full((b, h, s), float("-inf"), dtype=acc_dtype, device=q.device)
    return out, lse
