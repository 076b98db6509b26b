"""Megatron-style tensor-parallel building blocks shared by the apps (applied from outside the
models, which know nothing about parallelism).

Over a tp group of size T, a sublayer (attention or MLP) keeps 1/T of the output rows of its
input projections ("row split": whole heads, a slice of the hidden width, biases included) and
1/T of the input columns of its output projection ("column split"). Its input enters through
``copy_to_tp`` (identity forward, gradient all-reduced over tp) and its partial outputs are summed
over tp (all-reduced forward, identity backward). Everything else stays replicated, and its
gradients come out identical on every tp rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


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


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


class TPWrapped(nn.Module):
    """Runs ``inner`` (a sublayer holding weight shards, bias-free output projection) on
    tp-parallel input and sums its partial outputs over tp."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x, *args):
        return reduce_from_tp(self.inner(copy_to_tp(x, self.group), *args), self.group)


class TPInput(nn.Module):
    """Runs ``inner`` on tp-parallel input; its output projections (``RowParallelLinear``) sum
    over tp themselves, so biases there are added once."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, x, *args):
        return self.inner(copy_to_tp(x, self.group), *args)


class RowParallelLinear(nn.Linear):
    """An output projection holding 1/T of the input columns and the whole bias:
    y = all-reduce_tp(x_shard @ W_shard^T) + b. Parameter names stay ``weight`` / ``bias``."""

    @classmethod
    def split(cls, linear: nn.Linear, rank: int, parts: int, group) -> "RowParallelLinear":
        cols = linear.in_features // parts
        new = cls(cols, linear.out_features, bias=False, device="meta")
        new.group = group
        new.weight = nn.Parameter(linear.weight.detach()[:, rank * cols:(rank + 1) * cols].clone())
        new.bias = linear.bias
        return new

    def forward(self, x):
        y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


def keep_rows(linear: nn.Linear, rank: int, parts: int) -> None:
    """Keep this rank's 1/T of the output rows (weight and bias)."""
    rows = linear.out_features // parts
    linear.weight = nn.Parameter(linear.weight.detach()[rank * rows:(rank + 1) * rows].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rank * rows:(rank + 1) * rows].clone())
    linear.out_features = rows


def keep_cols(linear: nn.Linear, rank: int, parts: int) -> None:
    """Keep this rank's 1/T of the input columns (weight only; a bias must be added once: see
    ``RowParallelLinear``)."""
    if linear.bias is not None:
        raise ValueError("a column-split linear with a bias would add it T times: use RowParallelLinear")
    cols = linear.in_features // parts
    linear.weight = nn.Parameter(linear.weight.detach()[:, rank * cols:(rank + 1) * cols].clone())
    linear.in_features = cols


def check_divisible(sizes: dict[str, int], parts: int) -> None:
    for name, size in sizes.items():
        if size % parts:
            raise ValueError(f"{name}={size} is not divisible by the tensor-parallel degree {parts}")


class SplitRule:
    """Which plain-model parameter names tp splits, and how: ``rows`` / ``cols`` are name
    suffixes ("wq.weight", "wq.bias", ...)."""

    def __init__(self, rows: tuple[str, ...], cols: tuple[str, ...]):
        self.rows, self.cols = rows, cols

    def is_sharded(self, name: str) -> bool:
        return name.endswith(self.rows + self.cols)

    def shard_of(self, name: str, full: torch.Tensor, rank: int, parts: int) -> torch.Tensor:
        """The part of a full (unsharded) parameter that tp rank ``rank`` holds."""
        if parts == 1:
            return full
        if name.endswith(self.rows):
            rows = full.shape[0] // parts
            return full[rank * rows:(rank + 1) * rows]
        if name.endswith(self.cols):
            cols = full.shape[1] // parts
            return full[:, rank * cols:(rank + 1) * cols]
        return full

    def gather(self, name: str, local: torch.Tensor, group) -> torch.Tensor:
        """The full parameter from every tp rank's ``local`` part (a collective over ``group``;
        unsplit parameters are returned as they are)."""
        parts = dist.get_world_size(group) if group is not None else 1
        if parts == 1 or not self.is_sharded(name):
            return local
        pieces = [torch.empty_like(local) for _ in range(parts)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        return torch.cat(pieces, dim=0 if name.endswith(self.rows) else 1)
