"""Bad input raises a clear error on every rank and never hangs; options that are not
implemented raise NotImplementedError instead of being ignored."""
import time

import pytest
import torch
import torch.distributed as dist

from launcher import spawn
from ringX import ATTN_FUNCS, VARLEN_FUNCS
from ringX.testing import solo_group

ALGOS = list(ATTN_FUNCS)


def _tensors(b=1, s=8, h=4, hk=2, d=16, dtype=torch.float32, device="cpu"):
    return (torch.randn(b, s, h, d, dtype=dtype, device=device),
            torch.randn(b, s, hk, d, dtype=dtype, device=device),
            torch.randn(b, s, hk, d, dtype=dtype, device=device))


def _expect_on_every_rank(fn, exc, pattern):
    """Run fn, require exc matching pattern within 30 s, and prove all ranks got there (no rank hung)."""
    start = time.monotonic()
    with pytest.raises(exc, match=pattern):
        fn()
    assert time.monotonic() - start < 30.0, f"took {time.monotonic() - start:.1f} s to raise"
    dist.barrier()


def mismatch_body(rank, world_size, device, algo):
    f = ATTN_FUNCS[algo]
    # different local sequence length on rank 1
    q, k, v = _tensors(s=10 if rank == 1 else 8, device=device)
    _expect_on_every_rank(lambda: f(q, k, v, causal=True), ValueError,
                          r"(?s)seqlen_local: rank 0=8, rank 1=10")
    # different batch size, head count, head dim on rank 1
    q, k, v = _tensors(b=2 if rank == 1 else 1, device=device)
    _expect_on_every_rank(lambda: f(q, k, v), ValueError, r"(?s)batch: rank 0=1, rank 1=2")
    q, k, v = _tensors(h=8 if rank == 1 else 4, device=device)
    _expect_on_every_rank(lambda: f(q, k, v), ValueError, r"(?s)heads: rank 0=4, rank 1=8")
    q, k, v = _tensors(d=32 if rank == 1 else 16, device=device)
    _expect_on_every_rank(lambda: f(q, k, v), ValueError, r"(?s)headdim: rank 0=16, rank 1=32")
    # different causal flag
    q, k, v = _tensors(device=device)
    _expect_on_every_rank(lambda: f(q, k, v, causal=rank == 0), ValueError, r"causal: rank 0=1, rank 1=0")
    # different dtype
    q, k, v = _tensors(dtype=torch.bfloat16 if rank == 1 else torch.float32, device=device)
    _expect_on_every_rank(lambda: f(q, k, v), ValueError, r"dtype: rank 0=torch.float32, rank 1=torch.bfloat16")
    # heads not divisible by kv heads on one rank only: every rank raises, naming rank 1
    q, k, v = _tensors(hk=3, device=device) if rank == 1 else _tensors(h=6, hk=3, device=device)
    _expect_on_every_rank(lambda: f(q, k, v), ValueError, r"rank 1: heads must be divisible")
    # wrong number of dims on rank 0
    q, k, v = _tensors(device=device)
    q3 = q[0] if rank == 0 else q
    _expect_on_every_rank(lambda: f(q3, k, v), ValueError, r"rank 0: q, k and v must be 4-D")
    # k and v shapes differ on rank 1 only
    q, k, v = _tensors(device=device)
    v1 = v[:, :, :1] if rank == 1 else v
    _expect_on_every_rank(lambda: f(q, k, v1), ValueError, r"rank 1: k and v must have the same shape")
    # k on another device on rank 0 only ('meta' stands in for a second device)
    k0 = k.to("meta") if rank == 0 else k
    _expect_on_every_rank(lambda: f(q, k0, v), ValueError, r"rank 0: q, k and v must be on the same device")
    # integer inputs
    qi = torch.zeros(1, 8, 4, 16, dtype=torch.int64, device=device)
    _expect_on_every_rank(lambda: f(qi, qi, qi), ValueError, r"must be floating point")
    # one rank needs gradients, the other does not: would deadlock in backward
    q, k, v = _tensors(device=device)
    q.requires_grad_(rank == 0)
    _expect_on_every_rank(lambda: f(q, k, v), ValueError, r"needs_grad")
    # options that are not implemented: NotImplementedError on every rank
    q, k, v = _tensors(device=device)
    _expect_on_every_rank(lambda: f(q, k, v, dropout_p=0.1), NotImplementedError, "dropout_p=0.1")
    # windows are implemented; ranks that disagree on one raise on every rank
    _expect_on_every_rank(lambda: f(q, k, v, window_size=(4 if rank == 0 else 3, 0)), ValueError,
                          r"window_size\[0\]: rank 0=4, rank 1=3")
    _expect_on_every_rank(lambda: f(q, k, v, window_size="wide"), ValueError,
                          r"window_size must be two ints")
    _expect_on_every_rank(lambda: f(q, k, v, alibi_slopes=torch.ones(4, device=device)), NotImplementedError, "alibi")
    # float64 is legal where a backend takes it (the float64 math backend): the exact result
    q, k, v = _tensors(b=1, s=8, dtype=torch.float64, device=device)
    out = f(q, k, v, causal=False)
    qa, ka, va = (torch.cat([torch.empty_like(x)] * 2, dim=1) for x in (q, k, v))
    for whole, part in ((qa, q), (ka, k), (va, v)):
        dist.all_gather_into_tensor(whole.transpose(0, 1), part.transpose(0, 1).contiguous())
    ref = torch.nn.functional.scaled_dot_product_attention(
        qa.transpose(1, 2), ka.transpose(1, 2), va.transpose(1, 2), enable_gqa=True).transpose(1, 2)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref[:, 8 * rank:8 * (rank + 1)], rtol=1e-10, atol=1e-12)
    # ... and a clear error on every rank where the forced backend cannot take them
    _expect_on_every_rank(lambda: f(q, k, v, backend="flash"), NotImplementedError, r"cannot take these inputs")
    # after all that, a good call still works
    out = f(*_tensors(device=device), causal=True)
    assert out.shape == (1, 8, 4, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("algo", ALGOS)
def test_mismatched_inputs_raise_on_every_rank(algo):
    spawn(2, mismatch_body, algo, deadline_s=120)


def odd_zigzag_body(rank, world_size, device, algo):
    q, k, v = _tensors(s=7, device=device)
    if algo in ("ringX3", "ringX4"):
        _expect_on_every_rank(lambda: ATTN_FUNCS[algo](q, k, v, causal=True), ValueError,
                              r"zigzag.*must be even")
    else:
        assert ATTN_FUNCS[algo](q, k, v, causal=True).shape == q.shape


@pytest.mark.parametrize("algo", ALGOS)
def test_sequence_the_layout_cannot_split(algo):
    spawn(2, odd_zigzag_body, algo, deadline_s=120)


def non_member_body(rank, world_size, device):
    group = dist.new_group([0, 1])
    q, k, v = _tensors(device=device)
    for algo, f in ATTN_FUNCS.items():
        if rank == 2:
            with pytest.raises(ValueError, match=r"global rank 2 is not a member"):
                f(q, k, v, group=group, causal=True)
        else:
            assert f(q, k, v, group=group, causal=True).shape == q.shape, algo
        dist.barrier()


def test_rank_outside_the_group():
    """Every algorithm: the non-member gets a ValueError, the members compute normally."""
    spawn(3, non_member_body, deadline_s=120)


@pytest.mark.parametrize("algo", ALGOS)
def test_single_process_without_distributed_equals_plain_attention(algo):
    q, k, v = _tensors(b=2, s=16, h=6, hk=2)
    for causal in (False, True):
        out = ATTN_FUNCS[algo](q, k, v, causal=causal)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
            enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def solo_group_body(rank, world_size, device, algo):
    """A group of size 1 inside a larger job is plain attention on that rank's data."""
    solo = solo_group(world_size)
    q, k, v = _tensors(b=2, s=16, h=6, hk=2, device=device)
    for causal in (False, True):
        out = ATTN_FUNCS[algo](q, k, v, causal=causal, group=solo)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
            enable_gqa=True).transpose(1, 2)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algo", ALGOS)
