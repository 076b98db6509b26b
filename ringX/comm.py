"""The collective layer: asynchronous collectives on ANY process group, addressed by group rank.

``GroupComm`` wraps one torch.distributed process group (NCCL, RCCL, gloo; the default group, a
sub-group, or a strided sub-group such as ranks {0, 2} of 4). Every method takes *group* ranks and
translates them to the global ranks torch.distributed expects, so callers never confuse the two.
Each method returns a work handle (or None when nothing had to be sent); ``wait`` accepts either.
On NCCL the collectives run on the process group's own CUDA stream, ordered after the work already
queued on the current stream, so posting the next step's collective before computing the current
block overlaps communication with compute; on gloo they run on its worker threads.

A group of size 1 needs no communication: every method degenerates to a local copy or a no-op.
When torch.distributed is not initialised and no group is given, ``GroupComm(None)`` is that
group of size 1, so the ringX functions also run as plain attention in a single process.

A group given as ``NodeGroups`` (``node_groups(group, per_node)``) runs its all-gathers and
reduce-scatters in two levels (the hierarchical ringX3 of the seed's 2-D all-gather): an
all-gather first across nodes among the ranks at the same place of each node (each rank's data
crosses the network once, on its own link), then inside each node; a reduce-scatter first inside
each node, then across. Everything else goes over the whole group as before.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist


def wait(work) -> None:
    """Wait for a handle returned by a GroupComm method (None: nothing to wait for)."""
    if work is not None:
        work.wait()


class _Then:
    """A work handle that runs ``then()`` (queued on the current stream) once ``work`` is done."""

    def __init__(self, work, then):
        self.work, self.then = work, then

    def wait(self):
        wait(self.work)
        self.then()


def wait_all(works) -> None:
    """Wait for every handle of a list (GroupComm.exchange's, or any GroupComm method's)."""
    for work in works:
        wait(work)


@dataclass(frozen=True)
class NodeGroups:
    """A process group seen as nodes of ``per_node`` consecutive group ranks (group rank =
    node * per_node + place): ``group`` (all of them), ``inner`` (this rank's node) and
    ``outer`` (the ranks at this rank's place in every node). Made by ``node_groups``; pass it
    as ``group=`` to ringX3 (the hierarchical ringX3) so that each rank's k/v cross the network
    once, to the ranks at its place of the other nodes, and spread inside each node over NVLink."""

    group: "dist.ProcessGroup"
    inner: "dist.ProcessGroup"
    outer: "dist.ProcessGroup"
    per_node: int


def node_groups(group=None, per_node: int = 8) -> NodeGroups:
    """``group`` (default: the world) cut into nodes of ``per_node`` consecutive group ranks
    (launchers number the ranks of a node consecutively). Collective: every rank of the world
    calls it (it creates the sub-groups), with the same arguments."""
    from .parallel import rank_levels
    group = group if group is not None else dist.group.WORLD
    nodes, places = rank_levels(dist.get_process_group_ranks(group), per_node)
    me = dist.get_rank()
    mine = []
    for level in (nodes, places):
        for members in level:
            g = dist.new_group(members)
            if me in members:
                mine.append(g)
    return NodeGroups(group, mine[0], mine[1], per_node)


class GroupComm:
    """Collectives on one process group.

    Attributes: ``group`` (the process group, or None for a process without torch.distributed),
    ``rank`` (this process's group rank), ``size`` (group size), ``global_ranks`` (group rank ->
    global rank), ``peer`` (None, or the group's ringX.peer.PeerWorkspace: broadcast_rounds then
    copies through the copy engines instead of posting broadcasts), ``tally`` (None, or the
    GroupState that counts the payload bytes this rank puts on the wire: a broadcast's source its
    tensor, a reduce's contributors theirs, all-gather its input, reduce-scatter and all-to-all
    the (N-1)/N of the input that leaves, point-to-point its sends; copy-engine pulls are not
    counted).
    """

    def _sent(self, nbytes: int) -> None:
        if self.tally is not None:
            self.tally.sent_bytes += int(nbytes)

    def __init__(self, group: "dist.ProcessGroup | NodeGroups | None" = None):
        self.peer = None    # a ringX.peer.PeerWorkspace when broadcasts go through the copy engines
        self.tally = None   # a GroupState whose sent_bytes counts this rank's data messages
        self.levels = None  # (inner, outer) GroupComm of a NodeGroups: two-level gathers
        if isinstance(group, NodeGroups):
            self.levels = (GroupComm(group.inner), GroupComm(group.outer))
            group = group.group
        if group is None and not dist.is_initialized():
            self.group, self.rank, self.size, self.global_ranks = None, 0, 1, [0]
            return
        if not dist.is_initialized():
            raise RuntimeError("a process group was passed but torch.distributed is not initialized; "
                               "call ringX.launch.init_distributed() first")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError(
                f"global rank {dist.get_rank()} is not a member of the process group passed as "
                f"group= (its members are global ranks {dist.get_process_group_ranks(self.group)}); "
                "call the ringX function only on the ranks of the group you pass")
        self.size = dist.get_world_size(self.group)
        self.global_ranks = dist.get_process_group_ranks(self.group)

    def _levels(self) -> tuple["GroupComm", "GroupComm"]:
        """(inner, outer) of a two-level group, counting their bytes in this group's tally."""
        for level in self.levels:
            level.tally = self.tally
        return self.levels

    @property
    def backend(self) -> str:
        return "none" if self.group is None else str(dist.get_backend(self.group))

    def collective_device(self) -> torch.device:
        """Where small control tensors must live for this group's backend."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def broadcast(self, tensor: torch.Tensor, src: int, async_op: bool = True):
        """Broadcast ``tensor`` from group rank ``src`` into ``tensor`` on every other rank."""
        if self.size == 1:
            return None
        self._sent(tensor.nbytes if src == self.rank else 0)
        return dist.broadcast(tensor, src=self.global_ranks[src], group=self.group, async_op=async_op)

    def reduce(self, tensor: torch.Tensor, dst: int, op=dist.ReduceOp.SUM, async_op: bool = True):
        """Reduce ``tensor`` of every rank into ``tensor`` on group rank ``dst``."""
        if self.size == 1:
            return None
        self._sent(tensor.nbytes if dst != self.rank else 0)
        return dist.reduce(tensor, dst=self.global_ranks[dst], op=op, group=self.group, async_op=async_op)

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, async_op: bool = True):
        if self.size == 1:
            return None
        self._sent(tensor.nbytes)
        return dist.all_reduce(tensor, op=op, group=self.group, async_op=async_op)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = True):
        """out: (size, *inp.shape), contiguous; out[i] receives group rank i's ``inp``."""
        if self.size == 1:
            out[0].copy_(inp)
            return None
        if self.levels is not None and 1 < self.levels[0].size < self.size:
            inner, outer = self._levels()
            across = torch.empty((outer.size,) + tuple(inp.shape), dtype=inp.dtype, device=inp.device)
            wait(outer.all_gather(across, inp))      # my place of every node: once over the network
            node = torch.empty((inner.size,) + tuple(across.shape), dtype=inp.dtype, device=inp.device)
            work = inner.all_gather(node, across)    # then every place of my node, over NVLink
            view = out.view((outer.size, inner.size) + tuple(inp.shape))
            return _Then(work, lambda: view.copy_(node.transpose(0, 1)))   # (place, node) -> rank order
        self._sent(inp.nbytes)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return gather(out.view(-1), inp.reshape(-1), group=self.group, async_op=async_op)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = True):
        """inp: (size, *out.shape), both contiguous; ``out`` on group rank i receives the sum of
        every rank's inp[i]."""
        if self.size == 1:
            out.copy_(inp[0])
            return None
        if self.levels is not None and 1 < self.levels[0].size < self.size:
            inner, outer = self._levels()
            by_place = inp.view((outer.size, inner.size) + tuple(out.shape)).transpose(0, 1).contiguous()
            mine = torch.empty((outer.size,) + tuple(out.shape), dtype=inp.dtype, device=inp.device)
            wait(inner.reduce_scatter(mine, by_place))   # my node's sum for my place of every node
            return outer.reduce_scatter(out, mine, async_op=async_op)   # then once over the network
        self._sent(inp.nbytes * (self.size - 1) // self.size)
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return scatter(out.view(-1), inp.reshape(-1), group=self.group, async_op=async_op)

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = True):
        """inp, out: (size, *chunk), both contiguous; out[j] on group rank i receives group rank
        j's inp[i]. Moves data only (any dtype): a receiver that sums the chunks chooses the
        precision of the sum."""
        if not (out.is_contiguous() and inp.is_contiguous()):
            raise ValueError("GroupComm.all_to_all needs contiguous buffers (a strided one would be "
                             "filled as if it were contiguous)")
        if self.size == 1:
            out.copy_(inp)
            return None
        self._sent(inp.nbytes * (self.size - 1) // self.size)
        return dist.all_to_all_single(out, inp, group=self.group, async_op=async_op)

    def all_to_all_new(self, chunks: torch.Tensor) -> torch.Tensor:
        """Blocking all_to_all into a new tensor: chunks (size, ...), chunk j for group rank j
        -> (size, ...), chunk j from group rank j."""
        send = chunks.contiguous()
        recv = torch.empty_like(send)
        self.all_to_all(recv, send, async_op=False)
        return recv

    def exchange(self, sends: list, recvs: list) -> list:
        """Post point-to-point sends [(tensor, dst)] and receives [(tensor, src)] (group ranks,
        contiguous tensors) as one batch; returns their work handles (see wait_all). Every rank
        must post its batches in the same order, each batch's sends matched by its peers'
        receives in theirs."""
        if self.size > 1:
            self._sent(sum(t.nbytes for t, _ in sends))
        ops = ([dist.P2POp(dist.isend, t, self.global_ranks[p], self.group) for t, p in sends]
               + [dist.P2POp(dist.irecv, t, self.global_ranks[p], self.group) for t, p in recvs])
        return dist.batch_isend_irecv(ops) if ops and self.size > 1 else []

    def all_gather_small(self, values: torch.Tensor) -> torch.Tensor:
        """Blocking all-gather of a small 1-D int64 tensor -> (size, len) on the CPU."""
        if self.size == 1:
            return values.view(1, -1).cpu()
        dev = self.collective_device()
        out = torch.empty((self.size, values.numel()), dtype=values.dtype, device=dev)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out.view(-1), values.to(dev), group=self.group)      # a control message: not tallied
        return out.cpu()


def broadcast_rounds(comm: GroupComm, local: torch.Tensor, own_first: bool = False,
                     owners=None):
    """Yield (owner, tensor) once for every owner group rank, where tensor is that rank's ``local``.

    ``owners`` (the same set on every rank; default all): the ranks whose tensor is broadcast.
    A rank outside it still gets its own round (no message); the other ranks skip it. Masked
    schedules leave out owners whose tensor no other rank needs.

    Broadcasts are posted in owner order 0 .. size-1 and received into B buffers (the k-th
    foreign owner's into buffer k % B). A buffer is reused only after the caller's work on it was
    queued (stream order on GPUs, program order on CPUs), so it is never overwritten while in
    use.

    own_first=False (B = 2): owners in order 0 .. size-1; owner i+1's broadcast is posted just
    before owner i is yielded, at the same point on every rank, so the caller may post its own
    collectives on the group inside the loop (ringX1's reduces). The owner, too, waits for its
    own send before its round: its block would otherwise take the SMs before the send starts and
    hold every other rank back by a block (measured on the ViT, 2 x H200).

    own_first=True (B = 3): this rank's own tensor first (no wait), its work running while the
    first broadcasts travel (posted before it, so they hold their SMs first), then the other
    owners in order; each broadcast is posted as soon as its buffer is free. A broadcast starts
    only once every rank has freed its buffer, and a rank after the owner frees it one round
    later than a rank before it; the third buffer keeps one round of slack there, as two do in
    the plain order. Posting points differ between ranks, so the caller must post no other
    collective on the group inside the loop. (Schedules that reduce a result per owner keep the
    plain order anyway: with their own round first, the ranks would finish the last two
    owners' rounds together at the end.)
    """
    n, r = comm.size, comm.rank
    owners = range(n) if owners is None else sorted(owners)
    if comm.peer is not None and n > 1:               # pulls every owner; yields those asked for
        for i, t in _peer_rounds(comm, local, own_first):
            if i == r or i in owners:
                yield i, t
        return
    posted = [i for i in owners]                      # broadcasts, in owner order on every rank
    foreign = [i for i in posted if i != r]
    nbuf = min(len(foreign), 3 if own_first else 2)
    bufs = [torch.empty_like(local) for _ in range(nbuf)]
    into = {i: bufs[k % nbuf] for k, i in enumerate(foreign)}
    into[r] = local
    works: dict = {}

    def post(i: int) -> None:
        works[i] = comm.broadcast(into[i], src=i)

    if not own_first:
        order = sorted(set(posted) | {r})
        nxt = 0                                       # next index into posted
        if posted:
            post(posted[0])
            nxt = 1
        for i in order:
            if i in works:
                wait(works.pop(i))
                if nxt < len(posted):
                    post(posted[nxt])
                    nxt += 1
            yield i, into[i]
    else:
        nxt, used = 0, 0              # next index into posted; foreign owners already used
        for i in [r] + foreign:
            # post in owner order while the next owner is this rank or its buffer is free
            while nxt < len(posted) and (posted[nxt] == r or foreign.index(posted[nxt]) < used + nbuf):
                post(posted[nxt])
                nxt += 1
            if i != r:
                wait(works.pop(i))
            yield i, into[i]
            used += i != r
    for work in works.values():     # this rank's own send, if still in flight
        wait(work)


def _peer_rounds(comm: GroupComm, local: torch.Tensor, own_first: bool):
    """broadcast_rounds through comm.peer: after one staging barrier, each foreign owner's tensor
    is pulled from its slot by a device copy on the workspace's side stream into one of two
    buffers, as soon as the caller's work on that buffer is queued. No SMs, no collectives: the
    caller may post its own collectives inside the loop in either order."""
    ws, n, r = comm.peer, comm.size, comm.rank
    main = torch.cuda.current_stream()
    offset = ws.stage(comm, local)
    order = [r] + [i for i in range(n) if i != r] if own_first else list(range(n))
    foreign = [i for i in order if i != r]
    bufs = [torch.empty_like(local) for _ in range(min(n - 1, 2))]
    ready: dict = {}

    def pull(k: int) -> None:                       # k-th foreign owner into bufs[k % 2]
        ws.stream.wait_stream(main)                 # the staging barrier, and the buffer's last use
        with torch.cuda.stream(ws.stream):
            bufs[k % len(bufs)].copy_(ws.remote(foreign[k], local.shape, local.dtype, offset))
            ready[k] = torch.cuda.Event()
            ready[k].record(ws.stream)

    for k in range(len(bufs)):
        pull(k)
    k = 0
    try:
        for i in order:
            if i == r:
                yield i, local
                continue
            main.wait_event(ready.pop(k))
            yield i, bufs[k % len(bufs)]
            if k + len(bufs) < len(foreign):
                pull(k + len(bufs))
            k += 1
    finally:                                        # a loop left early still owns its copies
        for event in ready.values():
            main.wait_event(event)


class GroupState:
    """What ringX keeps between calls for one process group: the input signatures already
    checked, the copy transport's workspace (ringX.peer.PeerWorkspace) once one is made, and the
    bytes this rank has sent (ringX.api.bytes_sent)."""

    def __init__(self):
        self.checked: set = set()
        self.peer = None
        self.sent_bytes = 0     # payload bytes this rank sent in ringX calls on the group


class GroupStates:
    """GroupState per process group, keyed weakly by the group object, so entries vanish with
    their group. ringX.api owns the one instance (the only state ringX keeps between calls)."""

    def __init__(self):
        self._by_group: "weakref.WeakKeyDictionary[dist.ProcessGroup, GroupState]" = weakref.WeakKeyDictionary()
        self._solo = GroupState()

    def of(self, comm: GroupComm) -> GroupState:
        if comm.group is None:
            return self._solo
        return self._by_group.setdefault(comm.group, GroupState())
