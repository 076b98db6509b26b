"""ContextParallel: a ringX function bound to its group shards, positions and gathers in the
layout the function expects, and its attention equals the whole sequence's (float64 reference)."""
import pytest
import torch
import torch.distributed as dist

from launcher import spawn
from ringX import ATTN_FUNCS, VARLEN_FUNCS, ContextParallel, expected_layout
from ringX.hybrid import groups_2d, hybrid_positions
from ringX.layout import global_positions, shard


def _reference(q, k, v, causal, docs=None):
    """float64 attention of whole (b, S, h, d) q and (b, S, hk, d) k/v (GQA expanded), causal
    and/or per document (docs: (S,) document index)."""
    s, rep = q.shape[1], q.shape[2] // k.shape[2]
    q = q.cpu().double()
    k, v = (t.cpu().double().repeat_interleave(rep, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    allowed = torch.ones(s, s, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(s, s, dtype=torch.bool).tril()
    if docs is not None:
        allowed &= docs[:, None] == docs[None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


def _whole(device, seqlen=48, heads=4, kv_heads=2, d=8):
    """Whole-sequence float32 q, k, v and an output gradient on ``device`` (the rank's: a GPU
    at world size 1 on a GPU machine)."""
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(1, seqlen, h, d, generator=g).to(device) for h in (heads, kv_heads, kv_heads, heads))


def bound_body(rank, world_size, device, fn, layout, causal):
    q, k, v, dout = _whole(device)
    cp = ContextParallel(fn, dist.group.WORLD, layout=layout)
    assert (cp.rank, cp.world_size) == (rank, world_size)
    assert cp.layout == (layout or expected_layout(fn))
    pos = cp.positions(q.shape[1])
    assert torch.equal(pos, global_positions(cp.layout, q.shape[1], rank, world_size))
    assert cp.positions(q.shape[1], device=device).device == q.device
    assert torch.equal(cp.shard(q), shard(q, cp.layout, rank, world_size))
    ql, kl, vl = (cp.shard(t).requires_grad_() for t in (q, k, v))
    out = cp.attention(ql, kl, vl, causal=causal)
    whole = cp.unshard(out.detach())
    ref = _reference(q, k, v, causal)
    assert (whole.cpu().double() - ref).abs().max().item() <= 1e-5
    out.backward(cp.shard(dout))
    qr, kr, vr = (t.cpu().double().requires_grad_() for t in (q, k, v))
    _reference(qr, kr, vr, causal).backward(dout.cpu().double())
    for t, r in zip((ql, kl, vl), (qr, kr, vr)):         # each rank's gradient shard, gathered
        assert (cp.unshard(t.grad).cpu().double() - r.grad).abs().max().item() <= 1e-5
    # the op path and return_attn_probs give the same output
    assert torch.equal(cp.attention(ql, kl, vl, causal=causal, as_op=True), out)
    probs = cp.attention(ql, kl, vl, causal=causal, return_attn_probs=True)
    assert torch.equal(probs[0], out) and probs[1].shape == (1, q.shape[2], ql.shape[1])


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("fn,layout,causal", [("ringX1", None, False), ("ringX2", None, True),
                                              ("ringX3", None, True), ("ringX4", "stripe", True)])
def test_bound_function_shards_attends_and_gathers_exactly(world_size, fn, layout, causal):
    spawn(world_size, bound_body, fn, layout, causal)


def varlen_body(rank, world_size, device, fn):
    q, k, v, _ = _whole(device)
    cu = torch.tensor([0, 5, 30, 48], dtype=torch.int32)
    docs = torch.repeat_interleave(torch.arange(3), cu.diff())
    cp = ContextParallel(VARLEN_FUNCS[fn], dist.group.WORLD)
    ql, kl, vl = (cp.shard(t[0], dim=0) for t in (q, k, v))
    out = cp.varlen_attention(ql, kl, vl, cu, 25, causal=True)
    assert torch.equal(cp.varlen_attention(ql, kl, vl, cu, 25, causal=True, as_op=True), out)
    whole = cp.unshard(out, dim=0)
    assert (whole.cpu().double() - _reference(q, k, v, True, docs)[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("fn", ["ringX2", "ringX3"])
def test_bound_varlen_function_keeps_documents_apart(fn, world_size):
    spawn(world_size, varlen_body, fn)


def two_level_body(rank, world_size, device, fn):
    q, k, v, _ = _whole(device, seqlen=32)
    inner, outer = groups_2d(2)
    cp = ContextParallel(fn, dist.group.WORLD, inner=(inner, outer))
    assert cp.layout == "hybrid"
    pos = cp.positions(32)
    assert torch.equal(pos, hybrid_positions(fn, 32, dist.get_rank(inner), 2, dist.get_rank(outer), 2))
    out = cp.attention(*(cp.shard(t) for t in (q, k, v)), causal=True)
    assert (cp.unshard(out).cpu().double() - _reference(q, k, v, True)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="as_op and backend are not taken"):
        cp.attention(cp.shard(q), cp.shard(k), cp.shard(v), causal=True, as_op=True)


@pytest.mark.parametrize("fn", ["ringX1", "ringX4"])
def test_two_level_group_takes_the_hybrid_layout(fn):
    spawn(4, two_level_body, fn)


def test_bad_bindings_are_clear_errors():
    with pytest.raises(ValueError, match="not a ringX attention function"):
        ContextParallel("ringX5")
    with pytest.raises(ValueError, match="ringX1 takes the contiguous layout, not 'stripe' "
                                         r"\(layout='stripe' is taken by ringX3 and ringX4\)"):
        ContextParallel("ringX1", layout="stripe")
    assert ContextParallel("ringX1", layout="contiguous").attention(*(torch.ones(1, 4, 2, 8),) * 3).shape == (1, 4, 2, 8)
    with pytest.raises(ValueError, match="ringX2 takes the contiguous layout, not 'zigzag'"):
        ContextParallel(ATTN_FUNCS["ringX2"], layout="zigzag")
    with pytest.raises(ValueError, match="leave layout out"):
        ContextParallel("ringX3", layout="zigzag", inner=(None, None))
    with pytest.raises(ValueError, match="not divisible by 2"):
        ContextParallel("ringX3").positions(7)
    cp = ContextParallel("ringX3")
    assert (cp.rank, cp.world_size, cp.layout) == (0, 1, "zigzag")
    x = torch.randn(2, 6, 3)
    assert torch.equal(cp.shard(x), x) and torch.equal(cp.unshard(x), x)


def padding_body(rank, world_size, device, fn):
    """A 13-token sequence on a layout that splits only multiples of cp.parts: padded at its end,
    causal attention (dense) and full attention (varlen, the padding its own document) give the
    13 real rows of the unpadded reference, and their gradients."""
    q, k, v, dout = _whole(device, seqlen=13)
    cp = ContextParallel(fn, dist.group.WORLD)
    assert cp.padded_length(13) == 16 and cp.padded_length(16) == 16
    ql, kl, vl = (cp.shard(cp.pad(t)).requires_grad_() for t in (q, k, v))
    out = cp.attention(ql, kl, vl, causal=True)
    out.backward(cp.shard(cp.pad(dout)))
    qr, kr, vr = (t.cpu().double().requires_grad_() for t in (q, k, v))
    _reference(qr, kr, vr, True).backward(dout.cpu().double())
    assert (cp.unshard(out.detach())[:, :13].cpu().double() - _reference(q, k, v, True)).abs().max() <= 1e-5
    for t, r in zip((ql, kl, vl), (qr, kr, vr)):
        assert (cp.unshard(t.grad)[:, :13].cpu().double() - r.grad).abs().max() <= 1e-5
    cu = cp.pad_documents(torch.tensor([0, 13], dtype=torch.int32))
    assert cu.tolist() == [0, 13, 16] and cp.pad_documents(cu) is cu
    full = cp.varlen_attention(*(cp.shard(cp.pad(t)[0], dim=0) for t in (q, k, v)), cu, 13)
    assert (cp.unshard(full, dim=0)[:13].cpu().double() - _reference(q, k, v, False)[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("fn", ["ringX3", "ringX2"])
def test_padding_to_the_layout_leaves_real_tokens_exact(fn):
    spawn(4 if fn == "ringX2" else 2, padding_body, fn)


def test_parts_of_each_layout():
    assert ContextParallel("ringX1").parts == 1 and ContextParallel("ringX4").parts == 2
    assert ContextParallel("ringX4", layout="stripe").parts == 1
    with pytest.raises(ValueError, match="must be positive"):
        ContextParallel("ringX2").padded_length(0)