def test_group_of_one_rank_is_plain_attention(algo):
    spawn(2, solo_group_body, algo, deadline_s=120)


def transport_body(rank, world_size, device):
    import os
    q, k, v = _tensors(device=device)
    f = ATTN_FUNCS["ringX4"]
    try:
        os.environ["RINGX_TRANSPORT"] = "carrier-pigeon"
        _expect_on_every_rank(lambda: f(q, k, v, causal=True), ValueError, r"RINGX_TRANSPORT must be one of")
        os.environ["RINGX_TRANSPORT"] = "copy" if rank == 0 else "collective"
        _expect_on_every_rank(lambda: f(q, k, v, causal=True), ValueError,
                              r"transport: rank 0='copy', rank 1='collective'")
        if device.type == "cpu":     # gloo: the copy transport cannot run, and every rank says so
            os.environ["RINGX_TRANSPORT"] = "copy"
            _expect_on_every_rank(lambda: f(q, k, v, causal=True), ValueError,
                                  r"RINGX_TRANSPORT=copy needs every rank of the group on one node with NCCL")
    finally:
        os.environ.pop("RINGX_TRANSPORT", None)
    assert f(q, k, v, causal=True).shape == q.shape


def test_bad_transport_raises_on_every_rank():
    spawn(2, transport_body, deadline_s=120)


def varlen_mismatch_body(rank, world_size, device, algo):
    """cu_seqlens that differ between ranks, or are not boundaries of the packed sequence, raise a
    ValueError on every rank (never a hang); so do 4-D inputs and a short max_seqlen."""
    f = VARLEN_FUNCS[algo]
    q, k, v = (t[0] for t in _tensors(s=8, device=device))          # (8, h, d): S = 16
    cu = torch.tensor([0, 5, 16] if rank == 0 else [0, 6, 16], dtype=torch.int32)
    _expect_on_every_rank(lambda: f(q, k, v, cu, 11, causal=True), ValueError,
                          r"(?s)cu_seqlens digest: rank 0=\d+, rank 1=\d+")
    cu = torch.tensor([0, 5, 9] if rank == 1 else [0, 5, 16], dtype=torch.int32)
    _expect_on_every_rank(lambda: f(q, k, v, cu, 11, causal=True), ValueError,
                          r"rank 1: cu_seqlens must be global document boundaries")
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    _expect_on_every_rank(lambda: f(q, k, v, cu, 4, causal=True), ValueError,
                          r"max_seqlen=4 is shorter than the longest document \(11 tokens\)")
    _expect_on_every_rank(lambda: f(q, k, v, cu, 11, window_size=(2 + rank, 0)), ValueError,
                          r"window_size\[0\]: rank 0=2, rank 1=3")
    out = f(q, k, v, cu, 11, causal=True, window_size=(3, 0))
    assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("algo", ALGOS)
def test_mismatched_documents_raise_on_every_rank(algo):
    spawn(2, varlen_mismatch_body, algo, deadline_s=120)
