"""The fused GPU kernels of ringX.fused against their PyTorch formulas (ringX.merge), on strided
views like the schedules pass, with rows that saw no keys (-inf) and NaN. On machines without
CUDA and Triton only the dispatch is checked: the formulas run there."""
import pytest
import torch

import launcher  # noqa: F401  (puts the checkout on sys.path when ringX is not installed)
from ringX import fused
from ringX.merge import (PendingMerges, PendingSums, accumulate_, add_block_, merge_, merge_formula_, merge_many_,
                         merge_many_formula_, new_accumulators, sum_many_,
                         weigh_, weigh_formula_)

GPU = torch.cuda.is_available() and fused.triton is not None and torch.version.hip is None
needs_gpu = pytest.mark.skipif(not GPU, reason="the fused kernels need an NVIDIA GPU and Triton")


def test_cpu_tensors_take_the_formula():
    x = torch.zeros(1, 4, 2, 8)
    assert not fused.usable(x)


def test_environment_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("RINGX_FUSED", "0")
    assert not fused.usable(torch.zeros(1, 4, 2, 8, device="cuda" if GPU else "cpu"))


def _partials(b, s, h, d, device, dtype, seed):
    """An accumulator with some empty rows and a block in cuDNN's (b, h, s, d) storage order."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    acc = torch.randn(b, s, h, d, generator=g).to(device)
    lacc = (torch.randn(b, h, s, generator=g) * 3).to(device)
    lacc[:, :, : s // 4] = float("-inf")
    acc[:, : s // 4] = 0
    blk = torch.randn(b, h, s, d, generator=g).to(device, dtype).transpose(1, 2)   # strided view
    lblk = (torch.randn(b, h, s, generator=g) * 3).to(device)
    lblk[:, :, : s // 8] = float("-inf")          # rows empty in both: must stay exactly 0
    return acc, lacc, blk, lblk


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [128, 80])
def test_fused_merge_equals_formula_on_row_slices(dtype, d):
    acc, lacc, blk, lblk = _partials(2, 64, 4, d, "cuda", dtype, seed=1)
    rows = slice(16, 48)                                   # views into the whole accumulators
    mine_acc, mine_lse = acc.clone(), lacc.clone()
    assert fused.usable(mine_acc[:, rows], blk[:, rows])
    merge_(mine_acc[:, rows], mine_lse[:, :, rows], blk[:, rows], lblk[:, :, rows])
    merge_formula_(acc[:, rows], lacc[:, :, rows], blk[:, rows], lblk[:, :, rows])
    torch.testing.assert_close(mine_acc, acc, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(mine_lse, lacc, rtol=2e-6, atol=2e-6)
    assert mine_acc[:, : 16].abs().sum() == 0 and torch.isfinite(mine_acc).all()


@needs_gpu
def test_fused_merge_propagates_nan():
    acc, lacc, blk, lblk = _partials(1, 32, 2, 64, "cuda", torch.bfloat16, seed=2)
    lblk[0, 1, 20] = float("nan")
    blk[0, 21, 0, 3] = float("nan")
    merge_(acc, lacc, blk, lblk)
    assert torch.isnan(lacc[0, 1, 20]) and torch.isnan(acc[0, 20, 1]).all()
    assert torch.isnan(acc[0, 21, 0, 3]) and torch.isfinite(acc[0, 22]).all()


@needs_gpu
@pytest.mark.parametrize("d", [128, 80])
def test_fused_weigh_equals_formula(d):
    _, _, blk, lblk = _partials(2, 64, 4, d, "cuda", torch.bfloat16, seed=3)
    m = torch.maximum(lblk, torch.randn_like(lblk))
    mine = torch.full((2 * 64 * 4 * (d + 1),), float("nan"), device="cuda")
    ref = mine.clone()
    n = 2 * 64 * 4 * d
    for flat, fn in ((mine, weigh_), (ref, weigh_formula_)):
        fn(flat[:n].view(2, 64, 4, d), flat[n:].view(2, 64, 4), blk, lblk, m)
    torch.testing.assert_close(mine, ref, rtol=2e-6, atol=0)


@needs_gpu
@pytest.mark.parametrize("d", [128, 80])
def test_fused_accumulate_equals_add_on_row_slices(d):
    g = torch.Generator(device="cuda").manual_seed(4)
    acc = torch.randn(2, 96, 4, d, device="cuda", generator=g)
    ref = acc.clone()
    blk = torch.randn(2, 40, 4, d, device="cuda", generator=g).to(torch.bfloat16)
    blk[0, 3, 1, 5] = float("nan")
    accumulate_(acc[:, 30:70], blk)            # a strided row-slice view over batch
    ref[:, 30:70] += blk
    torch.testing.assert_close(acc, ref, rtol=0, atol=0, equal_nan=True)


@needs_gpu
@pytest.mark.parametrize("d", [128, 80])
def test_fused_first_write_equals_copy_from_cudnn_order(d):
    """accumulate_(first=True) writes the block cast to float32 and reads nothing of dst (NaN
    already there must vanish), from a block in cuDNN's (b, h, s, d) storage order."""
    g = torch.Generator(device="cuda").manual_seed(5)
    acc = torch.full((2, 96, 4, d), float("nan"), device="cuda")
    blk = torch.randn(2, 4, 40, d, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
    accumulate_(acc[:, 30:70], blk, first=True)
    torch.testing.assert_close(acc[:, 30:70], blk.float(), rtol=0, atol=0)
    assert acc[:, :30].isnan().all() and acc[:, 70:].isnan().all()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if GPU else []))
