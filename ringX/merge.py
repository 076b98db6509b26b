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


def merge_many_(out_acc: torch.Tensor | None, lse_acc: torch.Tensor, partials, first: bool,
                dst: torch.Tensor | None = None) -> None:
    """Merge several partials into the accumulators at once, in place: a pass over the float32
    accumulator per four partials instead of one per partial (a merge is memory-bound, so k
    partials cost about what one pairwise merge costs).

    out_acc (batch, rows, heads, headdim) float32/64, lse_acc (batch, heads, rows): as merge_;
    ``first``: they hold nothing yet (never read). partials: a non-empty sequence of (out_blk
    (batch, rows, heads, headdim), lse_blk (batch, heads, rows)). ``dst``: where the merged out
    goes (default out_acc), in any float dtype: a final pass writes the result in the inputs'
    dtype directly, rounded once (out_acc may then be None if ``first`` and at most four
    partials). One fused kernel per four partials on GPUs (ringX.fused.merge_many) when the
    partials share their strides; else pairwise merges in PyTorch operations.
    """
    partials = list(partials)
    if out_acc is None and not (first and dst is not None):
        raise ValueError("merge_many_: out_acc may be None only for a first merge into dst")
    dst = out_acc if dst is None else dst
    o0, l0 = partials[0]
    same = all(o.stride() == o0.stride() and l.stride() == l0.stride() for o, l in partials)
    acc_dtype = lse_acc.dtype
    if acc_dtype == torch.float32 and same and fused.usable(dst, *(o for o, _ in partials)) and \
            (out_acc is not None or len(partials) <= fused.MANY):
        chunks = [partials[i:i + fused.MANY] for i in range(0, len(partials), fused.MANY)]
        for i, chunk in enumerate(chunks):
            fused.merge_many(dst if i == len(chunks) - 1 else out_acc, out_acc, lse_acc,
                             [o for o, _ in chunk], [l for _, l in chunk], has_acc=not (first and i == 0))
        return
    acc = out_acc if out_acc is not None else torch.empty(dst.shape, dtype=acc_dtype, device=dst.device)
    merge_many_formula_(acc, lse_acc, partials, first)
    if dst is not acc:
        dst.copy_(acc)


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


def sum_many_(dst: torch.Tensor, srcs, acc: torch.Tensor | None = None) -> None:
    """dst <- (acc +) the sum of several blocks, summed in float32 (float64 for float64), one
    pass per four blocks on GPUs (ringX.fused.sum_many) when the blocks share their strides.
    dst (batch, rows, heads, headdim) in any float dtype (a final pass writes the inputs' dtype
    directly, rounded once); acc: None or a float32/64 buffer of dst's shape, which may be dst
    and holds an intermediate sum afterwards when more than four blocks come; srcs: a non-empty
    sequence of blocks of that shape in any float dtype."""
    srcs = list(srcs)
    same = all(x.stride() == srcs[0].stride() for x in srcs)
    wide = acc.dtype if acc is not None else (torch.float64 if dst.dtype == torch.float64 else torch.float32)
    if wide == torch.float32 and same and fused.usable(dst, *srcs):
        chunks = [srcs[i:i + fused.MANY] for i in range(0, len(srcs), fused.MANY)]
        buf = acc if acc is not None or len(chunks) == 1 else torch.empty(dst.shape, dtype=wide, device=dst.device)
        for i, chunk in enumerate(chunks):
            fused.sum_many(dst if i == len(chunks) - 1 else buf, chunk, acc=acc if i == 0 else buf)
        return
    if acc is dst:
        total = dst
    else:
        total = acc.to(wide, copy=True) if acc is not None else None
    for x in srcs:
        total = x.to(wide, copy=True) if total is None else total.add_(x)
    if total is not dst:
        dst.copy_(total)


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


class _Pending:
    """What PendingMerges and PendingSums share: blocks queued by row range (a slice of the s
    rows of a (b, s, h, d) result), handed ``group`` at a time to the subclass's ``_pass(key,
    parts)``, all at once when those held reach ``max_bytes``, the whole rows first."""

    def __init__(self, shape, device, acc_dtype: torch.dtype, group: int = fused.MANY,
                 max_bytes: int = 256 * 2**20):
        self.shape, self.device, self.acc_dtype = tuple(shape), device, acc_dtype
        self.group, self.max_bytes = group, max_bytes
        self.acc: torch.Tensor | None = None       # made by the first pass that keeps its result
        self.pending: dict[tuple[int, int], list] = {}
        self.held = 0                              # bytes of the blocks in ``pending``
        self.whole = (0, self.shape[1])

    def _queue(self, rows: slice, item, tensor: torch.Tensor) -> None:
        key = rows.indices(self.shape[1])[:2]
        parts = self.pending.setdefault(key, [])
        parts.append((item, tensor))
        self.held += tensor.numel() * tensor.element_size()
        if len(parts) > self.group:              # one more than a pass takes: pass the oldest
            self._pass(key, [it for it, _ in parts[:self.group]])
            self.held -= sum(t.numel() * t.element_size() for _, t in parts[:self.group])
            del parts[:self.group]
        elif self.held >= self.max_bytes:
            self._pass_pending()

    def _last_pass(self) -> list | None:
        """The items of a last pass that can write the result itself (all whole rows, at most
        ``group``), taken from the queue; else None."""
        if list(self.pending) == [self.whole] and len(self.pending[self.whole]) <= self.group:
            self.held = 0
            return [item for item, _ in self.pending.pop(self.whole)]
        return None

    def _pass_pending(self) -> None:
        for key in sorted(self.pending, key=lambda k: k != self.whole):    # the whole rows first
            self._pass(key, [item for item, _ in self.pending.pop(key)])
        self.held = 0

    def _pass(self, key: tuple[int, int], parts: list) -> None:
        raise NotImplementedError


