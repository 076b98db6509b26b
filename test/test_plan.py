"""Planner property tests (no kernels, no ranks): for random layouts, ranks, documents and windows,
the calls of every block cover exactly the pairs the global mask allows, each once, under a model
of each kernel's semantics (flash-attn's bottom-right window with its clamps, top-left causal on
squares, varlen pieces)."""
from __future__ import annotations

import random

import pytest
import torch

import launcher  # noqa: F401
from ringX.plan import (BAND, CAUSAL, FULL, VARLEN, Mask, Run, call_mask, dense_mask, layout_runs,
                        plan_block, restrict)


def _random_docs(rng: random.Random, total: int, n: int, chunk: int) -> tuple[int, ...] | None:
    kind = rng.choice(["none", "random", "ones", "edges", "one"])
    if kind == "none":
        return None
    if kind == "one":
        return (0, total)
    if kind == "ones":                                  # many 1-token documents, then a long one
        cut = rng.randrange(1, total)
        return tuple(range(0, cut + 1)) + ((total,) if cut < total else ())
    if kind == "edges":                                 # boundaries exactly on chunk edges
        return tuple(range(0, total + 1, chunk))
    cuts = sorted(rng.sample(range(1, total), rng.randrange(0, min(8, total - 1) + 1)))
    return tuple([0] + cuts + [total])


def _check_block(q_runs, k_runs, mask, band_ok, varlen_min):
    want = dense_mask(q_runs, k_runs, mask)
    plan = plan_block(q_runs, k_runs, mask, band_ok, varlen_min)
    if plan is None:
        assert not want.any(), "a block with visible pairs was skipped"
        return 0
    rows, keys = want.shape
    cover = torch.zeros(rows, keys, dtype=torch.int32)
    for c in plan.calls:
        if not band_ok:
            assert c.kind != VARLEN
        if c.kind == CAUSAL:
            assert c.r1 - c.r0 == c.k1 - c.k0, "causal calls must be square"
        cover += call_mask(c, rows, keys).int()
    assert (cover <= 1).all(), "a pair is covered twice"
    assert torch.equal(cover.bool(), want), "the calls' masks differ from the global mask"
    assert plan.pairs == int(want.sum())
    return len(plan.calls)


@pytest.mark.parametrize("seed", range(4))
def test_plans_match_the_global_mask(seed):
    rng = random.Random(seed)
    for _ in range(150):
        layout = rng.choice(["contiguous", "zigzag", "stripe"])
        n = rng.randint(1, 5)
        s = 2 * rng.randint(1, 6)
        total = s * n
        causal = rng.random() < 0.6
        w = rng.choice([-1, 0, 1, 2, s // 2, s + 1, total, total + 3])
        right = -1 if causal else rng.choice([-1, 0, 1, 3, total])
        left = rng.choice([-1, w])
        mask = Mask(causal=causal, window=(left, right), docs=_random_docs(rng, total, n, s // 2 or 1))
        band_ok = rng.random() < 0.5
        varlen_min = rng.choice([0, 2]) if band_ok else 0
        qr, kr = rng.randrange(n), rng.randrange(n)
        q_runs = layout_runs(layout, qr, n, s)
        k_runs = layout_runs(layout, kr, n, s)
        if rng.random() < 0.3:                          # a row range (ringX2's split blocks)
            a = rng.randrange(s)
            q_runs = restrict(q_runs, slice(a, rng.randrange(a + 1, s + 1)))
        if rng.random() < 0.3 and layout != "stripe":   # keys of several ranks (ringX3)
            k_runs = sum((layout_runs(layout, j, n, s) for j in range(n) if j != qr), ())
            if not k_runs:
                continue
        _check_block(q_runs, k_runs, mask, band_ok, varlen_min)


def test_rows_beyond_keys_split_where_flash_attn_narrows_an_open_side():
    """flash-attn turns a -1 side beside a bounded one into seqlen_k, which cuts rows when rows >
    keys + 1 (found on an H200: a document crossing into a later rank with a window); the
    planner splits such pieces into FULL rows and a window call, checked against that model."""
    mask = Mask(causal=False, window=(200, 40), docs=(0, 192, 194, 842, 1024))
    q, k = layout_runs("contiguous", 1, 4, 256), layout_runs("contiguous", 0, 4, 256)
    assert _check_block(q, k, mask, True, 0) >= 2
    for seed in range(200):
        rng = random.Random(seed)
        m, n = rng.randint(1, 40), rng.randint(1, 40)
        mask = Mask(causal=rng.random() < 0.5, window=(rng.randint(-1, 50), rng.randint(-1, 50)))
        _check_block((Run(rng.randint(0, 60), 1, m),), (Run(rng.randint(0, 60), 1, n),), mask, True, 0)


def test_offset_band_splits_at_the_flash_clamp():
    """More rows than keys with right >= keys: flash-attn would widen the band; the planner
    splits the rows (found by the trim/offset/split rule)."""
    mask = Mask(causal=False, window=(-1, 1))
    q = (Run(0, 1, 16),)
    k = (Run(10, 1, 2),)
    assert _check_block(q, k, mask, True, 0) >= 2


def test_causal_offsets_lower_to_square_calls_without_windows():
    """A stripe block below the diagonal (keys strictly before rows) is one square causal call
    plus full parts on kernels without windows."""
    mask = Mask(causal=True)
    plan = plan_block(layout_runs("stripe", 0, 4, 8), layout_runs("stripe", 2, 4, 8), mask, False, 0)
    assert {c.kind for c in plan.calls} <= {FULL, CAUSAL}
    _check_block(layout_runs("stripe", 0, 4, 8), layout_runs("stripe", 2, 4, 8), mask, False, 0)


def test_documents_pack_into_one_varlen_call():
    docs = (0, 3, 4, 9, 16)
    mask = Mask(causal=True, docs=docs)
    runs = layout_runs("contiguous", 0, 1, 16)
    plan = plan_block(runs, runs, mask, True, 2)
    assert [c.kind for c in plan.calls] == [VARLEN]
    assert plan.calls[0].pieces == ((0, 3), (3, 4), (4, 9), (9, 16))
    _check_block(runs, runs, mask, True, 2)


def test_window_outside_skips_block():
    mask = Mask(causal=True, window=(3, 0))
    assert plan_block(layout_runs("contiguous", 3, 4, 8), layout_runs("contiguous", 0, 4, 8), mask,
                      True, 0) is None
    band = plan_block(layout_runs("contiguous", 1, 4, 8), layout_runs("contiguous", 0, 4, 8), mask,
                      True, 0)
    assert [c.kind for c in band.calls] == [BAND]
