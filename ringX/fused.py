"""Fused float32 elementwise steps of the schedules, as Triton kernels on GPUs.

Two steps run once per block and touch the whole float32 accumulator, so on short sequences
their plain PyTorch form (several strided passes each) costs as much as a large part of the
attention kernels themselves:

- ``merge``: the log-sum-exp merge of a partial (out_blk, lse_blk) into (out_acc, lse_acc)
  (ringX3, ringX4 and the apps' merges; formula in ringX.merge), one pass instead of about ten;
- ``weigh``: ringX1/ringX2's reduce message (o * w, w) with w = exp(lse_blk - m), one pass;
- ``accumulate``: a block's bf16/fp16 gradient added into a float32 accumulator (the mixed-dtype
  ``+=`` of PyTorch takes a slower, unvectorized path).

Programs walk the (batch, head, row) items with rows fastest, so the per-row lse loads are
contiguous; every item is one contiguous head-dim row of the 4-D tensors.

Each kernel reads and writes exactly the values of the PyTorch formula (float32 arithmetic;
-inf rows give weight 0, NaN propagates). ``usable`` says when a kernel takes the call: NVIDIA
CUDA tensors (ROCm runs the PyTorch formula: these kernels were not run there), float32 accumulators, last dim contiguous, Triton importable and ``RINGX_FUSED``
not set to 0. Otherwise the callers run the PyTorch formula, which is also the reference the
GPU tests compare against.
"""
from __future__ import annotations

