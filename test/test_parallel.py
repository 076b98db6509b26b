"""ParallelDims: rank layout for every order, real process groups, and ringX inside cp groups."""
from itertools import permutations, product

import pytest
import torch
import torch.distributed as dist

from launcher import spawn
from ringX import ATTN_FUNCS
from ringX.parallel import DIMS, ParallelDims
from ringX.testing import Case, check_case

ORDERS = ["-".join(p) for p in permutations(DIMS)]


def _degree_sets(world_size):
    return [(dp, cp, tp) for dp, cp, tp in product([1, 2, 4, 8], repeat=3) if dp * cp * tp == world_size]


def _expected(order, degrees, dim):
    """Independent construction: enumerate ranks with the first name of ``order`` innermost."""
    names = order.split("-")
    coords = {}
    rank = 0
    for idx in product(*(range(degrees[n]) for n in reversed(names))):
        coords[rank] = dict(zip(reversed(names), idx))
        rank += 1
    groups = {}
    for r, c in coords.items():
        key = tuple(c[n] for n in DIMS if n != dim)
        groups.setdefault(key, []).append(r)
    return sorted(sorted(g) for g in groups.values())


@pytest.mark.parametrize("world_size", [4, 8])
@pytest.mark.parametrize("order", ORDERS)
def test_group_rank_sets(world_size, order):
    for dp, cp, tp in _degree_sets(world_size):
        pd = ParallelDims(dp=dp, cp=cp, tp=tp, order=order, world_size=world_size)
        for dim in DIMS:
            assert pd.group_ranks(dim) == _expected(order, {"dp": dp, "cp": cp, "tp": tp}, dim), (order, dp, cp, tp, dim)


def test_first_name_varies_fastest():
    pd = ParallelDims(dp=2, cp=2, tp=2, order="cp-tp-dp", world_size=8)
    assert pd.group_ranks("cp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert pd.group_ranks("tp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert pd.group_ranks("dp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert pd.group_ranks("dp_cp") == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_two_level_cp_groups():
    """cp_inner cuts each cp group into consecutive inner groups (one node) and outer groups of
    the ranks at the same place in each; a rank's inner rank is its cp rank mod cp_inner."""
    pd = ParallelDims(dp=-1, cp=4, tp=2, order="tp-cp-dp", world_size=16, cp_inner=2)
    assert pd.group_ranks("cp")[:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert pd.group_ranks("cp_inner")[:4] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert pd.group_ranks("cp_outer")[:4] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    for members in pd.group_ranks("cp_inner") + pd.group_ranks("cp_outer"):      # inside one cp group
        assert len({(pd.coords(r)["dp"], pd.coords(r)["tp"]) for r in members}) == 1, members
    with pytest.raises(ValueError, match="cp_inner=3 must divide cp=4"):
        ParallelDims(cp=4, world_size=4, cp_inner=3)


def test_rest_and_errors():
    assert ParallelDims(dp=-1, cp=2, tp=2, world_size=8).dp == 2
    assert ParallelDims(dp=2, cp=-1, tp=1, world_size=8).cp == 4
    with pytest.raises(ValueError, match="must equal the world size 8"):
        ParallelDims(dp=2, cp=2, tp=1, world_size=8)
    with pytest.raises(ValueError, match="not divisible"):
        ParallelDims(dp=-1, cp=3, tp=1, world_size=8)
    with pytest.raises(ValueError, match="at most one -1"):
        ParallelDims(dp=-1, cp=-1, tp=1, world_size=8)
    with pytest.raises(ValueError, match="order must name each"):
        ParallelDims(dp=-1, order="tp-cp-pp", world_size=8)
    with pytest.raises(ValueError, match="unknown parallel dim 'pp'"):
        ParallelDims(dp=-1, world_size=8).group_ranks("pp")


def groups_body(rank, world_size, device, order):
    pd = ParallelDims(dp=-1, cp=2, tp=2, order=order)
    groups = pd.build()
    for name in ("cp", "tp", "dp", "dp_cp"):
        members = dist.get_process_group_ranks(groups[name])
        expected = [g for g in pd.group_ranks(name) if rank in g]
        assert [sorted(members)] == expected, (name, members, expected)
    with pytest.raises(KeyError, match="built: cp, tp, dp, dp_cp"):
        groups["pp"]


# every order's rank sets are checked without processes (test_group_rank_sets); building the
# real groups on 8 processes once is the default run's share
@pytest.mark.parametrize("order", [pytest.param("tp-cp-dp", marks=pytest.mark.slow),
                                   pytest.param("cp-tp-dp", marks=pytest.mark.slow), "dp-cp-tp"])
def test_built_groups_world8(order):
    spawn(8, groups_body, order)


def cp_exact_body(rank, world_size, device, order):
    """cp=2 x dp=2: each cp group runs its own problem (per-dp-rank data) exactly."""
    pd = ParallelDims(dp=2, cp=2, tp=1, order=order)
    groups = pd.build(names=("cp", "dp"))
    dp_index = pd.coords(rank)["dp"]
    for algo, fn in ATTN_FUNCS.items():
        case = Case(batch=1, seqlen=16, heads=6, kv_heads=2, headdim=16, causal=algo != "ringX1",
                    dtype=torch.float32, seed=7 + dp_index)
        res = check_case(fn, algo, case, groups.cp, device)
        assert res.passed, f"{algo} {order} rank {rank}: {res.failures}"


@pytest.mark.parametrize("order", ["cp-tp-dp", "tp-cp-dp", "dp-cp-tp"])
def test_ringx_inside_cp_groups(order):
    spawn(4, cp_exact_body, order)
