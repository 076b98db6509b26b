"""Filling a model's parameters from (name, full tensor) pairs, for both apps."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn


def canonical_name(name: str) -> str:
    """A parameter name without wrapper levels (``.inner``, as tensor-parallel and activation-
    checkpointing wrappers add): the plain model's name."""
    return ".".join(part for part in name.split(".") if part != "inner")


def copy_parameters(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], source: str,
                    to_local: Callable | None = None) -> None:
    """Copy every (plain-model name, full tensor) pair of ``tensors`` into ``model``'s parameter
    of that name, and require that every parameter got one. ``to_local(name, full, param) ->
    (destination, value)`` picks this rank's part of a sharded parameter (default: the whole
    parameter and the whole tensor). Errors (ValueError) name ``source`` and the parameter."""
    own = {canonical_name(n): p for n, p in model.named_parameters()}
    seen = set()
    with torch.no_grad():
        for name, full in tensors:
            if name not in own:
                raise ValueError(f"{source}: no parameter {name!r} in the model")
            dest, value = to_local(name, full, own[name]) if to_local else (own[name], full)
            if dest.shape != value.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, the model's "
                                 f"{'shard' if to_local else 'parameter'} {tuple(dest.shape)}")
            dest.copy_(value)
            seen.add(name)
    missing = sorted(set(own) - seen)
    if missing:
        raise ValueError(f"{source}: no weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
