"""Inference over a context-parallel group: ring prefill into a sequence-sharded KV cache, and
exact decoding from it with one collective per layer.

The cache. Each rank of the cp group holds its share of the sequence's keys and values, per
layer: (batch, capacity, kv_heads, head_dim) buffers of which the first ``lengths[rank]`` rows
are filled. Keys are stored after RoPE, so their order inside a shard does not matter: every
query that reads the cache comes after every cached key (a prefill chunk, a decode step) and
attends all of them, and softmax attention does not depend on the order of its keys. Memory per
rank is O((prompt + new tokens) / N).

Prefill (``prefill_attention``): a chunk of the prompt, sharded over the group in the layout of
the ringX function, attends causally to itself through that function (forward only, no autograd
state) and fully to everything cached before it: every rank attends all ranks' chunk queries
(gathered once) to its own cache shard, and the partial (out, lse) of each query go back to the
rank that holds it (one all-to-all) and are merged there in float32, in rank order. The chunk's
real (not padding) keys and values are then appended to each rank's shard, so the shares stay
what the layout gives: balanced.

Decode (``decode_attention``): the new tokens' queries, keys and values are the same on every
rank (the model runs the step on every rank). Their keys and values go to one rank's shard
(``owner_of_step``: the rank with the fewest, lowest rank first), every rank attends the queries
to its shard, and the partial (out, lse) of all ranks are gathered (one all-gather) and merged
in float32 in rank order, the same on every rank: tree-style, latency independent of the ring
length.

Shapes: q (batch, s, heads, head_dim), k/v (batch, s, kv_heads, head_dim); grouped-query
attention stays unexpanded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import GroupComm
from .kernels import get_backend, select_backend, select_band_backend
from .layout import global_positions
from .merge import merge_, new_accumulators


@dataclass
class ShardedKVCache:
    """One rank's part of a sequence-sharded KV cache: ``k[layer]``, ``v[layer]`` (batch,
    capacity, kv_heads, head_dim) of which rows [0, lengths[rank]) hold keys/values, and the
    fill of every rank (``lengths``, the same list on every rank)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    lengths: list[int]
    rank: int

    @classmethod
    def empty(cls, n_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
              rank: int, world_size: int, dtype: torch.dtype, device) -> "ShardedKVCache":
        """A cache for ``capacity`` tokens per rank (e.g. ceil(total tokens / N) + 1)."""
        def buf():
            return torch.empty(batch, capacity, kv_heads, head_dim, dtype=dtype, device=device)
        return cls([buf() for _ in range(n_layers)], [buf() for _ in range(n_layers)],
                   [0] * world_size, rank)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def local(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's filled keys and values of ``layer``: (batch, lengths[rank], kv_heads, d)."""
        n = self.lengths[self.rank]
        return self.k[layer][:, :n], self.v[layer][:, :n]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append (batch, s, kv_heads, d) keys/values to this rank's shard of ``layer`` (at
        rows lengths[rank]...; ``advance`` moves the fill once every layer is written)."""
        n, s = self.lengths[self.rank], k.shape[1]
        if n + s > self.capacity:
            raise RuntimeError(f"KV cache shard full: {n} + {s} tokens > capacity {self.capacity} "
                               "(size the cache for the prompt plus every new token)")
        self.k[layer][:, n:n + s] = k
        self.v[layer][:, n:n + s] = v

    def advance(self, added: list[int]) -> None:
        """Every rank's fill grows by ``added[rank]`` (after all layers were written)."""
        self.lengths = [a + b for a, b in zip(self.lengths, added)]

    def advance_decoded(self, tokens: int = 1) -> None:
        """After a decode step of ``tokens`` new tokens (every layer written by
        decode_attention): their rank's fill grows."""
        self.lengths[owner_of_step(self.lengths)] += tokens


def owner_of_step(lengths: list[int]) -> int:
    """The rank that takes the next decoded token's keys/values: the one holding the fewest
    (lowest rank first), so the shares stay within one token of each other after prefill."""
    return min(range(len(lengths)), key=lambda r: (lengths[r], r))


