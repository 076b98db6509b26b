"""Context parallelism for the Llama app: shard a batch in the layout of the chosen ringX
function, bind that function to the cp group, and compute the exact mean loss over the whole
sequence.

Gradients: each cp rank back-propagates the loss of its own tokens (divided by the *global*
token count), so the full gradient of a weight is the SUM over cp ranks of their gradients;
``ringX.parallel.reduce_gradients`` all-reduces them over the group that shares the weights (cp, or dp x cp).
"""
from __future__ import annotations

import functools
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from ringX import ATTN_FUNCS, VARLEN_FUNCS, ContextParallel
from ringX.hf import mean_over_group

from app.common import sharding
from app.common.sharding import Checkpointed
from app.common.weights import canonical_name, copy_parameters

from .model import Llama

ATTN_CHOICES = tuple(ATTN_FUNCS) + ("sdpa",)
# With tensor parallelism the attention heads arriving here are this tp rank's share; the cp
# group is the set of ranks holding the same heads for other parts of the sequence.


def context(attn: str, cp_group, inner=None) -> ContextParallel:
    """``attn`` bound to ``cp_group`` (ringX.ContextParallel); ``inner``: (inner group, outer
    group) of a two-level cp group. Attentions that are not ringX functions ("sdpa", one cp rank
    only) take the contiguous layout."""
    return ContextParallel(attn if attn in ATTN_FUNCS else "ringX1", cp_group, inner=inner)


def cp_attention(attn: str, cp_group, as_op: bool = False, inner=None):
    """The attention function for the model: a ringX function bound to ``cp_group`` (causal).
    ``as_op``: call it through the custom op ``ringx::attention`` in eager mode too, so that a
    selective checkpointing policy sees one op whose outputs it can keep (``--ac attention``).
    ``inner``: (inner group, outer group) of a two-level cp group: heads over the inner group
    by all-to-all, then the function over the outer group (ringX.hybrid)."""
    if attn not in ATTN_FUNCS:
        raise ValueError(f"attention {attn!r} is not a ringX function; valid: {', '.join(ATTN_FUNCS)}")
    cp = context(attn, cp_group, inner)
    return functools.partial(cp.attention, causal=True, **({} if inner is not None else {"as_op": as_op}))


def packed_attention(attn: str, cp_group, cu_rows: list[list[int]], as_op: bool = False):
    """The attention function for a batch of packed sequences: row b of (B, S/N, h, d) q/k/v is
    this rank's shard of one packed sequence whose global document boundaries are cu_rows[b];
    each document attends only to itself (causal), through the ringX varlen function
    (``as_op``: through the custom op, as cp_attention)."""
    if attn not in VARLEN_FUNCS:
        raise ValueError(f"attention {attn!r} is not a ringX function; valid: {', '.join(VARLEN_FUNCS)}")
    cp = context(attn, cp_group)
    cus = [torch.tensor(cu, dtype=torch.int32) for cu in cu_rows]
    longest = [max(b - a for a, b in zip(cu, cu[1:])) for cu in cu_rows]

    def attend(q, k, v):
        return torch.stack([cp.varlen_attention(q[b], k[b], v[b], cus[b], longest[b], causal=True, as_op=as_op)
                            for b in range(q.shape[0])])
    return attend


