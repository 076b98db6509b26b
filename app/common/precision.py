"""Mixed precision on one unsharded rank: float32 master weights, bf16 compute.

With one rank in the data-parallel x context-parallel group FSDP2 shards nothing; without
activation checkpointing it frees nothing either (each block keeps its gathered weights from
forward to backward), yet it still stages every weight through its all-gather buffers and every
gradient through its reduce-scatter buffers: copies and chunk-cats of the whole model, twice a
step. ``CastForCompute`` does what remains of its mixed precision and nothing else: one cast of
each float32 parameter to the compute dtype when the model is called, tracked by autograd, so
the backward casts each weight's gradient back once into the float32 ``.grad`` the optimizer
updates.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call


class CastForCompute:
    """``model`` called with its floating-point parameters cast to ``dtype`` (float32 masters).

    ``CastForCompute(model, torch.bfloat16)(*args, **kwargs)`` runs ``model(*args, **kwargs)``
    with every floating parameter replaced by ``p.to(dtype)`` (``torch.func.functional_call``):
    the model's own parameters, names, state dict and optimizer are untouched, gradients reach
    them in float32. Inputs are not cast: the model's activations follow its weights' dtype (the
    Llama's token embedding yields bf16 activations from a bf16 table). Parameters already of
    ``dtype`` pass through. The cast copies live as long as autograd keeps them (to the
    backward of the step), as FSDP2's unsharded weights do without resharding.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"compute dtype {dtype} is not a floating-point type")
        self.model, self.dtype = model, dtype

    def cast_parameters(self) -> dict[str, torch.Tensor]:
        """{parameter name: the parameter in the compute dtype} (autograd-tracked casts)."""
        return {name: p.to(self.dtype) if p.is_floating_point() else p
                for name, p in self.model.named_parameters()}

    def __call__(self, *args, **kwargs):
        return functional_call(self.model, self.cast_parameters(), args, kwargs, tie_weights=True)