class PendingMerges(_Pending):
    """The partials of one call's output, by row range, merged ``group`` at a time in one pass
    each (merge_many_): a memory-bound merge costs about the same for four partials as for one,
    so a schedule that merges N blocks per call makes about N/4 passes instead of N. A float32
    accumulator is made only when a pass must keep its result: when every partial covers all
    rows and at most ``group`` come, ``finish`` merges them straight into the output in the
    inputs' dtype (no float32 buffer, no cast pass).

    shape (b, s, h, d), device, acc_dtype: the output's. ``add(rows, o, l)`` queues a partial
    of rows ``rows`` (a slice of s): o (b, rows, h, d), l (b, h, rows); ``finish(dtype)`` ->
    (out (b, s, h, d) in dtype, lse (b, h, s) in acc_dtype); rows no partial reaches are 0 and
    -inf. Once the partials held reach ``max_bytes`` (256 MiB) they are merged: large blocks,
    where a merge costs little beside the kernel, merge as they come."""

    def __init__(self, shape, device, acc_dtype: torch.dtype, group: int = fused.MANY,
                 max_bytes: int = 256 * 2**20):
        super().__init__(shape, device, acc_dtype, group, max_bytes)
        b, s, h, _ = self.shape
        self.lse = torch.empty((b, h, s), dtype=acc_dtype, device=device)

    def add(self, rows: slice, o: torch.Tensor, l: torch.Tensor) -> None:
        self._queue(rows, (o, l), o)

    def finish(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        last = self._last_pass()
        if last is not None:
            out = torch.empty(self.shape, dtype=dtype, device=self.device)   # the last pass writes it
            merge_many_(self.acc, self.lse, last, first=self.acc is None, dst=out)
            return out, self.lse
        self._pass_pending()
        if self.acc is None:                      # nothing came
            self._fresh_acc(zero=True)
        return self.acc.to(dtype), self.lse

    def _fresh_acc(self, zero: bool) -> None:
        self.acc = torch.empty(self.shape, dtype=self.acc_dtype, device=self.device)
        if zero:
            self.acc.zero_()
            self.lse.fill_(float("-inf"))

    def _pass(self, key: tuple[int, int], parts: list) -> None:
        first = self.acc is None and key == self.whole
        if self.acc is None:
            self._fresh_acc(zero=not first)
        rows = slice(*key)
        merge_many_(self.acc[:, rows], self.lse[:, :, rows], parts, first=first)


class PendingSums(_Pending):
    """Blocks of row ranges to add up into one gradient, ``group`` at a time in one pass each
    (sum_many_), as PendingMerges does for outputs: with at most ``group`` blocks that cover all
    rows ``finish`` sums them straight into the gradient in the inputs' dtype, else a float32
    buffer holds the partial sums. shape (b, s, h, d); ``add(rows, block)``; ``finish(dtype)``
    -> the sum (b, s, h, d) in dtype (zeros where no block came). The blocks held never pass
    ``max_bytes`` (256 MiB) for long."""

    def add(self, rows: slice, block: torch.Tensor) -> None:
        self._queue(rows, block, block)

    def finish(self, dtype: torch.dtype) -> torch.Tensor:
        last = self._last_pass()
        if last is not None:
            out = torch.empty(self.shape, dtype=dtype, device=self.device)
            sum_many_(out, last, acc=self.acc)
            return out
        self._pass_pending()
        if self.acc is None:
            self.acc = torch.zeros(self.shape, dtype=self.acc_dtype, device=self.device)
        return self.acc.to(dtype)

    def _pass(self, key: tuple[int, int], parts: list) -> None:
        covers = key == self.whole
        fresh = self.acc is None
        if fresh:
            self.acc = (torch.empty if covers else torch.zeros)(self.shape, dtype=self.acc_dtype, device=self.device)
        view = self.acc[:, slice(*key)]
        sum_many_(view, parts, acc=None if fresh and covers else view)