def cp_positions(attn: str, seqlen: int, cp_group, cp_inner: int = 1, device=None) -> torch.Tensor:
    """Global positions (S/N,) of the tokens this cp rank holds in the layout ``attn`` expects
    (with ``cp_inner`` > 1: the two-level layout of ringX.hybrid, inner rank = cp rank mod
    cp_inner, as ringX.parallel.ParallelDims builds the groups)."""
    if cp_inner > 1:
        from ringX.hybrid import hybrid_positions
        n, r = dist.get_world_size(cp_group), dist.get_rank(cp_group)
        return hybrid_positions(attn, seqlen, r % cp_inner, cp_inner, r // cp_inner, n // cp_inner, device=device)
    return context(attn, cp_group).positions(seqlen, device=device)


def shard_batch(tokens: torch.Tensor, labels: torch.Tensor, attn: str, cp_group, cp_inner: int = 1):
    """Global (B, S) tokens/labels -> this cp rank's (B, S/N) tokens, labels and (S/N,) global
    positions, in the layout ``attn`` expects (two-level with ``cp_inner`` > 1)."""
    pos = cp_positions(attn, tokens.shape[1], cp_group, cp_inner, tokens.device)
    return tokens.index_select(1, pos).contiguous(), labels.index_select(1, pos).contiguous(), pos


def draw_positions(seq_len: int, limit: int, generator: torch.Generator) -> torch.Tensor:
    """Randomized positions: ``seq_len`` sorted distinct int64 positions drawn uniformly from
    [0, limit), so that a model trained at length ``seq_len`` sees relative distances up to
    ``limit``. The same generator state gives the same draw on every rank."""
    if limit < seq_len:
        raise ValueError(f"cannot draw {seq_len} distinct positions below {limit}")
    return torch.randperm(limit, generator=generator)[:seq_len].sort().values


def shard_positions(positions: torch.Tensor, attn: str, cp_group, cp_inner: int = 1) -> torch.Tensor:
    """This cp rank's part of global (S,) or (B, S) ``positions``, in the layout ``attn`` expects
    (two-level with ``cp_inner`` > 1)."""
    return positions.index_select(-1, cp_positions(attn, positions.shape[-1], cp_group, cp_inner,
                                                   positions.device))


def cp_loss(local_sum: torch.Tensor, labels: torch.Tensor, cp_group, ignore_index: int = -100):
    """Mean cross-entropy over every token of the whole sequence (all cp ranks), from this rank's
    summed cross-entropy ``local_sum`` (float32 scalar, ``Llama(..., labels=...)``) and its
    (B, S_local) ``labels``.

    Returns (loss to back-propagate on this rank, global mean loss as a detached tensor)."""
    return mean_over_group(local_sum, labels, cp_group, ignore_index)


# ---- model construction: activation checkpointing, FSDP2, sharded initialisation ------------

AC_MODES = ("none", "selective", "attention", "full")
DP_ENGINES = ("fsdp", "allreduce")


def apply_activation_checkpointing(model: Llama, mode: str, layers: int | None = None) -> Llama:
    """``full``: every block is recomputed in backward (only block inputs are kept);
    ``attention``: every block is recomputed except its attention, whose output and lse are kept
    (per block: the input, the attention output and a float32 lse; the projections, norms, RoPE
    and MLP are recomputed, the attention, the one piece that costs a whole ringX pass with its
    communication, is not); ``selective``: only the feed-forward is recomputed (everything of the
    attention half is kept); ``none``: nothing. ``layers``: only the first ``layers`` blocks are
    checkpointed (None: all); the others keep all their activations, which adds to the peak at
    the start of the backward (about 2 GB a block at Llama 3.2 1B shapes and 32K tokens) and
    saves their recomputation."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing {mode!r}: expected one of {', '.join(AC_MODES)}")
    n = len(model.layers)
    if layers is not None and (mode == "none" or not 0 <= layers <= n):
        raise ValueError(f"--ac_layers {layers}: needs --ac other than none and 0 <= ac_layers <= {n} "
                         f"(the number of blocks)")
    for i, block in enumerate(model.layers[:n if layers is None else layers]):
        if mode == "full":
            model.layers[i] = Checkpointed(block)
        elif mode == "attention":
            model.layers[i] = Checkpointed(block, context_fn=sharding.keep_attention_context)
        elif mode == "selective":
            block.feed_forward = Checkpointed(block.feed_forward)
    return model


def apply_fsdp(model: Llama, mesh, bf16: bool) -> Llama:
    """FSDP2 of the Llama blocks, the input embedding (gathered again for its backward), the
    final norm with the output head (kept from their forward to their backward, which follows at
    once), and the root over ``mesh`` (see app/common/sharding.apply_fsdp). One rank without
    activation checkpointing does not come here (train.unsharded_one_rank)."""
    return sharding.apply_fsdp(model, model.layers, mesh, bf16,
                               units=((model.tok_embeddings, True), ([model.norm, model.output], False)))


def materialize(model: Llama, tensors: Iterable[tuple[str, torch.Tensor]], device, tp_group) -> Llama:
    """Give a model built on the meta device (and already split by TP / wrapped / FSDP-sharded)
    real storage on ``device`` and fill it from ``tensors``: (plain-model name, FULL tensor)
    pairs, for example ``Llama.initial_tensors`` or ``hf.hf_tensors``. Each rank copies only its
    own tp slice and FSDP shard, so the result equals the unsharded model split afterwards."""
    from torch.distributed.tensor import DTensor
    from .tensor_parallel import shard_of
    model.to_empty(device=device)
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0

    def to_local(name, full, p):
        local = shard_of(name, full, tp_rank, tp).to(device)
        if not isinstance(p, DTensor):
            return p, local
        mesh = p.device_mesh             # FSDP2: dim-0 torch.chunk over the mesh, short last shards
        chunks, r = local.chunk(mesh.size(), dim=0), mesh.get_local_rank()
        return p.to_local(), chunks[r] if r < len(chunks) else local[:0]
    copy_parameters(model, tensors, "weights", to_local)
    return model


def full_tensors(model: nn.Module, tp_group=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(plain-model name, whole float32 CPU tensor) per parameter, gathering FSDP shards and
    tensor-parallel slices (collectives: every rank of the job must iterate)."""
    from torch.distributed.tensor import DTensor
    from .tensor_parallel import SPLIT
    for name, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        name = canonical_name(name)
        yield name, SPLIT.gather(name, t.detach().float(), tp_group).cpu()


def global_grad_norm(model: nn.Module, tp_group, shard_group) -> torch.Tensor:
    """The global gradient norm across tp slices and FSDP shards (app/common/sharding); the
    update clips by it (app/common/runtime.guarded_update)."""
    from .tensor_parallel import is_tp_sharded
    return sharding.global_grad_norm(model, tp_group, shard_group, is_tp_sharded)
