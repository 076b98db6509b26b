"""Per-block mask plans: which query rows of a block attend which keys, lowered to kernel calls.

A block is "the local queries at global positions ``q_runs`` attend the keys at ``k_runs``". A
run is an affine sequence of global positions ``start + step * t`` for t in [0, count): the
contiguous and zigzag layouts have step 1 (one or two runs per rank), the stripe layout step N.
The block's q rows are the q runs concatenated in order, its keys the k runs concatenated.

The mask (``Mask``) is given in global positions, with flash-attn's meaning: key j is visible to
query i iff j is in i's document, j <= i when causal, and i - left <= j <= i + right (a negative
side is unbounded). Causal is the window's right side 0.

Between one q run and one k run of the same step, within one document, visibility is a band in
local indices: key b is visible to row a iff lo <= b - a <= hi. The planner trims each such piece
to the rows and keys that see anything, skips it when empty, and lowers it to elementary calls:

- ``FULL``   every row sees every key of the piece (any kernel);
- ``CAUSAL`` a square piece, row t sees keys 0..t (top-left = bottom-right on a square);
- ``BAND``   flash-attn's bottom-right window (left, right), both >= 0 after the trim, split
             where flash-attn's clamp (right >= keys widens to unbounded) would change it.

For kernels without windows (cuDNN, PyTorch's CPU flash kernel without a mask) a band with no
left bound becomes at most three calls: FULL keys every row sees, one CAUSAL square, and FULL
rows below it; any other band goes to a window-capable kernel. Square pieces of one block that
tile a contiguous range with the same band (the documents of a diagonal block) are packed into
one ``VARLEN`` group for kernels that take cu_seqlens.

Every call covers disjoint (row, key) pairs; calls are merged by log-sum-exp into the block's
result (ringX.merge), and a row no call covers has lse = -inf in that block.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import lru_cache

FULL, CAUSAL, BAND, VARLEN = "full", "causal", "band", "varlen"


@dataclass(frozen=True)
class Run:
    """Global positions start, start + step, ..., start + step * (count - 1)."""

    start: int
    step: int
    count: int

    def position(self, t: int) -> int:
        return self.start + self.step * t

    def rows(self, lo: int, hi: int) -> "Run":
        """The sub-run of local indices [lo, hi)."""
        return Run(self.start + self.step * lo, self.step, hi - lo)


@dataclass(frozen=True)
class Mask:
    """A global attention mask. window: (left, right) with -1 = unbounded; docs: the global
    cu_seqlens as host ints (0, ..., S), or None for one document."""

    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    docs: tuple[int, ...] | None = None

    @property
    def left(self) -> int | None:
        return self.window[0] if self.window[0] >= 0 else None

    @property
    def right(self) -> int | None:
        if self.causal:
            return 0 if self.window[1] < 0 else min(self.window[1], 0)
        return self.window[1] if self.window[1] >= 0 else None

    @property
    def plain(self) -> bool:
        """Full or plain causal over one document: the schedules' own block plans serve it."""
        return self.docs is None and self.left is None and self.right == (0 if self.causal else None)

    def visible(self, i: int, j: int) -> bool:
        """Whether key position j is visible to query position i (the definition, for tests)."""
        if self.docs is not None and bisect_right(self.docs, i) != bisect_right(self.docs, j):
            return False
        if self.left is not None and j < i - self.left:
            return False
        return self.right is None or j <= i + self.right


@dataclass(frozen=True)
class Call:
    """One kernel call over rows [r0, r1) and keys [k0, k1) of the block (local indices).

    kind FULL, CAUSAL (square, top-left), BAND (flash-attn bottom-right window (left, right),
    -1 = unbounded) or VARLEN: ``pieces`` are square (r0, r1) ranges tiling [r0, r1) = [k0, k1)
    each attended with band (left, right) (causal when right == 0 and left == -1)."""

    kind: str
    r0: int
    r1: int
    k0: int
    k1: int
    left: int = -1
    right: int = -1
    pieces: tuple[tuple[int, int], ...] = ()

    @property
    def rows(self) -> slice:
        return slice(self.r0, self.r1)

    @property
    def keys(self) -> slice:
        return slice(self.k0, self.k1)


@dataclass(frozen=True)
class Block:
    """One block of a schedule's work: ``q[:, q_rows]`` attends ``kv[:, kv_rows]``, as ONE plain
    kernel call (square-causal if ``causal``) when ``calls`` is None, else as the planner's
    ``calls``, in rows and keys relative to q_rows.start and kv_rows.start (ringX.execute)."""

    q_rows: slice
    kv_rows: slice
    causal: bool
    calls: tuple | None = None


