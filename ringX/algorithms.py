"""The four ringX algorithms: each a layout and a choice of schedules (ringX.schedules), and
their public functions, dense and varlen.

| name   | layout                      | causal schedule              | full-attention schedule   |
|--------|-----------------------------|------------------------------|---------------------------|
| ringX1 | contiguous                  | paired (as ringX2)           | broadcast q / broadcast kv |
| ringX2 | contiguous                  | paired                       | broadcast q / broadcast kv |
| ringX3 | zigzag (or stripe)          | all-gather                   | all-gather (one call)     |
| ringX4 | zigzag (or stripe)          | broadcast kv / broadcast kv  | broadcast kv / broadcast kv |

On two ranks the broadcast schedules send each partial to its owner point to point
(schedules.broadcast_pair); on one rank every algorithm is the plain kernel (schedules.solo). Which schedule runs is decided here and nowhere else: ``choose_*``.
"""
from __future__ import annotations

from .api import Algorithm, RunContext, ring_attention
from .schedules.allgather import allgather_backward, allgather_forward
from .schedules.broadcast import bcast_kv_backward, bcast_kv_forward, bcast_q_forward
from .schedules.broadcast_pair import pair_kv_backward, pair_q_forward
from .schedules.paired import paired_backward, paired_forward
from .schedules.solo import solo_backward, solo_forward
from .varlen import varlen_attention


def _kv_backward(run: RunContext):
    return pair_kv_backward if run.comm.size == 2 else bcast_kv_backward


def _broadcast_q(run: RunContext):
    """Broadcast-q forward and broadcast-kv backward (two ranks: point-to-point partials)."""
    return (pair_q_forward if run.comm.size == 2 else bcast_q_forward), _kv_backward(run)


def _one_rank(choose):
    """On a group of one rank every algorithm is the plain kernel (schedules.solo)."""
    def chosen(run: RunContext):
        return (solo_forward, solo_backward) if run.comm.size == 1 else choose(run)
    chosen.__doc__ = choose.__doc__
    return chosen


@_one_rank
def choose_ringX1(run: RunContext):
    """Full attention: the broadcast schedules. Causal: the balanced paired schedule of the same
    contiguous layout (the broadcast one leaves each causal round to the ranks after its owner:
    0.54-0.61 of ideal on 4 GPUs)."""
    return choose_ringX2(run)


@_one_rank
def choose_ringX2(run: RunContext):
    if run.causal and run.comm.size > 1:
        return paired_forward, paired_backward
    return _broadcast_q(run)


@_one_rank
def choose_ringX3(run: RunContext):
    return allgather_forward, allgather_backward


@_one_rank
def choose_ringX4(run: RunContext):
    return bcast_kv_forward, _kv_backward(run)


RINGX1 = Algorithm(name="ringX1", code=1, layout="contiguous", choose=choose_ringX1)
RINGX2 = Algorithm(name="ringX2", code=2, layout="contiguous", choose=choose_ringX2)
RINGX3 = Algorithm(name="ringX3", code=3, layout="zigzag", choose=choose_ringX3,
                   other_layouts=("stripe",))
RINGX4 = Algorithm(name="ringX4", code=4, layout="zigzag", choose=choose_ringX4,
                   other_layouts=("stripe",))
ALGORITHMS = {a.name: a for a in (RINGX1, RINGX2, RINGX3, RINGX4)}


