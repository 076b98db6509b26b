"""broadcast_rounds: every owner's tensor arrives once, in the promised order, with buffers reused
safely, on world sizes 1-4 (gloo here; NCCL where GPUs exist), through collectives and, on GPUs,
through the copy engines (ringX.peer). GroupComm.all_to_all delivers every chunk to its rank."""
import pytest
import torch
import torch.distributed as dist

from launcher import spawn
from ringX.comm import GroupComm, broadcast_rounds
from ringX.peer import PeerWorkspace


def _rounds(rank, world_size, device, own_first, comm=None, shape=(3, 5)):
    comm = comm or GroupComm(None if world_size == 1 else dist.group.WORLD)
    local = torch.full(shape, float(rank), device=device)
    seen, total = [], torch.zeros(shape, device=device)
    for owner, t in broadcast_rounds(comm, local, own_first=own_first):
        assert torch.equal(t, torch.full_like(t, float(owner))), (owner, t)
        seen.append(owner)
        total += t                                 # work on the received tensor, queued in order
        if not own_first or comm.peer is not None:  # these orders allow the caller's collectives
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


def _all_to_all(rank, world_size, device):
    comm = GroupComm(None if world_size == 1 else dist.group.WORLD)
    for dtype in (torch.float32, torch.bfloat16):
        # inp[i] on rank j holds 10 * j + i (+ a ramp; exact in bf16), so out[j] on rank i must hold it
        ramp = torch.arange(6, device=device, dtype=dtype).view(2, 3)
        inp = torch.stack([ramp + 10 * rank + i for i in range(world_size)])
        out = torch.full_like(inp, -1.0)
        comm.all_to_all(out, inp, async_op=False)
        want = torch.stack([ramp + 10 * j + rank for j in range(world_size)])
        assert out.dtype == dtype and torch.equal(out, want), (rank, dtype, out)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_all_to_all_delivers_every_chunk(world_size):
    if world_size == 1:
        _all_to_all(0, 1, torch.device("cpu"))
    else:
        spawn(world_size, _all_to_all)


def _copy_rounds(rank, world_size, device):
    comm = GroupComm(dist.group.WORLD)
    comm.peer = PeerWorkspace(comm)
    # several calls (the two staging slots alternate), a larger tensor (the workspace grows), a
    # long one (pulls of several pages), both orders
    for own_first, shape in [(False, (3, 5)), (True, (3, 5)), (False, (3, 5)), (True, (1 << 20,)),
                             (False, (4, 1 << 20))]:
        _rounds(rank, world_size, device, own_first, comm, shape)
    assert comm.peer.nbytes == 2 * (16 << 20)          # two slots of the largest tensor, 2 MiB pages


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_copy_transport_rounds(world_size):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"the copy transport needs {world_size} GPUs")
    spawn(world_size, _copy_rounds)
