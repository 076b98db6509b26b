"""NaN and Inf in the inputs propagate like single-device attention and never crash or hang.

For every algorithm, a NaN, +Inf or -Inf in q, k or v (one element, or a whole row of one head),
causal and not, on 4 ranks:
- forward: the output is non-finite wherever exact attention is (computed row by row over the
  keys each row attends, float64; in bf16, wherever exact attention and PyTorch's own attention
  in bf16 both are), never where both exact attention and PyTorch's own
  scaled_dot_product_attention on the whole sequence are finite (PyTorch, like ringX inside a
  block, spreads 0 x NaN over masked positions of a tile; in bf16 PyTorch returns 0 for a row
  whose scores are all non-finite, where ringX returns NaN), and equal to exact attention
  wherever it is finite;
- backward: dq, dk and dv each contain a non-finite value exactly when PyTorch's do, and are
  equal to PyTorch's wherever both are finite. Which positions are non-finite may differ: the
  whole-sequence kernels spread 0 x NaN over masked positions of a tile, and ringX's merged lse
  of a row with an infinite score is NaN where the whole-sequence one is +Inf.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from launcher import spawn
from ringX import ATTN_FUNCS, expected_layout
from ringX.layout import shard

ALGOS = list(ATTN_FUNCS)


def _sdpa(q, k, v, causal):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2)


def _gather_whole(t, layout, rank, world, seqlen):
    """Every rank's (b, s/N, ...) shard -> the whole (b, S, ...) tensor in global order."""
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    whole = torch.empty((t.shape[0], seqlen) + tuple(t.shape[2:]), dtype=t.dtype, device=t.device)
    for r in range(world):
        whole[:, shard(torch.arange(seqlen, device=t.device).view(1, -1), layout, r, world)[0]] = parts[r]
    return whole


def _bad(t):
    return ~torch.isfinite(t)


def _exact(q, k, v, causal):
    """float64 attention one query row at a time over only the keys it attends (no masked
    products, so a NaN reaches exactly the rows that depend on it). (b, S, h, d) -> same."""
    q, k, v = (x.double() for x in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    out = torch.empty_like(q)
    for i in range(q.shape[1]):
        keys = slice(0, i + 1) if causal else slice(None)
        scores = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, keys]) * q.shape[-1] ** -0.5
        out[:, i] = torch.einsum("bhj,bjhd->bhd", torch.softmax(scores, dim=-1), v[:, keys])
    return out


def nonfinite_body(rank, world, device, algo, dtype):
    fn, layout = ATTN_FUNCS[algo], expected_layout(ATTN_FUNCS[algo])
    seqlen, pos = 8 * world, 5
    g = torch.Generator().manual_seed(0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for where in ("q", "k", "v"):
        for value in (float("nan"), float("inf"), float("-inf")):
            for whole_row in (False, True):
                for causal in (True, False):
                    q = torch.randn(1, seqlen, 4, 8, generator=g)
                    k, v = torch.randn(1, seqlen, 2, 8, generator=g), torch.randn(1, seqlen, 2, 8, generator=g)
                    dout = torch.randn(1, seqlen, 4, 8, generator=g).to(dtype).to(device)
                    q, k, v = (x.to(dtype).to(device) for x in (q, k, v))
                    target = {"q": q, "k": k, "v": v}[where]
                    if whole_row:
                        target[0, pos, 0, :] = value
                    else:
                        target[0, pos, 0, 3] = value
                    ref_in = [x.clone().requires_grad_(True) for x in (q, k, v)]
                    ref = _sdpa(*ref_in, causal)
                    ref.backward(dout)
                    ins = [shard(x, layout, rank, world).clone().requires_grad_(True) for x in (q, k, v)]
                    out = fn(*ins, causal=causal)
                    out.backward(shard(dout, layout, rank, world))
                    label = f"{algo} {dtype} {where}={value} whole_row={whole_row} causal={causal}"
                    got = _gather_whole(out.detach(), layout, rank, world, seqlen)
                    exact = _exact(q.cpu(), k.cpu(), v.cpu(), causal).to(device)
                    # in bf16 the kernel itself may return finite values (0) where exact attention
                    # is not: PyTorch's CPU flash kernel does so on AVX2-only processors for a row
                    # with an infinite score; there ringX (the same kernel on one rank) may too
                    must_be_bad = _bad(exact) if dtype == torch.float32 else _bad(exact) & _bad(ref.detach())
                    assert not (must_be_bad & ~_bad(got)).any(), f"{label}: finite where exact attention is not"
                    assert not (_bad(got) & ~_bad(ref.detach()) & ~_bad(exact)).any(), \
                        f"{label}: non-finite where both PyTorch and exact attention are finite"
                    ok = ~_bad(got) & ~_bad(exact)
                    assert torch.allclose(got[ok].double(), exact[ok], atol=tol, rtol=tol), label
                    for name, x, x_ref in zip("qkv", ins, ref_in):
                        grad = _gather_whole(x.grad, layout, rank, world, seqlen)
                        assert bool(_bad(grad).any()) == bool(_bad(x_ref.grad).any()), \
                            f"{label}: d{name} non-finite: {bool(_bad(grad).any())}, PyTorch's: {bool(_bad(x_ref.grad).any())}"
                        both = ~_bad(grad) & ~_bad(x_ref.grad)
                        assert torch.allclose(grad[both].float(), x_ref.grad[both].float(), atol=tol * 10, rtol=tol * 10), \
                            f"{label}: finite d{name} differs"
                    dist.barrier()


@pytest.mark.parametrize("algo", ALGOS)
def test_nan_and_inf_propagate_like_single_device_attention(algo):
    spawn(4, nonfinite_body, algo, torch.float32, deadline_s=300)


@pytest.mark.parametrize("algo", ["ringX1", "ringX4"])
def test_nan_and_inf_in_bfloat16(algo):
    spawn(2, nonfinite_body, algo, torch.bfloat16, deadline_s=300)
