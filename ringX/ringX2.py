"""ringX2: causal context-parallel attention, contiguous layout, unbalanced.

The ringX1 schedules (broadcast q / all-reduce max / reduce [o w | w] forward; broadcast kv /
reduce dkv backward) with every block above the diagonal skipped: for owner i only ranks j <= i
compute, so rank N-1's queries do N blocks of work and rank 0's one. Use ringX3 or ringX4 for a
balanced causal load. With causal=False it computes what ringX1 does.
"""
from __future__ import annotations

from .api import Algorithm, ring_attention
from .ringX1 import bcast_kv_backward, bcast_q_forward

ALGORITHM = Algorithm(name="ringX2", code=2, layout="contiguous", forward=bcast_q_forward,
                      backward=bcast_kv_backward)


def ringX2_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                     alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None,
                     backend=None):
    """Causal attention over a contiguous split; arguments and returns as ringX1_attn_func."""
    return ring_attention(ALGORITHM, q, k, v, dropout_p, softmax_scale, causal, window_size,
                          alibi_slopes, deterministic, return_attn_probs, group, backend)
