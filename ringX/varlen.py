"""The varlen functions: one packed sequence of documents, split over the ranks of a group.

    ringX{1,2,3,4}_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0,
        softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
        deterministic=False, return_attn_probs=False, group=None, backend=None)

- q: (S/N, heads, headdim); k, v: (S/N, kv_heads, headdim): this rank's shard, in the function's
  layout (``ringX.expected_layout(fn)``), of ONE packed global sequence of S tokens.
- cu_seqlens: int32 tensor (num_docs + 1,) of GLOBAL document boundaries, the same on every rank
  (0 = cu[0] < ... < cu[-1] = S). Documents may have any length and cross any rank or chunk
  boundary; only S must divide by N (contiguous, stripe) or 2N (zigzag). A CPU tensor saves a
  device-to-host copy per call. max_seqlen: the longest document (checked, not trusted).
- window_size=(left, right): flash-attn's meaning over global positions: query i attends key j
  iff j is in i's document, j <= i when causal, and i - left <= j <= i + right (-1 unbounded).
- Returns out like q, or (out, lse, None) with lse (heads, S/N) float32, natural log.

Exact: a query attends exactly the keys the mask allows; blocks with no allowed pair cost no
kernel call (and, in ringX2 and ringX4, no message). ringX3 and ringX4 also take
layout="stripe".
"""
from __future__ import annotations

import torch

from .api import Algorithm, ring_attention


def varlen_attention(algo: Algorithm, q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0,
                     softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
                     deterministic=False, return_attn_probs=False, group=None, backend=None,
                     layout=None):
    """Run ``algo`` on (S/N, heads, headdim) shards of one packed sequence (see module doc)."""
    def batch1(t):
        return t.unsqueeze(0) if isinstance(t, torch.Tensor) and t.dim() == 3 else t
    if cu_seqlens is None:
        raise ValueError(f"{algo.name}_attn_varlen_func: cu_seqlens is required (use "
                         f"{algo.name}_attn_func for one unbroken sequence)")
    res = ring_attention(algo, batch1(q), batch1(k), batch1(v), dropout_p, softmax_scale, causal,
                         window_size, alibi_slopes, deterministic, return_attn_probs, group, backend,
                         cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, layout=layout)
    if return_attn_probs:
        out, lse, _ = res
        return out.squeeze(0), lse.squeeze(0), None
    return res.squeeze(0)