def test_add_block_fills_fresh_buffers_like_zeros_plus_adds(device):
    """add_block_ on a fresh (garbage) buffer equals zeros + the same adds, whether the first block
    covers every row or not."""
    g = torch.Generator(device="cpu").manual_seed(6)
    blocks = [(slice(0, 8), torch.randn(1, 8, 2, 16, generator=g)),
              (slice(4, 8), torch.randn(1, 4, 2, 16, generator=g))]
    for plan in (blocks, blocks[::-1]):             # covering first, partial first
        dst = torch.full((1, 8, 2, 16), float("nan"), device=device)
        ref = torch.zeros(1, 8, 2, 16, device=device)
        fresh = True
        for rows, blk in plan:
            fresh = add_block_(dst, rows, blk.to(device, torch.bfloat16), fresh)
            ref[:, rows] += blk.to(device, torch.bfloat16)
        assert fresh is False
        torch.testing.assert_close(dst, ref, rtol=0, atol=0)


def _chunk_partials(device, dtype, chunks, seed, b=2, s=48, h=4, d=64):
    """Attention of q over keys in ``chunks`` pieces: each piece's (out (b, s, h, d) in ``dtype``
    in cuDNN's storage order, lse (b, h, s)), and the whole attention in float64."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for n in (s, 16 * chunks, 16 * chunks))
    scores = q @ k.transpose(-1, -2) / d ** 0.5
    scores[:, :, : s // 4] = float("-inf")              # rows that see no key at all
    scores[:, :, s // 4: s // 2, 16:] = float("-inf")   # rows that see only the first piece
    whole = torch.nan_to_num(torch.softmax(scores, -1)) @ v
    parts = []
    for c in range(chunks):
        sc = scores[..., 16 * c: 16 * (c + 1)]
        lse = torch.logsumexp(sc, -1)
        o = torch.nan_to_num(torch.softmax(sc, -1)) @ v[:, :, 16 * c: 16 * (c + 1)]
        parts.append((o.to(dtype).to(device).transpose(1, 2), lse.float().to(device)))
    return parts, whole.transpose(1, 2)


@pytest.mark.parametrize("chunks", [1, 3, 6])
def test_merge_many_gives_the_whole_attention(chunks):
    """merge_many_ of key-chunk partials (fused on GPUs, pairwise elsewhere) is the attention
    over all the keys; rows that saw no key stay 0 with lse -inf; a last pass may write the
    result in another dtype (dst) without a float32 accumulator."""
    device = "cuda" if GPU else "cpu"
    parts, whole = _chunk_partials(device, torch.float32, chunks, seed=7)
    out = torch.full(whole.shape, float("nan"), device=device)
    lse = torch.full((2, 4, 48), float("nan"), device=device)
    merge_many_(out, lse, parts, first=True)
    torch.testing.assert_close(out.double().cpu(), whole, rtol=1e-5, atol=1e-5)
    assert (out[:, :12] == 0).all() and (lse[:, :, :12] == float("-inf")).all()
    half_out, half_lse = torch.full_like(out, float("nan")), torch.full_like(lse, float("nan"))
    merge_many_(half_out, half_lse, parts[: (chunks + 1) // 2], first=True)   # then the rest
    if chunks > 1:
        low = torch.empty(out.shape, dtype=torch.bfloat16, device=device)
        wide, wide_lse = half_out.clone(), half_lse.clone()
        merge_many_(wide, wide_lse, parts[(chunks + 1) // 2:], first=False)
        merge_many_(half_out, half_lse, parts[(chunks + 1) // 2:], first=False, dst=low)
        torch.testing.assert_close(low, wide.to(torch.bfloat16), rtol=0, atol=0)   # the same pass, rounded once
        torch.testing.assert_close(half_lse, wide_lse, rtol=0, atol=0)
        torch.testing.assert_close(wide, out, rtol=1e-5, atol=1e-6)
    if chunks <= 4:
        low, low_lse = torch.empty(out.shape, dtype=torch.bfloat16, device=device), torch.empty_like(lse)
        merge_many_(None, low_lse, parts, first=True, dst=low)
        torch.testing.assert_close(low, out.to(torch.bfloat16), rtol=0, atol=0)
        torch.testing.assert_close(low_lse, lse, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="out_acc may be None"):
        merge_many_(None, lse, parts, first=False, dst=out)


@needs_gpu
@pytest.mark.parametrize("chunks", [2, 4, 5])
def test_fused_merge_many_equals_pairwise_formula(chunks):
    parts, _ = _chunk_partials("cuda", torch.bfloat16, chunks, seed=8)
    parts[0][1][0, 1, 30] = float("nan")                  # NaN propagates
    for first in (True, False):
        mine, ref = (torch.randn(2, 48, 4, 64, device="cuda").clamp(-1, 1) for _ in range(2))
        ref.copy_(mine)
        lm = torch.randn(2, 4, 48, device="cuda")
        lr = lm.clone()
        merge_many_(mine[:, 8:40], lm[:, :, 8:40], [(o[:, 8:40], l[:, :, 8:40]) for o, l in parts], first)
        merge_many_formula_(ref[:, 8:40], lr[:, :, 8:40], [(o[:, 8:40], l[:, :, 8:40]) for o, l in parts], first)
        torch.testing.assert_close(mine, ref, rtol=2e-5, atol=2e-6, equal_nan=True)
        torch.testing.assert_close(lm, lr, rtol=2e-6, atol=2e-6, equal_nan=True)
        assert torch.isnan(lm[0, 1, 30]) and torch.isnan(mine[0, 30, 1]).all()


@pytest.mark.parametrize("count", [1, 4, 7])
def test_sum_many_equals_adds(count):
    """dst <- (acc +) the blocks' sum, in float32 whatever dst's dtype: into the accumulator
    itself, from nothing, and from an accumulator into a bf16 result."""
    device = "cuda" if GPU else "cpu"
    g = torch.Generator(device="cpu").manual_seed(9)
    srcs = [torch.randn(2, 4, 40, 80, generator=g).to(device, torch.bfloat16).transpose(1, 2) for _ in range(count)]
    base = torch.randn(2, 96, 4, 80, generator=g).to(device)
    total = sum(x.float() for x in srcs)
    mine = base.clone()
    sum_many_(mine[:, 30:70], srcs, acc=mine[:, 30:70])
    ref = base.clone()
    ref[:, 30:70] += total
    torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)
    fresh = torch.full_like(base, float("nan"))
    sum_many_(fresh[:, 30:70], srcs)
    torch.testing.assert_close(fresh[:, 30:70], total, rtol=1e-6, atol=1e-6)
    assert fresh[:, :30].isnan().all()
    acc = base[:, 30:70].clone()
    low = torch.empty(acc.shape, dtype=torch.bfloat16, device=device)
    sum_many_(low, srcs, acc=acc)
    torch.testing.assert_close(low, (base[:, 30:70] + total).to(torch.bfloat16), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("max_bytes", [2**30, 1])
@pytest.mark.parametrize("order", ["whole first", "part first", "whole only"])
def test_pending_merges_and_sums_equal_merging_as_they_come(max_bytes, order):
    """PendingMerges / PendingSums (kept and merged four at a time, at once when max_bytes is
    reached, the last pass straight into the result's dtype) give what merging each partial as
    it comes gives, with partials of all rows and of row ranges in any order."""
    device = "cuda" if GPU else "cpu"
    parts, _ = _chunk_partials(device, torch.float32, 7, seed=10)
    rows = {"whole first": [slice(0, 48), slice(16, 40), slice(0, 48), slice(16, 40), slice(0, 48), slice(0, 48),
                            slice(8, 24)],
            "part first": [slice(8, 24), slice(0, 48), slice(0, 48), slice(16, 40), slice(0, 48)],
            "whole only": [slice(0, 48)] * 3}[order]
    for dtype in (torch.float32, torch.bfloat16):
        merges = PendingMerges((2, 48, 4, 64), device, torch.float32, max_bytes=max_bytes)
        sums = PendingSums((2, 48, 4, 64), device, torch.float32, max_bytes=max_bytes)
        ref_out, ref_lse = new_accumulators(torch.empty(2, 48, 4, 64), torch.float32)
        ref_out, ref_lse, ref_dst = ref_out.to(device), ref_lse.to(device), torch.zeros(2, 48, 4, 64, device=device)
        for sl, (o, l) in zip(rows, parts):
            merges.add(sl, o[:, sl], l[:, :, sl])
            merge_formula_(ref_out[:, sl], ref_lse[:, :, sl], o[:, sl], l[:, :, sl])
            sums.add(sl, o[:, sl])
            ref_dst[:, sl] += o[:, sl]
        out, lse = merges.finish(dtype)
        dst = sums.finish(dtype)
        assert out.dtype == dst.dtype == dtype and lse.dtype == torch.float32
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(out, ref_out.to(dtype), **tol)
        torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dst, ref_dst.to(dtype), **tol)
    out, lse = PendingMerges((2, 48, 4, 64), device, torch.float32).finish(torch.bfloat16)   # nothing came
    assert (out == 0).all() and (lse == float("-inf")).all()
    assert (PendingSums((2, 48, 4, 64), device, torch.float32).finish(torch.float32) == 0).all()


def _fused_ops(device, offset: int, heads: int):
    """Every fused op once on fresh inputs (merge, weigh, accumulate, merge_many, sum_many):
    their results. ``offset`` shifts each view's start by that many elements (off 16-byte
    alignment when odd), ``heads`` 1 makes an integer argument 1: other specializations."""
    g = torch.Generator(device="cpu").manual_seed(11)

    def t(*shape, dtype=torch.float32):
        flat = torch.randn(offset + torch.Size(shape).numel(), generator=g).to(device, dtype)
        return flat[offset:].view(shape)

    b, s, h, d = 2, 40, heads, 64
    acc, lacc = t(b, s, h, d), t(b, h, s)
    outs = [t(b, s, h, d, dtype=torch.bfloat16) for _ in range(4)]
    lses = [t(b, h, s) for _ in range(4)]
    fused.merge(acc, lacc, outs[0], lses[0])
    ow, w, m = t(b, s, h, d), t(b, s, h), t(b, h, s)
    fused.weigh(ow, w, outs[1], lses[1], m)
    grad = t(b, s, h, d)
    fused.accumulate(grad, outs[2])
    many, many_lse = t(b, s, h, d, dtype=torch.bfloat16), t(b, h, s)
    fused.merge_many(many, None, many_lse, outs, lses, has_acc=False)
    total = t(b, s, h, d, dtype=torch.bfloat16)
    fused.sum_many(total, outs[:3], acc=grad)
    return [acc, lacc, ow, w, grad, many, many_lse, total]


@needs_gpu
def test_direct_launches_equal_tritons_own(monkeypatch):
    """The fused kernels launched through their compiled launcher (every call after the first of
    the same argument shape) give bit for bit what Triton's own launch gives, for aligned and
    unaligned views (those always take Triton's path) and an integer argument of 1, each case
    repeated."""
    cases = [(0, 4), (1, 4), (0, 1), (0, 4), (3, 1)]
    monkeypatch.setenv("RINGX_FUSED_DIRECT", "0")
    plain = [_fused_ops("cuda", *c) for c in cases]
    monkeypatch.setenv("RINGX_FUSED_DIRECT", "1")
    for _ in range(2):
        direct = [_fused_ops("cuda", *c) for c in cases]
        for p, q in zip(plain, direct):
            for x, y in zip(p, q):
                torch.testing.assert_close(y, x, rtol=0, atol=0)
    if fused.triton.__version__.startswith("3.6."):    # the version it was written for: it did launch
        assert fused._direct_launches()
        assert len(fused._MERGE_MANY.compiled) >= 2 and len(fused._SUM_MANY.compiled) >= 2   # aligned cases
