"""Megatron-style tensor parallelism for the Llama blocks, applied from outside the model.

Over a tp group of size T: wq, wk, wv and w1, w3 keep 1/T of their output rows (whole attention
heads / kv heads, a slice of the SwiGLU width); wo and w2 keep the matching 1/T of their input
columns. The block input enters through ``copy_to_tp`` (identity forward, gradient all-reduced
over tp) and the partial outputs leave through ``reduce_from_tp`` (all-reduced forward, identity
backward). Everything outside the blocks (embeddings, norms, output head) stays replicated, and
its gradients come out identical on every tp rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .model import Attention, FeedForward, Llama


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class TPWrapped(nn.Module):
    """Runs ``inner`` (an Attention or FeedForward holding weight shards) on tp-parallel input."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x, *args):
        return _ReduceFromTP.apply(self.inner(_CopyToTP.apply(x, self.group), *args), self.group)


def _keep_rows(linear: nn.Linear, rank: int, parts: int) -> None:
    rows = linear.weight.shape[0] // parts
    linear.weight = nn.Parameter(linear.weight.detach()[rank * rows:(rank + 1) * rows].clone())


def _keep_cols(linear: nn.Linear, rank: int, parts: int) -> None:
    cols = linear.weight.shape[1] // parts
    linear.weight = nn.Parameter(linear.weight.detach()[:, rank * cols:(rank + 1) * cols].clone())


def apply_tensor_parallel(model: Llama, tp_group) -> Llama:
    """Shard ``model`` in place over ``tp_group`` (every tp rank holds the same full weights
    before the call) and return it."""
    parts, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    cfg = model.cfg
    for name, size in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("ffn_dim", cfg.ffn_dim)):
        if size % parts:
            raise ValueError(f"{name}={size} is not divisible by the tensor-parallel degree {parts}")
    if parts == 1:
        return model
    for block in model.layers:
        attn: Attention = block.attention
        for lin in (attn.wq, attn.wk, attn.wv):
            _keep_rows(lin, rank, parts)
        _keep_cols(attn.wo, rank, parts)
        ffn: FeedForward = block.feed_forward
        for lin in (ffn.w1, ffn.w3):
            _keep_rows(lin, rank, parts)
        _keep_cols(ffn.w2, rank, parts)
        block.attention = TPWrapped(attn, tp_group)
        block.feed_forward = TPWrapped(ffn, tp_group)
    return model


_ROW_SPLIT = ("wq.weight", "wk.weight", "wv.weight", "w1.weight", "w3.weight")
_COL_SPLIT = ("wo.weight", "w2.weight")


def is_tp_sharded(name: str) -> bool:
    """Whether tensor parallelism splits the parameter of this (plain-model) name."""
    return name.endswith(_ROW_SPLIT + _COL_SPLIT)


def shard_of(name: str, full: torch.Tensor, rank: int, parts: int) -> torch.Tensor:
    """The part of a full (unsharded) parameter that tp rank ``rank`` holds, by parameter name."""
    if parts == 1:
        return full
    if name.endswith(_ROW_SPLIT):
        rows = full.shape[0] // parts
        return full[rank * rows:(rank + 1) * rows]
    if name.endswith(_COL_SPLIT):
        cols = full.shape[1] // parts
        return full[:, rank * cols:(rank + 1) * cols]
    return full