def ringX1_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                     alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                     backend=None):
    """Exact attention over a sequence split contiguously across the ranks of ``group``: the
    broadcast schedules for full attention, ringX2's balanced paired schedule for causal.

    Args:
        q: (batch, seqlen_local, heads, headdim); rank r of N holds tokens [r*S/N, (r+1)*S/N).
        k, v: (batch, seqlen_local, kv_heads, headdim), heads % kv_heads == 0 (GQA/MQA; k/v
            travel between ranks unexpanded).
        dropout_p: must be 0.0 (NotImplementedError otherwise).
        softmax_scale: default headdim ** -0.5.
        causal: mask keys after the query's global position. Causal blocks are square and
            aligned on the diagonal (query t sees keys 0..t of the global sequence)::

                q\\k  r0 r1 r2
                r0   \\  .  .        \\ = causal diagonal block, # = full block, . = skipped
                r1   #  \\  .
                r2   #  #  \\
        window_size: must be (-1, -1); alibi_slopes: must be None (NotImplementedError).
        deterministic: accepted; ringX's own reductions run in a fixed order, and kernel
            determinism follows torch.use_deterministic_algorithms.
        return_attn_probs: also return lse.
        group: any torch.distributed process group (strided sub-groups too); None = default
            group (or a single process when torch.distributed is not initialised).
        backend: force a local kernel backend by name (see ringX.kernels); default: the first
            that supports the inputs, or $RINGX_BACKEND.

    Returns:
        out (batch, seqlen_local, heads, headdim) in q's dtype, or (out, lse, None) with
        lse (batch, heads, seqlen_local) float32 (natural log) if return_attn_probs.
    """
    return ring_attention(RINGX1, q, k, v, dropout_p, softmax_scale, causal, window_size,
                          alibi_slopes, deterministic, return_attn_probs, group, backend)


def ringX1_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                            causal=False, window_size=(-1, -1), alibi_slopes=None,
                            deterministic=False, return_attn_probs=False, group=None,
                            backend=None):
    """ringX1 over (S/N, heads, headdim) shards of one packed sequence of documents with global
    ``cu_seqlens``; see ringX.varlen for the contract."""
    return varlen_attention(RINGX1, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                            causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                            group, backend)


def ringX2_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                     alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                     backend=None):
    """Causal attention over a contiguous split; arguments and returns as ringX1_attn_func."""
    return ring_attention(RINGX2, q, k, v, dropout_p, softmax_scale, causal, window_size,
                          alibi_slopes, deterministic, return_attn_probs, group, backend)


def ringX2_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                            causal=False, window_size=(-1, -1), alibi_slopes=None,
                            deterministic=False, return_attn_probs=False, group=None,
                            backend=None):
    """ringX2 over (S/N, heads, headdim) shards of one packed sequence of documents with global
    ``cu_seqlens``; see ringX.varlen for the contract."""
    return varlen_attention(RINGX2, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                            causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                            group, backend)


def ringX3_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                     alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                     backend=None, layout=None):
    """Causal attention over a zigzag split (rank r holds chunks r and 2N-1-r of 2N; see
    ringX.layout). Arguments and returns as ringX1_attn_func; seqlen_local must be even.
    layout="stripe" takes the striped layout instead (rank r holds tokens r, r+N, ...)."""
    return ring_attention(RINGX3, q, k, v, dropout_p, softmax_scale, causal, window_size,
                          alibi_slopes, deterministic, return_attn_probs, group, backend,
                          layout=layout)


def ringX3_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                            causal=False, window_size=(-1, -1), alibi_slopes=None,
                            deterministic=False, return_attn_probs=False, group=None,
                            backend=None, layout=None):
    """ringX3 over (S/N, heads, headdim) shards of one packed sequence of documents with global
    ``cu_seqlens``; see ringX.varlen for the contract."""
    return varlen_attention(RINGX3, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                            causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                            group, backend, layout=layout)


def ringX4_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                     alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                     backend=None, layout=None):
    """Causal attention over a zigzag split, broadcast-reduce schedule. Arguments and returns as
    ringX1_attn_func; seqlen_local must be even. layout="stripe" takes the striped layout
    instead (rank r holds tokens r, r+N, ...; see ringX.layout)."""
    return ring_attention(RINGX4, q, k, v, dropout_p, softmax_scale, causal, window_size,
                          alibi_slopes, deterministic, return_attn_probs, group, backend,
                          layout=layout)


def ringX4_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                            causal=False, window_size=(-1, -1), alibi_slopes=None,
                            deterministic=False, return_attn_probs=False, group=None,
                            backend=None, layout=None):
    """ringX4 over (S/N, heads, headdim) shards of one packed sequence of documents with global
    ``cu_seqlens``; see ringX.varlen for the contract."""
    return varlen_attention(RINGX4, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale,
                            causal, window_size, alibi_slopes, deterministic, return_attn_probs,
                            group, backend, layout=layout)