import functools
import operator
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch formulas run instead
    triton = None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can take tensors like these (see the module docstring)."""
    if triton is None or torch.version.hip is not None or os.environ.get("RINGX_FUSED", "1") == "0":
        return False
    return all(t.is_cuda and t.stride(-1) == 1 for t in tensors if t.dim() == 4)


if triton is not None:

    @triton.jit
    def _tile(n, rows, heads, d, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's BLOCK_M (batch, head, row) items of n, rows fastest (64-bit offsets),
        and its BLOCK_D head-dim lanes: (live, b, s, h, lanes, mask)."""
        m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        live = m < n
        dd = tl.arange(0, BLOCK_D)
        mask = live[:, None] & (dd[None, :] < d)
        return live, m // (heads * rows), m % rows, (m // rows) % heads, dd, mask

    @triton.jit
    def _merge_kernel(acc, lacc, blk, lblk, n, rows, heads, d,
                      a_b, a_s, a_h, la_b, la_h, la_s, b_b, b_s, b_h, lb_b, lb_h, lb_s,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        live, bi, si, hi, dd, mask = _tile(n, rows, heads, d, BLOCK_M, BLOCK_D)
        la = tl.load(lacc + bi * la_b + hi * la_h + si * la_s, mask=live, other=0.0)
        lb = tl.load(lblk + bi * lb_b + hi * lb_h + si * lb_s, mask=live, other=0.0).to(tl.float32)
        mx = tl.where(la > lb, la, lb)
        empty = mx == float("-inf")
        safe = tl.where(empty, 0.0, mx)
        ea = tl.exp(la - safe)
        eb = tl.exp(lb - safe)
        total = ea + eb
        new = tl.where(empty, float("-inf"), safe + tl.log(total))
        wa = tl.where(empty, 0.0, ea / total)
        wb = tl.where(empty, 0.0, eb / total)
        pa = acc + (bi * a_b + si * a_s + hi * a_h)[:, None] + dd[None, :]
        pb = blk + (bi * b_b + si * b_s + hi * b_h)[:, None] + dd[None, :]
        xa = tl.load(pa, mask=mask, other=0.0)
        xb = tl.load(pb, mask=mask, other=0.0).to(tl.float32)
        tl.store(pa, xa * wa[:, None] + xb * wb[:, None], mask=mask)
        tl.store(lacc + bi * la_b + hi * la_h + si * la_s, new, mask=live)

    @triton.jit
    def _weigh_kernel(ow, wt, o, lblk, mx, n, rows, heads, d,
                      p_b, p_s, p_h, w_b, w_s, w_h, o_b, o_s, o_h, l_b, l_h, l_s, m_b, m_h, m_s,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        live, bi, si, hi, dd, mask = _tile(n, rows, heads, d, BLOCK_M, BLOCK_D)
        lb = tl.load(lblk + bi * l_b + hi * l_h + si * l_s, mask=live, other=0.0).to(tl.float32)
        mm = tl.load(mx + bi * m_b + hi * m_h + si * m_s, mask=live, other=0.0)
        w = tl.exp(lb - mm)
        x = tl.load(o + (bi * o_b + si * o_s + hi * o_h)[:, None] + dd[None, :], mask=mask, other=0.0)
        tl.store(ow + (bi * p_b + si * p_s + hi * p_h)[:, None] + dd[None, :], x.to(tl.float32) * w[:, None],
                 mask=mask)
        tl.store(wt + bi * w_b + si * w_s + hi * w_h, w, mask=live)

    @triton.jit
    def _accumulate_kernel(dst, src, n, rows, heads, d, d_b, d_s, d_h, s_b, s_s, s_h,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ADD: tl.constexpr):
        live, bi, si, hi, dd, mask = _tile(n, rows, heads, d, BLOCK_M, BLOCK_D)
        pd = dst + (bi * d_b + si * d_s + hi * d_h)[:, None] + dd[None, :]
        x = tl.load(src + (bi * s_b + si * s_s + hi * s_h)[:, None] + dd[None, :], mask=mask, other=0.0)
        if ADD:
            tl.store(pd, tl.load(pd, mask=mask, other=0.0) + x.to(tl.float32), mask=mask)
        else:
            tl.store(pd, x.to(tl.float32), mask=mask)

    @triton.jit
    def _row_term(o, l, bi, si, hi, dd, mask, live, o_b, o_s, o_h, l_b, l_h, l_s):
        """One partial's (lse row, out rows) of this program's items, in float32."""
        lv = tl.load(l + bi * l_b + hi * l_h + si * l_s, mask=live, other=float("-inf")).to(tl.float32)
        x = tl.load(o + (bi * o_b + si * o_s + hi * o_h)[:, None] + dd[None, :], mask=mask, other=0.0)
        return lv, x.to(tl.float32)

    @triton.jit
    def _merge_many_kernel(dst, acc, lacc, o0, o1, o2, o3, l0, l1, l2, l3, n, rows, heads, d,
                           t_b, t_s, t_h, a_b, a_s, a_h, la_b, la_h, la_s, o_b, o_s, o_h, l_b, l_h, l_s,
                           COUNT: tl.constexpr, HAS_ACC: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """(dst, lacc) <- the log-sum-exp merge of COUNT (1-4) partials, with the accumulators'
        (acc, lacc) own value too when HAS_ACC (else acc is not read); dst in its own dtype
        (it may be acc)."""
        live, bi, si, hi, dd, mask = _tile(n, rows, heads, d, BLOCK_M, BLOCK_D)
        pla = lacc + bi * la_b + hi * la_h + si * la_s
        v0, x0 = _row_term(o0, l0, bi, si, hi, dd, mask, live, o_b, o_s, o_h, l_b, l_h, l_s)
        mx = v0
        if HAS_ACC:
            va = tl.load(pla, mask=live, other=float("-inf"))
            mx = tl.where(va > mx, va, mx)
        if COUNT > 1:
            v1, x1 = _row_term(o1, l1, bi, si, hi, dd, mask, live, o_b, o_s, o_h, l_b, l_h, l_s)
            mx = tl.where(v1 > mx, v1, mx)
        if COUNT > 2:
            v2, x2 = _row_term(o2, l2, bi, si, hi, dd, mask, live, o_b, o_s, o_h, l_b, l_h, l_s)
            mx = tl.where(v2 > mx, v2, mx)
        if COUNT > 3:
            v3, x3 = _row_term(o3, l3, bi, si, hi, dd, mask, live, o_b, o_s, o_h, l_b, l_h, l_s)
            mx = tl.where(v3 > mx, v3, mx)
        empty = mx == float("-inf")
        safe = tl.where(empty, 0.0, mx)
        e = tl.exp(v0 - safe)
        total = e
        y = x0 * e[:, None]
        if HAS_ACC:
            e = tl.exp(va - safe)
            total += e
            pa = acc + (bi * a_b + si * a_s + hi * a_h)[:, None] + dd[None, :]
            y += tl.load(pa, mask=mask, other=0.0) * e[:, None]
        if COUNT > 1:
            e = tl.exp(v1 - safe)
            total += e
            y += x1 * e[:, None]
        if COUNT > 2:
            e = tl.exp(v2 - safe)
            total += e
            y += x2 * e[:, None]
        if COUNT > 3:
            e = tl.exp(v3 - safe)
            total += e
            y += x3 * e[:, None]
        scale = tl.where(empty, 0.0, 1.0 / total)
        pt = dst + (bi * t_b + si * t_s + hi * t_h)[:, None] + dd[None, :]
        tl.store(pt, (y * scale[:, None]).to(dst.dtype.element_ty), mask=mask)
        tl.store(pla, tl.where(empty, float("-inf"), safe + tl.log(total)), mask=live)

    @triton.jit
    def _sum_many_kernel(dst, acc, s0, s1, s2, s3, n, rows, heads, d, t_b, t_s, t_h, a_b, a_s, a_h,
                         s_b, s_s, s_h, COUNT: tl.constexpr, ADD: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """dst <- (acc +) the sum of COUNT (1-4) blocks, summed in float32, stored in dst's
        dtype (dst may be acc; acc is read only when ADD)."""
        live, bi, si, hi, dd, mask = _tile(n, rows, heads, d, BLOCK_M, BLOCK_D)
        ps = (bi * s_b + si * s_s + hi * s_h)[:, None] + dd[None, :]
        y = tl.load(s0 + ps, mask=mask, other=0.0).to(tl.float32)
        if COUNT > 1:
            y += tl.load(s1 + ps, mask=mask, other=0.0).to(tl.float32)
        if COUNT > 2:
            y += tl.load(s2 + ps, mask=mask, other=0.0).to(tl.float32)
        if COUNT > 3:
            y += tl.load(s3 + ps, mask=mask, other=0.0).to(tl.float32)
        if ADD:
            y += tl.load(acc + (bi * a_b + si * a_s + hi * a_h)[:, None] + dd[None, :], mask=mask, other=0.0)
        pt = dst + (bi * t_b + si * t_s + hi * t_h)[:, None] + dd[None, :]
        tl.store(pt, y.to(dst.dtype.element_ty), mask=mask)


class _Launcher:
    """One of this module's Triton kernels, launched at a fraction of ``kernel[grid](...)``'s
    host cost once a call of the same arguments' shape has run.

    A plain Triton launch binds and specializes every argument in Python, builds launch
    metadata for its hooks and then, in its compiled launcher, asks the driver about every
    tensor's pointer: for kernels of 6-11 tensors 30-50 us, more than a 2K-token block's merge
    takes on the device. Here the first call of each key (the dtypes, the integer arguments
    themselves, the meta-parameters: a finer key than Triton's own specialization) goes through
    Triton, which compiles and launches it; later calls hand its compiled launcher the tensors'
    addresses as integers (CUDA tensors, by ``usable``), skipping all of that. Calls with a
    tensor off 16-byte alignment (views rarely are) always take Triton's path. Used with the
    Triton version whose launcher calling convention it was written and run against (3.6); with
    others, with a launch hook set (a profiler's), or with RINGX_FUSED_DIRECT=0, every call is a
    plain Triton launch.
    """

    MAX_KEYS = 1024         # distinct argument shapes kept; the cache starts over beyond

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: dict = {}

    def __call__(self, grid: tuple, tensors: tuple, ints: tuple, **meta) -> None:
        index = tensors[0].get_device()
        if index != torch.cuda.current_device():     # Triton launches on the current device
            with torch.cuda.device(index):
                return self(grid, tensors, ints, **meta)
        ptrs = [t.data_ptr() for t in tensors]
        if not _direct_launches() or functools.reduce(operator.or_, ptrs) % 16:
            self.kernel[grid](*tensors, *ints, **meta)
            return None
        key = (index, tuple([t.dtype for t in tensors]), ints, tuple(meta.items()))
        hit = self.compiled.get(key)
        if hit is None:
            compiled = self.kernel[grid](*tensors, *ints, **meta)
            constexprs = tuple(meta[name] for name in self.kernel.arg_names[len(tensors) + len(ints):])
            if len(self.compiled) >= self.MAX_KEYS:
                self.compiled.clear()
            self.compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata, constexprs)
            return None
        run, function, packed, constexprs = hit
        run(grid[0], 1, 1, _stream(index), function, packed, None, None, None, *ptrs, *ints, *constexprs)
        return None


def _direct_launches() -> bool:
    """Whether _Launcher may skip Triton's own launch path (see its docstring)."""
    if not triton.__version__.startswith("3.6.") or os.environ.get("RINGX_FUSED_DIRECT", "1") == "0":
        return False
    runtime = triton.knobs.runtime           # launch hooks: None, or a chain of hooks (empty: none)
    return all(h is None or not getattr(h, "calls", True)
               for h in (runtime.launch_enter_hook, runtime.launch_exit_hook))


def _stream(index: int) -> int:
    """The current CUDA stream of device ``index``, as Triton's own launch takes it."""
    return triton.runtime.driver.active.get_current_stream(index)


if triton is not None:
    _MERGE, _WEIGH, _ACCUMULATE, _MERGE_MANY, _SUM_MANY = (_Launcher(k) for k in (
        _merge_kernel, _weigh_kernel, _accumulate_kernel, _merge_many_kernel, _sum_many_kernel))


def _launch(kernel: _Launcher, rows_shape, d: int, tensors: tuple, strides: tuple, **flags) -> None:
    b, rows, heads = rows_shape
    n = b * rows * heads
    if n == 0:
        return
    block_d = 1 << (d - 1).bit_length()      # the next power of two (no Triton call on the hot path)
    block_m = max(1, 2048 // block_d)     # 2048 elements a program (script/fused_tune.py: the
                                          # grouped merge 11-14 % faster than 4096 at 2-4K rows)
    grid = ((n + block_m - 1) // block_m,)
    kernel(grid, tensors, (n, rows, heads, d, *strides), **flags, BLOCK_M=block_m, BLOCK_D=block_d)


def merge(out_acc, lse_acc, out_blk, lse_blk) -> None:
    """ringX.merge.merge_ in one kernel. out_acc (b, rows, h, d) float32 and lse_acc (b, h, rows)
    float32, views allowed; out_blk (b, rows, h, d) any float dtype; lse_blk (b, h, rows)."""
    b, rows, h, d = out_acc.shape
    _launch(_MERGE, (b, rows, h), d, (out_acc, lse_acc, out_blk, lse_blk),
            (*out_acc.stride()[:3], *lse_acc.stride(), *out_blk.stride()[:3], *lse_blk.stride()))


def weigh(ow, w, out_blk, lse_blk, m) -> None:
    """ow (b, s, h, d) float32 <- out_blk * w and w (b, s, h) float32 <- exp(lse_blk - m):
    out_blk (b, s, h, d) any float dtype, lse_blk and m (b, h, s); views allowed."""
    b, s, h, d = out_blk.shape
    _launch(_WEIGH, (b, s, h), d, (ow, w, out_blk, lse_blk, m),
            (*ow.stride()[:3], *w.stride(), *out_blk.stride()[:3], *lse_blk.stride(), *m.stride()))


def accumulate(dst, src, add: bool = True) -> None:
    """dst (b, rows, h, d) float32 += src (b, rows, h, d) any float dtype, or dst = src when not
    add (no read of dst); views allowed."""
    b, rows, h, d = dst.shape
    _launch(_ACCUMULATE, (b, rows, h), d, (dst, src), (*dst.stride()[:3], *src.stride()[:3]),
            ADD=add)


MANY = 4    # partials one merge_many / sum_many kernel takes


def merge_many(dst, out_acc, lse_acc, outs, lses, has_acc: bool) -> None:
    """(dst, lse_acc) <- the merge of 1-4 partials (and of the accumulators' own value (out_acc,
    lse_acc) when ``has_acc``) in one pass. dst (b, rows, h, d) any float dtype (it may be out_acc;
    out_acc is not read without has_acc and may then be dst); other shapes as ``merge``; every
    partial has the strides of the first."""
    b, rows, h, d = dst.shape
    count = len(outs)
    out_acc = dst if out_acc is None else out_acc
    outs, lses = (*outs, *outs[:1] * (MANY - count)), (*lses, *lses[:1] * (MANY - count))
    _launch(_MERGE_MANY, (b, rows, h), d, (dst, out_acc, lse_acc, *outs, *lses),
            (*dst.stride()[:3], *out_acc.stride()[:3], *lse_acc.stride(), *outs[0].stride()[:3], *lses[0].stride()),
            COUNT=count, HAS_ACC=has_acc)


def sum_many(dst, srcs, acc=None) -> None:
    """dst (b, rows, h, d) any float dtype <- (acc +) the sum of 1-4 blocks ``srcs`` (any float
    dtype, the strides of the first), summed in float32, in one pass; acc (float32, dst's shape)
    None: dst is just the sum (acc may be dst itself)."""
    b, rows, h, d = dst.shape
    count = len(srcs)
    srcs = (*srcs, *srcs[:1] * (MANY - count))
    base = dst if acc is None else acc
    _launch(_SUM_MANY, (b, rows, h), d, (dst, base, *srcs),
            (*dst.stride()[:3], *base.stride()[:3], *srcs[0].stride()[:3]), COUNT=count, ADD=acc is not None)