def _partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Full attention of q to the keys k/v -> (out float32, lse float32
    (b, h, s)); no keys: out 0, lse -inf. A block the fast kernel refuses (cuDNN: one query
    against one key) runs on the math backend."""
    if k.shape[1] == 0:
        return new_accumulators(q, torch.float32)
    backend = select_backend(q, k)
    if not backend.takes_shape(q.shape[1], k.shape[1]):          # float32 inputs: a float32 out
        backend, q, k, v = get_backend("math"), q.float(), k.float(), v.float()
    out, lse = backend.forward(q, k, v, False, scale)
    return out.float(), lse.float()


def _merge(outs: torch.Tensor, lses: torch.Tensor, dtype: torch.dtype, first=None):
    """Merge partials (n, b, s, h, d) / (n, b, h, s) in order, onto the partial ``first`` (out,
    lse) when given -> (out in dtype, lse float32)."""
    out, lse = new_accumulators(outs[0], torch.float32) if first is None else \
        (first[0].float(), first[1].float().clone())
    for o, l in zip(outs, lses):
        merge_(out, lse, o, l)
    return out.to(dtype), lse


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: ShardedKVCache,
                     layer: int, group=None, scale: float | None = None) -> torch.Tensor:
    """Attention of new tokens (the same on every rank: q (b, t, h, d), k/v (b, t, hk, d); each
    attends every cached key, the other new tokens before it, and itself) over the sharded
    cache; their keys/values are written to the shard of ``owner_of_step`` (call
    ``cache.advance_decoded`` after the last layer). Returns out (b, t, h, d), the same on every rank.

    One kernel call per rank: the owner appends the new keys first and attends its whole shard
    with flash-attn's bottom-right causal window (query i of t sees every cached key and new
    keys 0..i), the others attend their shard fully. The call goes to the window kernel
    (PyTorch's flash kernel on GPUs: any key length, no per-shape plan as cuDNN builds for every
    new cache length, and its own split over the keys for a single query row: at 128K keys
    0.15 ms against 0.11 ms of cache reading at the memory bandwidth on an H200)."""
    comm = GroupComm(group)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    owner = cache.rank == owner_of_step(cache.lengths)
    if owner:
        cache.write(layer, k, v)
        n = cache.lengths[cache.rank] + q.shape[1]
        ck, cv = cache.k[layer][:, :n], cache.v[layer][:, :n]
    else:
        ck, cv = cache.local(layer)
    if ck.shape[1] == 0:                                 # an empty shard: sees nothing
        out, lse = new_accumulators(q, torch.float32)
    else:
        band = select_band_backend(q, ck, select_backend(q, ck))
        out, lse = band.forward_band(q, ck, cv, -1, 0 if owner else -1, scale)
    if comm.size == 1:
        return out.to(q.dtype)
    t = q.shape[1]
    b, _, h, d = q.shape
    packed = torch.cat([out.float().reshape(-1), lse.float().reshape(-1)])
    gathered = torch.empty((comm.size, packed.numel()), dtype=packed.dtype, device=packed.device)
    comm.all_gather(gathered, packed, async_op=False)
    outs = gathered[:, :out.numel()].reshape(comm.size, b, t, h, d)
    lses = gathered[:, out.numel():].reshape(comm.size, b, h, t)
    return _merge(outs, lses, q.dtype)[0]


class StaticDecode:
    """Decode attention of one new token per sequence at world size 1 whose tensors never
    change shape or address, so a whole decode step can be captured in a CUDA graph and
    replayed (the host then launches one graph per token instead of every kernel of every
    layer). The cache fill lives on the device: ``set_fill(n)`` before each step (n keys
    cached), then ``attention`` per layer writes the token's keys/values at row n with
    ``index_copy_`` and attends rows [0, n] through flash-attn's varlen kernel with
    ``seqused_k`` (the kernel reads the lengths on the device). CUDA only."""

    def __init__(self, cache: ShardedKVCache, batch: int, device):
        if len(cache.lengths) != 1:
            raise ValueError(f"StaticDecode runs at world size 1 (this cache is sharded over {len(cache.lengths)} ranks)")
        self.cache = cache
        self.slot = torch.zeros(1, dtype=torch.long, device=device)        # the new token's row
        self.used = torch.zeros(batch, dtype=torch.int32, device=device)   # keys per sequence
        self.cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.cu_k = self.cu_q * cache.capacity

    def set_fill(self, n: int) -> None:
        """The step about to run attends n cached keys and its own (no host synchronisation)."""
        if n + 1 > self.cache.capacity:
            raise RuntimeError(f"KV cache shard full: {n} + 1 tokens > capacity {self.cache.capacity}")
        self.slot.fill_(n)
        self.used.fill_(n + 1)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                  scale: float | None = None) -> torch.Tensor:
        """q (b, 1, h, d), k/v (b, 1, hk, d) -> out (b, 1, h, d)."""
        b, _, h, d = q.shape
        kc, vc = self.cache.k[layer], self.cache.v[layer]                  # (b, capacity, hk, d)
        kc.index_copy_(1, self.slot, k)
        vc.index_copy_(1, self.slot, v)
        cap, hk = kc.shape[1], kc.shape[2]
        out = torch.ops.aten._flash_attention_forward(
            q.reshape(b, h, d), kc.view(b * cap, hk, d), vc.view(b * cap, hk, d), self.cu_q, self.cu_k, 1, cap,
            0.0, False, False, scale=q.shape[-1] ** -0.5 if scale is None else scale, seqused_k=self.used)[0]
        return out.view(b, 1, h, d)


def chunk_layout(fn_layout: str, chunk: int, real: int, rank: int, world_size: int, device=None):
    """For a prefill chunk of ``chunk`` tokens (a multiple of the layout's parts) of which the
    first ``real`` are prompt tokens: this rank's chunk-local positions (chunk/N,) and the mask
    of its rows that are real (the rest is padding at the chunk's end)."""
    pos = global_positions(fn_layout, chunk, rank, world_size, device=device)
    return pos, pos < real


def prefill_attention(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: ShardedKVCache,
                      layer: int, real_rows: torch.Tensor, group=None,
                      scale: float | None = None) -> torch.Tensor:
    """One layer of a prefill chunk: this rank's shard q (b, c/N, h, d), k/v (b, c/N, hk, d) of
    the chunk, in the layout of the ringX function ``fn`` (e.g. ringX.ringX3_attn_func). The
    chunk attends causally to itself (through ``fn``, forward only) and fully to the cache;
    its rows where ``real_rows`` (c/N,) bool holds are appended to this rank's cache shard (call
    ``cache.advance`` after the last layer). Returns out (b, c/N, h, d)."""
    comm = GroupComm(group)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse, _ = fn(q, k, v, softmax_scale=scale, causal=True, group=group, return_attn_probs=True)
    if any(cache.lengths):
        b, s, h, d = q.shape
        q_all = torch.empty((comm.size,) + tuple(q.shape), dtype=q.dtype, device=q.device)
        comm.all_gather(q_all, q.contiguous(), async_op=False)           # every rank's chunk queries
        ck, cv = cache.local(layer)
        part_o, part_l = _partial(q_all.transpose(0, 1).reshape(b, comm.size * s, h, d), ck, cv, scale)
        part_o = part_o.reshape(b, comm.size, s, h, d).transpose(0, 1)     # (n, b, s, h, d)
        part_l = part_l.reshape(b, h, comm.size, s).permute(2, 0, 1, 3)    # (n, b, h, s)
        recv = comm.all_to_all_new(torch.cat([part_o.reshape(comm.size, -1), part_l.reshape(comm.size, -1)],
                                             dim=1))      # recv[j]: rank j's partials for my rows
        n_o = b * s * h * d
        outs = recv[:, :n_o].reshape(comm.size, b, s, h, d)
        lses = recv[:, n_o:].reshape(comm.size, b, h, s)
        out = _merge(outs, lses, q.dtype, first=(out, lse))[0]
    keep = real_rows.nonzero().flatten()
    cache.write(layer, k[:, keep], v[:, keep])
    return out
