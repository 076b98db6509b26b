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



def merge_many_(out_acc: torch.Tensor, lse_acc: torch.Tensor, partials, first: bool) -> None:
    """Merge several partials into the accumulators at once, in place: a pass over the float32
    accumulator per four partials instead of one per partial (a merge is memory-bound, so k
    partials cost about what one pairwise merge costs).

    out_acc, lse_acc: as merge_; ``first``: they hold nothing yet (written, never read).
    partials: a sequence of (out_blk (batch, rows, heads, headdim), lse_blk (batch, heads, rows)).
    One fused kernel per four partials on GPUs (ringX.fused.merge_many) when the partials share
    their strides; else the pairwise merges (ringX.merge_, acc_copy's cast for a first one).
    """
    partials = list(partials)
    if not partials:
        if first:
            out_acc.zero_()
            lse_acc.fill_(float("-inf"))
        return
    o0, l0 = partials[0]
    same = all(o.stride() == o0.stride() and l.stride() == l0.stride() for o, l in partials)
    if out_acc.dtype == torch.float32 and same and fused.usable(out_acc, *(o for o, _ in partials)):
        for i in range(0, len(partials), fused.MANY):
            chunk = partials[i:i + fused.MANY]
            fused.merge_many(out_acc, lse_acc, [o for o, _ in chunk], [l for _, l in chunk],
                             has_acc=not (first and i == 0))
        return
    merge_many_formula_(out_acc, lse_acc, partials, first)


def merge_many_formula_(out_acc, lse_acc, partials, first: bool) -> None:
    """merge_many_ as pairwise merges in PyTorch operations (any device and dtype)."""
    start = 0
    if first:
        o0, l0 = partials[0]
        accumulate_(out_acc, o0, first=True)
        lse_acc.copy_(l0)
        start = 1
    for o, l in partials[start:]:
        merge_formula_(out_acc, lse_acc, o, l)


def sum_many_(dst: torch.Tensor, srcs, first: bool) -> None:
    """dst (+)= the sum of several blocks (dst = their sum if ``first``), in place: one pass over
    the float32 dst per four blocks on GPUs (ringX.fused.sum_many) when the blocks share their
    strides, else accumulate_ per block. dst (batch, rows, heads, headdim) float32 or float64,
    srcs of its shape in any float dtype; the sum runs in dst's dtype."""
    srcs = list(srcs)
    if not srcs:
        if first:
            dst.zero_()
        return
    same = all(x.stride() == srcs[0].stride() for x in srcs)
    if dst.dtype == torch.float32 and same and fused.usable(dst, *srcs):
        for i in range(0, len(srcs), fused.MANY):
            fused.sum_many(dst, srcs[i:i + fused.MANY], add=not (first and i == 0))
        return
    for i, x in enumerate(srcs):
        accumulate_(dst, x, first=first and i == 0)

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


class PendingMerges:
    """Partials of row ranges of one accumulator pair, kept until ``group`` of the same rows are
    there and then merged in one pass (merge_many_): a memory-bound merge costs about the same
    for four partials as for one, so a schedule that merges N blocks per call makes N/4 passes
    over its float32 accumulator instead of N, at the price of holding up to group - 1 partials.

    out (b, s, h, d) and lse (b, h, s): the accumulators; ``fresh``: they hold nothing yet (the
    first pass over every row writes them, as acc_copy does; rows no partial reaches end as 0
    and -inf). ``add(rows, o, l)`` queues the partial of rows ``rows`` (a slice of s);
    ``flush()`` merges what is left (call it before reading the accumulators). Once the partials
    held reach ``max_bytes`` (256 MiB) they are merged: large blocks, where a merge costs little
    beside the kernel, merge as they come."""

    def __init__(self, out: torch.Tensor, lse: torch.Tensor, fresh: bool = False, group: int = fused.MANY,
                 max_bytes: int = 256 * 2**20):
        self.out, self.lse, self.fresh, self.group, self.max_bytes = out, lse, fresh, group, max_bytes
        self.pending: dict[tuple[int, int], list] = {}

    def add(self, rows: slice, o: torch.Tensor, l: torch.Tensor) -> None:
        key = rows.indices(self.out.shape[1])[:2]
        parts = self.pending.setdefault(key, [])
        parts.append((o, l))
        if len(parts) >= self.group:
            self._merge(key)
        elif _held(o for parts in self.pending.values() for o, _ in parts) >= self.max_bytes:
            self._merge_pending()

    def flush(self) -> None:
        self._merge_pending()
        if self.fresh:
            self.out.zero_()
            self.lse.fill_(float("-inf"))
            self.fresh = False

    def _merge_pending(self) -> None:
        whole = (0, self.out.shape[1])
        if whole in self.pending:                 # the whole rows first: they can write
            self._merge(whole)
        for key in list(self.pending):
            self._merge(key)

    def _merge(self, key: tuple[int, int]) -> None:
        covers = key == (0, self.out.shape[1])
        if self.fresh and not covers:
            self.out.zero_()
            self.lse.fill_(float("-inf"))
        rows = slice(*key)
        merge_many_(self.out[:, rows], self.lse[:, :, rows], self.pending.pop(key), first=self.fresh and covers)
        self.fresh = False


class PendingSums:
    """Blocks of row ranges to add into one float32 buffer, kept until ``group`` of the same rows
    are there and then summed in one pass (sum_many_); the first pass over every row writes
    instead of adding, as add_block_ does. dst (b, s, h, d); ``flush()`` before reading dst, which
    is all zeros if nothing was added. The blocks held never pass ``max_bytes`` (256 MiB)."""

    def __init__(self, dst: torch.Tensor, group: int = fused.MANY, max_bytes: int = 256 * 2**20):
        self.dst, self.group, self.max_bytes, self.fresh = dst, group, max_bytes, True
        self.pending: dict[tuple[int, int], list] = {}

    def add(self, rows: slice, block: torch.Tensor) -> None:
        key = rows.indices(self.dst.shape[1])[:2]
        parts = self.pending.setdefault(key, [])
        parts.append(block)
        if len(parts) >= self.group:
            self._sum(key)
        elif _held(b for parts in self.pending.values() for b in parts) >= self.max_bytes:
            self._sum_pending()

    def _sum_pending(self) -> None:
        whole = (0, self.dst.shape[1])
        if whole in self.pending:                 # the whole rows first: they can write dst
            self._sum(whole)
        for key in list(self.pending):
            self._sum(key)

    def flush(self) -> None:
        self._sum_pending()
        if self.fresh:
            self.dst.zero_()
            self.fresh = False

    def _sum(self, key: tuple[int, int]) -> None:
        covers = key == (0, self.dst.shape[1])
        if self.fresh and not covers:
            self.dst.zero_()
        sum_many_(self.dst[:, slice(*key)], self.pending.pop(key), first=self.fresh and covers)
        self.fresh = False


def _held(tensors) -> int:
    """Bytes of the tensors (partials a Pending* holds)."""
    return sum(t.numel() * t.element_size() for t in tensors)
