"""broadcast_rounds: every owner's tensor arrives once, in the promised order, with buffers reused
safely, on world sizes 1-4 (gloo here; NCCL where GPUs exist)."""
import pytest
import torch
import torch.distributed as dist

from launcher import spawn
from ringX.comm import GroupComm, broadcast_rounds


def _rounds(rank, world_size, device, own_first):
    comm = GroupComm(None if world_size == 1 else dist.group.WORLD)
    local = torch.full((3, 5), float(rank), device=device)
    seen, total = [], torch.zeros(3, 5, device=device)
    for owner, t in broadcast_rounds(comm, local, own_first=own_first):
        assert torch.equal(t, torch.full_like(t, float(owner))), (owner, t)
        seen.append(owner)
        total += t                                 # work on the received tensor, queued in order
        if not own_first:                          # plain order allows the caller's collectives
            x = torch.ones(2, device=device)
            comm.all_reduce(x, async_op=False)
            assert x.tolist() == [world_size] * 2
    others = [i for i in range(world_size) if i != rank]
    assert seen == ([rank] + others if own_first else list(range(world_size)))
    assert torch.equal(total, torch.full_like(total, float(sum(range(world_size)))))
    assert torch.equal(local, torch.full_like(local, float(rank)))   # the own tensor is untouched


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("own_first", [False, True])
def test_broadcast_rounds_yield_every_owner_once(world_size, own_first):
    if world_size == 1:
        _rounds(0, 1, torch.device("cpu"), own_first)
    else:
        spawn(world_size, _rounds, own_first)