@dataclass(frozen=True)
class BlockPlan:
    """The calls of one block, in local rows/keys of the block's q and k tensors; ``pairs`` is the
    number of visible (row, key) pairs (for FLOP counts)."""

    calls: tuple[Call, ...]
    pairs: int

    @property
    def rows(self) -> slice:
        """The rows any call touches (a bounding range)."""
        return slice(min(c.r0 for c in self.calls), max(c.r1 for c in self.calls))

    @property
    def keys(self) -> slice:
        return slice(min(c.k0 for c in self.calls), max(c.k1 for c in self.calls))


def _ceildiv(a: int, b: int) -> int:
    return -((-a) // b)


def _all_visible(m: int, n: int, lo, hi) -> bool:
    """Whether every row of an m x n piece sees every key under lo <= b - a <= hi."""
    return (lo is None or lo <= -(m - 1)) and (hi is None or hi >= n - 1)


def _band_pieces(m: int, n: int, lo, hi, r_off: int, k_off: int, out: list) -> None:
    """Trim rows [0, m) x keys [0, n) with visibility lo <= b - a <= hi (None = unbounded) and
    append the piece (r0, r1, k0, k1, lo', hi') in block coordinates, band relative to it."""
    # rows that see a key: exists b in [0, n) with a + lo <= b <= a + hi
    a0 = 0 if hi is None else max(0, -hi)
    a1 = m if lo is None else min(m, n - lo)
    if a0 >= a1 or (lo is not None and hi is not None and lo > hi):
        return
    # keys seen by some row in [a0, a1)
    b0 = 0 if lo is None else max(0, a0 + lo)
    b1 = n if hi is None else min(n, a1 - 1 + hi + 1)
    if b0 >= b1:
        return
    shift = b0 - a0
    lo2 = None if lo is None else lo - shift
    hi2 = None if hi is None else hi - shift
    out.append((r_off + a0, r_off + a1, k_off + b0, k_off + b1, lo2, hi2))


def _pieces(q_runs, k_runs, mask: Mask) -> list:
    """Trimmed band pieces (r0, r1, k0, k1, lo, hi) of the block, one per (q run, k run,
    document) with any visible pair."""
    out = []
    r_off = 0
    for qr in q_runs:
        k_off = 0
        for kr in k_runs:
            if qr.count and kr.count:
                if qr.step != kr.step:
                    raise ValueError("a block's q and k runs must share their step")
                _run_pair(qr, kr, mask, r_off, k_off, out)
            k_off += kr.count
        r_off += qr.count
    return out


def _run_pair(qr: Run, kr: Run, mask: Mask, r_off: int, k_off: int, out: list) -> None:
    step = qr.step
    q_first, q_last = qr.start, qr.position(qr.count - 1)
    k_first, k_last = kr.start, kr.position(kr.count - 1)
    left, right = mask.left, mask.right
    # band in local indices: b - a >= ceil((q0 - k0 - left) / step), <= floor((q0 - k0 + right) / step)
    d = qr.start - kr.start
    if mask.docs is None:
        spans = [(None, None)]
    else:
        docs = mask.docs                # the documents holding both a query and a key of the pair
        first = bisect_right(docs, max(q_first, k_first)) - 1
        last = bisect_right(docs, min(q_last, k_last)) - 1
        spans = [(docs[i], docs[i + 1]) for i in range(first, last + 1)]
    for c0, c1 in spans:
        if c0 is None:
            ra, rb, ka, kb = 0, qr.count, 0, kr.count
        else:
            ra = max(0, _ceildiv(c0 - qr.start, step))
            rb = min(qr.count, _ceildiv(c1 - qr.start, step))
            ka = max(0, _ceildiv(c0 - kr.start, step))
            kb = min(kr.count, _ceildiv(c1 - kr.start, step))
            if ra >= rb or ka >= kb:
                continue
        lo = None if left is None else _ceildiv(d - left, step)
        hi = None if right is None else (d + right) // step
        # local piece coordinates: b' - a' = (b - a) - (ka - ra)
        shift = ka - ra
        _band_pieces(rb - ra, kb - ka, None if lo is None else lo - shift,
                     None if hi is None else hi - shift, r_off + ra, k_off + ka, out)


def _pairs(m: int, n: int, lo, hi) -> int:
    """Visible pairs of an m x n piece with band lo <= b - a <= hi (None = unbounded)."""
    if _all_visible(m, n, lo, hi):
        return m * n
    import torch
    a = torch.arange(m, dtype=torch.int64)
    b0 = torch.zeros_like(a) if lo is None else (a + lo).clamp(min=0)
    b1 = torch.full_like(a, n - 1) if hi is None else (a + hi).clamp(max=n - 1)
    return int((b1 - b0 + 1).clamp(min=0).sum())


def _lower(piece, band_ok: bool) -> list[Call]:
    """Elementary calls of one trimmed piece (block coordinates)."""
    r0, r1, k0, k1, lo, hi = piece
    m, n = r1 - r0, k1 - k0
    if _all_visible(m, n, lo, hi):
        return [Call(FULL, r0, r1, k0, k1)]
    if m == n and hi == 0 and (lo is None or lo <= -(m - 1)):
        return [Call(CAUSAL, r0, r1, k0, k1)]
    if band_ok or lo is not None:
        return _fa_band(r0, r1, k0, k1, lo, hi)
    # no left bound: keys [0, hi + 1) seen by every row, a square causal part, rows below it
    calls = []
    c1 = min(n, hi + 1)
    if c1 > 0:
        calls.append(Call(FULL, r0, r1, k0, k0 + c1))
    if c1 < n:
        rs, re = c1 - hi, n - hi                     # rows that see keys [c1, n) first
        calls.append(Call(CAUSAL, r0 + rs, r0 + re, k0 + c1, k1))
        if re < m:
            calls.append(Call(FULL, r0 + re, r1, k0 + c1, k1))
    return calls


def _fa_band(r0, r1, k0, k1, lo, hi) -> list[Call]:
    """flash-attn bottom-right window calls for the band lo <= b - a <= hi of a trimmed piece.

    flash-attn (2.x, PyTorch's copy) clamps a window side >= seqlen_k to -1 and then, when one
    side is bounded and the other is -1, sets the -1 side to seqlen_k. A left side past the keys
    is harmless either way; on the right, ``seqlen_k`` is not "unbounded" when rows > keys + 1
    (row a then sees up to a + 2 * keys - rows). So a right side that is inactive is passed as
    rows - 1 where that is < keys, and a band it cannot express is split by rows: rows that see
    every key become a FULL call, the rest (fewer rows than keys) a window call."""
    m, n = r1 - r0, k1 - k0
    left = -1 if lo is None else (n - m) - lo
    right = -1 if hi is None else hi - (n - m)
    if 0 <= right < n:
        return [Call(BAND, r0, r1, k0, k1, left, right)]
    right_active = hi is not None and right < m - 1          # some row does not see the last key
    left_bounded = 0 <= left < n
    if not right_active:
        if m <= n:
            return [Call(BAND, r0, r1, k0, k1, left, m - 1)]
        if not left_bounded:
            return [Call(FULL, r0, r1, k0, k1)]
        if m == n + 1:
            return [Call(BAND, r0, r1, k0, k1, left, -1)]     # -1 -> keys: a + 2n - m = a + n - 1
        cut = -lo + 1                                         # rows a <= -lo see key 0: all keys
        return [Call(FULL, r0, r0 + cut, k0, k1)] + _replan(r0 + cut, r1, k0, k1, lo + cut,
                                                            None if hi is None else hi + cut)
    cut = m - 1 - right                                       # rows from here see the last key
    return _replan(r0, r0 + cut, k0, k1, lo, hi) + _replan(r0 + cut, r1, k0, k1,
                                                           None if lo is None else lo + cut, hi + cut)


def _replan(r0, r1, k0, k1, lo, hi) -> list[Call]:
    """Trim rows [r0, r1) x keys [k0, k1) with band (lo, hi) relative to (r0, k0) and lower it."""
    sub: list = []
    _band_pieces(r1 - r0, k1 - k0, lo, hi, r0, k0, sub)
    out = []
    for p in sub:
        a0, a1, b0, b1, lo2, hi2 = p
        if _all_visible(a1 - a0, b1 - b0, lo2, hi2):
            out.append(Call(FULL, a0, a1, b0, b1))
        else:
            out += _fa_band(a0, a1, b0, b1, lo2, hi2)
    return out


def _coalesce(calls: list[Call]) -> list[Call]:
    """Merge FULL calls over the same rows with adjacent keys (e.g. the keys of several ranks
    concatenated), then over the same keys with adjacent rows."""
    by_keys = _join_full(calls, lambda c: (c.r0, c.r1, c.k0),
                         lambda p, c: (p.r0, p.r1) == (c.r0, c.r1) and p.k1 == c.k0,
                         lambda p, c: Call(FULL, p.r0, p.r1, p.k0, c.k1))
    return _join_full(by_keys, lambda c: (c.k0, c.k1, c.r0),
                      lambda p, c: (p.k0, p.k1) == (c.k0, c.k1) and p.r1 == c.r0,
                      lambda p, c: Call(FULL, p.r0, c.r1, p.k0, p.k1))


def _join_full(calls: list[Call], order, adjacent, join) -> list[Call]:
    """One pass of _coalesce: FULL calls sorted by ``order``, each joined to the one before it
    when ``adjacent``."""
    out: list[Call] = []
    for c in sorted(calls, key=lambda c: (c.kind != FULL,) + order(c)):
        p = out[-1] if out else None
        if p is not None and c.kind == FULL and p.kind == FULL and adjacent(p, c):
            out[-1] = join(p, c)
        else:
            out.append(c)
    return out


def _pack_varlen(calls: list[Call], min_pieces: int) -> list[Call]:
    """Pack square CAUSAL/BAND/FULL pieces on the block's diagonal (rows == keys) that tile a
    contiguous range into VARLEN groups of one band each (at least ``min_pieces`` pieces)."""
    def band_of(c: Call):
        if c.r1 - c.r0 != c.k1 - c.k0 or c.r0 != c.k0:
            return None
        if c.kind == CAUSAL:
            return (-1, 0)
        if c.kind == BAND:
            return (c.left, c.right)
        return (-1, -1)                                     # FULL: a document seen whole
    squares = sorted((c for c in calls if band_of(c) is not None), key=lambda c: c.r0)
    rest = [c for c in calls if band_of(c) is None]
    groups: list[tuple[list[Call], tuple]] = []     # (pieces, band); a 1-token piece fits any band
    for c in squares:
        band = None if c.r1 - c.r0 == 1 else band_of(c)
        g = groups[-1] if groups else None
        if g and g[0][-1].r1 == c.r0 and (band is None or g[1] is None or band == g[1]):
            g[0].append(c)
            groups[-1] = (g[0], g[1] if g[1] is not None else band)
        else:
            groups.append(([c], band))
    out = rest
    for g, band in groups:
        if len(g) < min_pieces:
            out += g
            continue
        left, right = band if band is not None else (-1, -1)
        out.append(Call(VARLEN, g[0].r0, g[-1].r1, g[0].k0, g[-1].k1, left, right,
                        tuple((c.r0, c.r1) for c in g)))
    return out


@lru_cache(maxsize=4096)
def plan_block(q_runs: tuple[Run, ...], k_runs: tuple[Run, ...], mask: Mask, band_ok: bool,
               varlen_min: int = 0) -> BlockPlan | None:
    """The kernel calls of the block q_runs x k_runs under ``mask``, or None if no pair is
    visible. band_ok: the block's kernel takes flash-attn windows itself (else a band without a
    left bound is split into FULL/CAUSAL calls and other bands are marked for a window kernel);
    varlen_min: pack diagonal document pieces into VARLEN calls when at least this many
    (0 = never). Cached: the same blocks recur in every layer and step."""
    if _increasing_square(q_runs, k_runs, mask):
        n = sum(r.count for r in q_runs)
        return BlockPlan((Call(CAUSAL, 0, n, 0, n),), n * (n + 1) // 2)
    pieces = _pieces(q_runs, k_runs, mask)
    if not pieces:
        return None
    calls: list[Call] = []
    pairs = 0
    for p in pieces:
        r0, r1, k0, k1, lo, hi = p
        pairs += _pairs(r1 - r0, k1 - k0, lo, hi)
        calls += _lower(p, band_ok)
    calls = _coalesce(calls)
    if varlen_min:
        calls = _pack_varlen(calls, varlen_min)
    return BlockPlan(tuple(sorted(calls, key=lambda c: (c.r0, c.k0))), pairs)


def _increasing_square(q_runs, k_runs, mask: Mask) -> bool:
    """Plain causal attention of positions that increase along the block onto themselves (a
    zigzag rank's two chunks): key b is visible to row a iff b <= a, one square causal call."""
    if not (mask.causal and mask.docs is None and mask.left is None and q_runs == k_runs):
        return False
    last = None
    for r in q_runs:
        if r.count and (r.step <= 0 or (last is not None and r.start <= last)):
            return False
        last = r.position(r.count - 1) if r.count else last
    return True


@lru_cache(maxsize=4096)
def block_of(q_runs: tuple[Run, ...], k_runs: tuple[Run, ...], mask: Mask, band_ok: bool = False,
             varlen_min: int = 0) -> Block | None:
    """The Block of q_runs x k_runs (None when no pair is visible): its bounding rows and keys,
    and either one plain kernel call (a FULL or square-CAUSAL block of more than one row or key)
    or the planner's calls relative to the bounding box. Cached."""
    plan = plan_block(q_runs, k_runs, mask, band_ok, varlen_min)
    if plan is None:
        return None
    rows, keys = plan.rows, plan.keys
    if len(plan.calls) == 1 and plan.calls[0].kind in (FULL, CAUSAL) and (
            rows.stop - rows.start > 1 or keys.stop - keys.start > 1):
        return Block(rows, keys, plan.calls[0].kind == CAUSAL)
    calls = tuple(Call(c.kind, c.r0 - rows.start, c.r1 - rows.start, c.k0 - keys.start,
                       c.k1 - keys.start, c.left, c.right,
                       tuple((a - rows.start, b - rows.start) for a, b in c.pieces))
                  for c in plan.calls)
    return Block(rows, keys, False, calls)


def layout_runs(layout: str, rank: int, world_size: int, seqlen_local: int) -> tuple[Run, ...]:
    """The runs of global positions rank ``rank`` holds in ``layout`` (see ringX.layout)."""
    s, n = seqlen_local, world_size
    if layout == "contiguous":
        return (Run(rank * s, 1, s),)
    if layout == "zigzag":
        c = s // 2
        if n == 1:                                   # chunks 0 and 1 of one rank: one run
            return (Run(0, 1, s),)
        return (Run(rank * c, 1, c), Run((2 * n - 1 - rank) * c, 1, c))
    if layout == "stripe":
        return (Run(rank, n, s),)
    raise ValueError(f"unknown layout {layout!r}")


def restrict(runs: tuple[Run, ...], rows: slice) -> tuple[Run, ...]:
    """The runs of local rows [rows.start, rows.stop) of the concatenation of ``runs``."""
    out, off = [], 0
    for r in runs:
        lo, hi = max(rows.start, off), min(rows.stop, off + r.count)
        if lo < hi:
            out.append(r.rows(lo - off, hi - off))
        off += r.count
    return tuple(out)


def dense_mask(q_runs, k_runs, mask: Mask):
    """The block's mask as a (rows, keys) bool tensor, straight from the definition (tests)."""
    import torch
    qp = [r.position(t) for r in q_runs for t in range(r.count)]
    kp = [r.position(t) for r in k_runs for t in range(r.count)]
    return torch.tensor([[mask.visible(i, j) for j in kp] for i in qp], dtype=torch.bool).reshape(len(qp), len(kp))


def call_mask(call: Call, rows: int, keys: int, fa_clamp: bool = True, clamp_keys: int | None = None):
    """The (rows, keys) bool mask one call covers, by each kernel's semantics (tests): FULL,
    CAUSAL top-left on a square, BAND flash-attn's bottom-right window with its clamps, VARLEN
    its pieces each as a square band."""
    import torch
    out = torch.zeros(rows, keys, dtype=torch.bool)
    if call.kind == VARLEN:                 # flash-attn clamps against the longest piece
        longest = max(p1 - p0 for p0, p1 in call.pieces)
        for p0, p1 in call.pieces:
            sub = Call(BAND, p0, p1, p0, p1, call.left, call.right)
            out |= call_mask(sub, rows, keys, fa_clamp, clamp_keys=longest)
        return out
    m, n = call.r1 - call.r0, call.k1 - call.k0
    nk = n if clamp_keys is None else clamp_keys
    a = torch.arange(m).unsqueeze(1)
    b = torch.arange(n).unsqueeze(0)
    if call.kind == FULL:
        piece = torch.ones(m, n, dtype=torch.bool)
    elif call.kind == CAUSAL:
        piece = b <= a
    else:
        left, right = call.left, call.right
        if fa_clamp:                # flash-attn 2: clamp to -1, then a -1 side beside a bounded one
            left = -1 if left >= nk else left
            right = -1 if right >= nk else right
            if left < 0 <= right:
                left = nk
            elif right < 0 <= left:
                right = nk
        piece = torch.ones(m, n, dtype=torch.bool)
        if left >= 0:
            piece &= b >= a + (n - m) - left
        if right >= 0:
            piece &= b <= a + (n - m) + right
    out[call.r0:call.r1, call.k0:call.k1] |= piece
    return out
