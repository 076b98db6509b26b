"""Tensor parallelism for the Llama blocks (see app/common/tensor_parallel.py for the scheme).

wq, wk, wv and w1, w3 keep 1/T of their output rows (whole attention heads / kv heads, a slice of
the SwiGLU width); wo and w2 keep the matching 1/T of their input columns. Each attention and
feed-forward is wrapped so that its input is copied to, and its output summed over, the tp group.
Embeddings, norms and the output head stay replicated.
"""
from __future__ import annotations

import torch.distributed as dist

from app.common.tensor_parallel import SplitRule, TPWrapped, check_divisible, keep_cols, keep_rows

from .model import Attention, FeedForward, Llama

SPLIT = SplitRule(rows=("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight"),
                  cols=("wo.weight", "w2.weight"))
is_tp_sharded, shard_of = SPLIT.is_sharded, SPLIT.shard_of


def apply_tensor_parallel(model: Llama, tp_group) -> Llama:
    """Shard ``model`` in place over ``tp_group`` (every tp rank holds the same full weights
    before the call) and return it."""
    parts, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    cfg = model.cfg
    check_divisible({"n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "ffn_dim": cfg.ffn_dim}, parts)
    if parts == 1:
        return model
    for block in model.layers:
        attn: Attention = block.attention
        for lin in (attn.wq, attn.wk, attn.wv):
            keep_rows(lin, rank, parts)
        keep_cols(attn.wo, rank, parts)
        ffn: FeedForward = block.feed_forward
        for lin in (ffn.w1, ffn.w3):
            keep_rows(lin, rank, parts)
        keep_cols(ffn.w2, rank, parts)
        block.attention = TPWrapped(attn, tp_group)
        block.feed_forward = TPWrapped(ffn, tp_group)
    return model
