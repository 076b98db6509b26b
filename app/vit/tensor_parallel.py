"""Tensor parallelism for the climate ViT blocks (see app/common/tensor_parallel.py).

wq, wk, wv and w1 keep 1/T of their output rows and biases (whole heads, a slice of the MLP
width); wo and w2 keep 1/T of their input columns and sum over tp themselves, adding their whole
bias once (``RowParallelLinear``). Each attention and MLP takes its input through
``copy_to_tp``. Patch and position embeddings, norms and the head stay replicated.
"""
from __future__ import annotations

import torch.distributed as dist

from app.common.tensor_parallel import RowParallelLinear, SplitRule, TPInput, check_divisible, keep_rows

from .model import ClimateViT

SPLIT = SplitRule(rows=("wq.weight", "wq.bias", "wk.weight", "wk.bias", "wv.weight", "wv.bias",
                        "w1.weight", "w1.bias"),
                  cols=("wo.weight", "w2.weight"))
is_tp_sharded, shard_of = SPLIT.is_sharded, SPLIT.shard_of


def apply_tensor_parallel(model: ClimateViT, tp_group) -> ClimateViT:
    """Shard ``model`` in place over ``tp_group`` (every tp rank holds the same full weights
    before the call) and return it."""
    parts = dist.get_world_size(tp_group) if tp_group is not None else 1
    cfg = model.cfg
    check_divisible({"heads": cfg.heads, "mlp width": int(cfg.embed * cfg.mlp_ratio)}, parts)
    if parts == 1:
        return model
    rank = dist.get_rank(tp_group)
    for block in model.blocks:
        attn, mlp = block.attention, block.mlp
        for lin in (attn.wq, attn.wk, attn.wv):
            keep_rows(lin, rank, parts)
        attn.wo = RowParallelLinear.split(attn.wo, rank, parts, tp_group)
        keep_rows(mlp.w1, rank, parts)
        mlp.w2 = RowParallelLinear.split(mlp.w2, rank, parts, tp_group)
        block.attention = TPInput(attn, tp_group)
        block.mlp = TPInput(mlp, tp_group)
    return model
