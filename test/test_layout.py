"""Layout helpers and block plans."""
import pytest
import torch

import launcher  # noqa: F401  (puts the checkout on sys.path when ringX is not installed)
from ringX import ATTN_FUNCS, expected_layout
from ringX.layout import LAYOUTS, block_plan, global_positions, shard, unshard


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_unshard_roundtrip_and_positions(layout, world_size):
    x = torch.arange(2 * 24 * 3).view(2, 24, 3)
    parts = [shard(x, layout, r, world_size) for r in range(world_size)]
    assert torch.equal(unshard(parts, layout), x)
    seen = torch.cat([global_positions(layout, 24, r, world_size) for r in range(world_size)])
    assert sorted(seen.tolist()) == list(range(24))
    for r, p in enumerate(parts):
        assert torch.equal(p, x[:, global_positions(layout, 24, r, world_size)])


def test_zigzag_positions_explicit():
    assert global_positions("zigzag", 8, 0, 2).tolist() == [0, 1, 6, 7]
    assert global_positions("zigzag", 8, 1, 2).tolist() == [2, 3, 4, 5]
    assert global_positions("stripe", 8, 1, 4).tolist() == [1, 5]


def test_unsplittable_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by 6"):
        global_positions("zigzag", 20, 0, 3)
    with pytest.raises(ValueError, match="unknown layout"):
        global_positions("spiral", 8, 0, 2)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_causal_block_plan_covers_exactly_the_lower_triangle(layout, world_size):
    """Union of all planned (query, key) pairs == {(i, j): j <= i}, each pair exactly once."""
    s = 8 * world_size
    local = s // world_size
    cover = torch.zeros(s, s, dtype=torch.int64)
    for qr in range(world_size):
        qpos = global_positions(layout, s, qr, world_size)
        for kr in range(world_size):
            kpos = global_positions(layout, s, kr, world_size)
            for blk in block_plan(layout, True, qr, kr, local):
                qi, kj = qpos[blk.q_rows], kpos[blk.kv_rows]
                if blk.causal:
                    assert len(qi) == len(kj), "causal blocks must be square"
                allowed = kj[None, :] <= qi[:, None]
                if not blk.causal:
                    assert bool(allowed.all()), "an unmasked block contains masked pairs"
                cover[qi[:, None], kj[None, :]] += allowed.long()
    assert torch.equal(cover, torch.ones(s, s, dtype=torch.int64).tril())


def test_expected_layout():
    assert expected_layout(ATTN_FUNCS["ringX1"]) == "contiguous"
    assert expected_layout("ringX3_attn_func") == "zigzag"
    assert expected_layout("ringX4") == "zigzag"
    with pytest.raises(ValueError):
        expected_layout(print)
