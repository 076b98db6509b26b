"""ringX.hybrid: Ulysses over an inner group x a ringX function over an outer group. Out, lse and
the gradients of q, k, v equal the float64 reference of the whole sequence (float32, 1e-5) at
world 4 (2 x 2, inner groups consecutive or strided) and 8 (2 x 4 and 4 x 2), for ringX1-4,
causal and full, with grouped-query attention (8 query / 2 kv heads: split over 2 inner ranks,
replicated over 4). The hierarchical ringX3 (ringX.node_groups) against the same reference at
world 4 and 8, and the benchmark's hybrid and node-gather methods."""
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


def _problem(world_size: int, seed: int):
    """q, k, v, dout of 4 tokens per rank, 8 query / 2 kv heads of 16, and the softmax scale."""
    s, h, hk, d = 4 * world_size, 8, 2, 16
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(1, s, h, d, generator=g) for _ in range(2))
    k, v = (torch.randn(1, s, hk, d, generator=g) for _ in range(2))
    return q, k, v, dout, d ** -0.5


def hybrid_body(rank, world_size, device, inner, inner_first):
    ig, og = groups_2d(inner, inner_first)
    ri, ro = dist.get_rank(ig), dist.get_rank(og)
    outer = world_size // inner
    q, k, v, dout, scale = _problem(world_size, seed=0)
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


def hierarchical_body(rank, world_size, device, per_node):
    """ringX3 over node_groups(world, per_node): k/v gathered across nodes (same place), then
    within the node (dk/dv reduce-scattered within, then across), equal to the float64 reference."""
    from ringX import layout as L
    from ringX import node_groups, ringX3_attn_func
    from ringX.comm import GroupComm
    ng = node_groups(None, per_node)
    sizes = []                                 # group sizes of the gathers and reduce-scatters run
    for name in ("all_gather", "reduce_scatter"):
        orig = getattr(GroupComm, name)

        def spy(self, out, inp, async_op=True, _orig=orig, _name=name):
            sizes.append((_name, self.size))
            return _orig(self, out, inp, async_op)
        setattr(GroupComm, name, spy)
    q, k, v, dout, scale = _problem(world_size, seed=2)
    for causal in (True, False):
        ref = reference_attention(q, k, v, dout, causal, scale)

        def part(t, dim=1):
            return L.shard(t, "zigzag", rank, world_size) if dim == 1 else \
                L.shard(t.transpose(1, 2), "zigzag", rank, world_size).transpose(1, 2)
        ql, kl, vl = (part(t).clone().requires_grad_() for t in (q, k, v))
        out, lse, _ = ringX3_attn_func(ql, kl, vl, softmax_scale=scale, causal=causal, group=ng,
                                       return_attn_probs=True)
        (out * part(dout)).sum().backward()
        checks = {"out": (out, part(ref["out"])), "lse": (lse, part(ref["lse"], dim=2)),
                  "dq": (ql.grad, part(ref["dq"])), "dk": (kl.grad, part(ref["dk"])), "dv": (vl.grad, part(ref["dv"]))}
        for name, (got, want) in checks.items():
            assert _rel(got, want) <= 1e-5, (causal, per_node, name, _rel(got, want))
    tops = [i for i, (_, n) in enumerate(sizes) if n == world_size]   # each whole-group call ran as two
    assert tops and {sizes[i][0] for i in tops} == {"all_gather", "reduce_scatter"}, sizes
    for i in tops:
        name = sizes[i][0]
        levels = [world_size // per_node, per_node] if name == "all_gather" else [per_node, world_size // per_node]
        assert sizes[i + 1:i + 3] == [(name, n) for n in levels], (i, sizes)


@pytest.mark.parametrize("world_size,per_node", [(4, 2), pytest.param(8, 4, marks=pytest.mark.slow)])
def test_hierarchical_ringX3_equals_reference(world_size, per_node):
    spawn(world_size, hierarchical_body, per_node, deadline_s=400)


def test_benchmark_runs_hybrid_splits_and_node_gathers(tmp_path):
    """python -m ringX.bench --methods hybrid2-ringX3 ringX3-nodes2 on 4 CPU ranks: each checked
    against the single device."""
    import csv
    import os
    import subprocess
    import sys
    out = tmp_path / "bench"
    res = subprocess.run([sys.executable, "-m", "ringX.bench", "--nproc", "4", "--sweep", "none", "--seqlens", "64",
                          "--heads", "4", "--kv-heads", "2", "--headdim", "16", "--dtype", "float32", "--causal", "true",
                          "--modes", "fwd_bwd", "--methods", "hybrid2-ringX3", "hybrid2-ringX2", "ringX3-nodes2",
                          "--warmup", "0", "--repeats", "1", "--out", str(out)],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = {r["method"]: r for r in csv.DictReader(open(out / "results.csv"))}
    for m in ("hybrid2-ringX3", "hybrid2-ringX2", "ringX3-nodes2"):
        assert float(rows[m]["check_err"]) < 1e-5, rows[m]
