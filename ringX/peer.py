"""Copy-engine transport: a group's broadcasts as peer-to-peer copies over CUDA symmetric memory.

A collective (NCCL's broadcast) runs as a kernel. Posted while an attention kernel runs, it waits
for that kernel's last wave; posted before, it holds SMs that the attention kernel then lacks. A
copy between two GPUs of one node can run on the copy engines instead, using no SMs at all.

``PeerWorkspace`` is one group's symmetric staging buffer, mapped into every rank of the group.
Each call that broadcasts (one ``broadcast_rounds`` loop) copies its local tensor into one of two
slots, the slots alternating from call to call, and passes one barrier; after that barrier every
rank pulls the owners' tensors from their slots with plain device copies on a side stream, each
gated only by local events (the barrier is the only cross-rank synchronisation of the call).

Why two slots are enough: a rank's barrier of call c runs after all of its pulls of call c-1 (its
stream waited for each of them), so once the barrier of call c is passed, no rank reads the slot
of call c-1 any more; call c+1 writes that slot only after it.

All ranks of the group must share one node (CUDA, NVLink or PCIe peer access) and call in the same
order, as they must for any collective. ``RINGX_TRANSPORT=copy`` selects this transport; ringX
checks once per group that every rank can use it and raises a ValueError on every rank if not.
"""
from __future__ import annotations

import importlib
import os
import socket
import zlib

import torch

BARRIER_TIMEOUT_MS = 600_000   # a rank that never arrives traps the barrier instead of hanging it


def _host_id() -> int:
    return zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF


def usable_here(comm) -> str:
    """Why this rank cannot use the copy transport ('' when it can)."""
    if comm.backend != "nccl":
        return f"the group's backend is {comm.backend}, not nccl"
    if torch.version.hip is not None:
        return "ROCm: the copy transport is CUDA-only"
    try:
        importlib.import_module("torch.distributed._symmetric_memory")
    except ImportError as exc:
        return f"no CUDA symmetric memory in this torch ({exc})"
    return ""


class PeerWorkspace:
    """The symmetric staging buffer of one group (two slots) and its copy stream.

    ``stage(comm, local)`` copies local into this call's slot and passes the group barrier, both
    on the current stream, and returns the slot's offset; ``remote(owner, shape, dtype, offset)``
    is owner's staged tensor at that offset, readable with a device copy. The workspace keeps no
    reference to the group, so it can live in a table keyed weakly by the group.
    """

    def __init__(self, comm):
        reason = usable_here(comm)
        table = comm.all_gather_small(torch.tensor([int(bool(reason)), _host_id()], dtype=torch.int64))
        bad = [r for r in range(comm.size) if table[r, 0]]
        if bad or len(set(table[:, 1].tolist())) > 1:
            why = (f"rank {comm.rank}: {reason}" if reason else
                   f"ranks {bad} cannot use it" if bad else "the group spans more than one node")
            raise ValueError(f"RINGX_TRANSPORT=copy needs every rank of the group on one node with "
                             f"NCCL and CUDA; {why}. Unset RINGX_TRANSPORT to use collectives.")
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self.slot_bytes = 0
        self.calls = 0
        self.buffer = self.handle = None

    @property
    def nbytes(self) -> int:
        """Device memory held by the staging buffer (both slots)."""
        return 2 * self.slot_bytes

    def _grow(self, comm, nbytes: int) -> None:
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem
        if self.buffer is not None:         # peers may still read the old buffer: drain first
            torch.cuda.synchronize(self.device)
            dist.barrier(group=comm.group, device_ids=[self.device.index])
            torch.cuda.synchronize(self.device)
        slot = -(-nbytes // (2 << 20)) * (2 << 20)                     # whole 2 MiB pages
        self.buffer = symm_mem.empty(2 * slot, dtype=torch.uint8, device=self.device)
        self.handle = symm_mem.rendezvous(self.buffer, comm.group)
        self.slot_bytes = slot

    def stage(self, comm, local: torch.Tensor) -> int:
        """Copy ``local`` into this call's slot, wait (on the current stream) until every rank of
        the group has staged its own, and return the slot's byte offset."""
        nbytes = local.numel() * local.element_size()
        if nbytes > self.slot_bytes:
            self._grow(comm, nbytes)
        self.calls += 1
        offset = (self.calls % 2) * self.slot_bytes
        self.remote(comm.rank, local.shape, local.dtype, offset).copy_(local)
        self.handle.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)
        return offset

    def remote(self, owner: int, shape, dtype, offset: int) -> torch.Tensor:
        """Group rank ``owner``'s tensor staged at byte ``offset`` (a view of its device memory)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.handle.get_buffer(owner, tuple(shape), dtype, offset // itemsize)


TRANSPORTS = ("collective", "copy")
ENV_VAR = "RINGX_TRANSPORT"


def requested_transport() -> int:
    """$RINGX_TRANSPORT as an index into TRANSPORTS (unset: collective), -1 if invalid."""
    name = os.environ.get(ENV_VAR) or "collective"
    return TRANSPORTS.index(name) if name in TRANSPORTS else -1
