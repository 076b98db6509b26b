"""ringX.hybrid: Ulysses over an inner group x a ringX function over an outer group. Out, lse and
the gradients of q, k, v equal the float64 reference of the whole sequence (float32, 1e-5) at
world 4 (2 x 2, inner groups consecutive or strided) and 8 (2 x 4 and 4 x 2), for ringX1-4,
causal and full, with grouped-query attention (8 query / 2 kv heads: split over 2 inner ranks,
replicated over 4)."""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launcher import spawn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ringX.hybrid import groups_2d, hybrid_attn_func, hybrid_shard  # noqa: E402
from ringX.testing import reference_attention  # noqa: E402


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()


def hybrid_body(rank, world_size, device, inner, inner_first):
    ig, og = groups_2d(inner, inner_first)
    ri, ro = dist.get_rank(ig), dist.get_rank(og)
    outer = world_size // inner
    s, h, hk, d = 4 * world_size, 8, 2, 16
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(1, s, h, d, generator=g) for _ in range(2))
    k, v = (torch.randn(1, s, hk, d, generator=g) for _ in range(2))
    scale = d ** -0.5
    for causal in (True, False):
        ref = reference_attention(q, k, v, dout, causal, scale)
        for fn in ("ringX1", "ringX2", "ringX3", "ringX4"):
            def part(t):
                return hybrid_shard(t, fn, ri, inner, ro, outer)
            ql, kl, vl = (part(t).clone().requires_grad_() for t in (q, k, v))
            out, lse, _ = hybrid_attn_func(ql, kl, vl, fn, ig, og, causal=causal, softmax_scale=scale,
                                           return_attn_probs=True)
            (out * part(dout)).sum().backward()
            checks = {"out": (out, part(ref["out"])), "lse": (lse, hybrid_shard(ref["lse"], fn, ri, inner, ro, outer, dim=2)),
                      "dq": (ql.grad, part(ref["dq"])), "dk": (kl.grad, part(ref["dk"])), "dv": (vl.grad, part(ref["dv"]))}
            for name, (got, want) in checks.items():
                assert _rel(got, want) <= 1e-5, (fn, causal, inner, inner_first, name, _rel(got, want))


@pytest.mark.parametrize("world_size,inner,inner_first", [(4, 2, True), (4, 2, False), (8, 2, True), (8, 4, True)])
def test_hybrid_equals_reference(world_size, inner, inner_first):
    spawn(world_size, hybrid_body, inner, inner_first, deadline_s=400)


def varlen_body(rank, world_size, device):
    from ringX.testing import global_mask
    ig, og = groups_2d(2, True)
    ri, ro = dist.get_rank(ig), dist.get_rank(og)
    s, h, hk, d = 32, 8, 2, 16
    cu = torch.tensor([0, 5, 19, 32], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    q, dout = (torch.randn(1, s, h, d, generator=g) for _ in range(2))
    k, v = (torch.randn(1, s, hk, d, generator=g) for _ in range(2))
    ref = reference_attention(q, k, v, dout, True, d ** -0.5, visible=global_mask(s, True, docs=cu.tolist()))
    for fn in ("ringX2", "ringX3"):
        ql, kl, vl = (hybrid_shard(t, fn, ri, 2, ro, 2).clone().requires_grad_() for t in (q, k, v))
        out = hybrid_attn_func(ql, kl, vl, fn, ig, og, causal=True, softmax_scale=d ** -0.5, cu_seqlens=cu, max_seqlen=14)
        (out * hybrid_shard(dout, fn, ri, 2, ro, 2)).sum().backward()
        for name, got, want in (("out", out, ref["out"]), ("dq", ql.grad, ref["dq"]), ("dk", kl.grad, ref["dk"])):
            err = _rel(got, hybrid_shard(want, fn, ri, 2, ro, 2))
            assert err <= 1e-5, (fn, name, err)


def test_hybrid_varlen_documents():
    spawn(4, varlen_body, deadline_s=300)
