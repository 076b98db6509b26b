"""Mixed precision on one unsharded rank: float32 master weights, bf16 compute.

With one rank in the data-parallel x context-parallel group FSDP2 shards nothing; without
activation checkpointing it frees nothing either (each block keeps its gathered weights from
forward to backward), yet it still stages every weight through its all-gather buffers and every
gradient through its reduce-scatter buffers: copies and chunk-cats of the whole model, twice a
step. ``CastForCompute`` does what remains of its mixed precision and nothing else: the float32
weights are copied into compute-dtype copies once a step, the model runs on those copies, and
their gradients are copied back into the float32 ``.grad`` the optimizer updates, each direction
as one multi-tensor kernel (``torch._foreach_copy_``: a cast per parameter would be ~150
launches, and PyTorch's bf16 -> float32 cast of a tensor runs unvectorized).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call


class CastForCompute:
    """``model`` called on compute-dtype copies of its float32 parameters.

    ``cast = CastForCompute(model, torch.bfloat16)``; ``loss = cast(*args, **kwargs)`` runs
    ``model(*args, **kwargs)`` with every floating parameter of another dtype replaced by its
    copy in ``dtype`` (``torch.func.functional_call``), refreshed from the parameter at each
    call; ``loss.backward()`` leaves the gradients on the copies, and ``cast.grads_to_masters()``
    puts them into the parameters' float32 ``.grad`` (added to a ``.grad`` already there) before
    the optimizer step. One backward per call: a second would add to the copies' gradients in
    ``dtype``. The model's own parameters, names, state dict and optimizer are untouched. The
    copies are kept between calls (the size of the model in ``dtype``; FSDP2 on one rank holds
    as much from forward to backward). Inputs are not cast: the model's activations follow its
    weights' dtype (the Llama's token embedding yields bf16 activations from a bf16 table).
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"compute dtype {dtype} is not a floating-point type")
        self.model, self.dtype = model, dtype
        self.masters = [(n, p) for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype]
        self.copies: list[torch.Tensor] | None = None          # made at the first call

    def _refresh(self) -> list[torch.Tensor]:
        """The compute-dtype copies, filled from the parameters (gradients cleared)."""
        masters = [p for _, p in self.masters]
        if self.copies is None:
            self.copies = [torch.empty_like(p, dtype=self.dtype) for p in masters]
        with torch.no_grad():
            torch._foreach_copy_(self.copies, masters)
        for c, p in zip(self.copies, masters):
            c.grad = None
            c.requires_grad_(p.requires_grad)
        return self.copies

    def __call__(self, *args, **kwargs):
        copies = self._refresh() if self.masters else []
        params = {name: c for (name, _), c in zip(self.masters, copies)}
        return functional_call(self.model, params, args, kwargs, strict=False, tie_weights=True)

    def grads_to_masters(self) -> None:
        """Add the copies' gradients (from the last call's backward) into the float32 ``.grad``
        of their parameters, in one multi-tensor copy (and one add where a ``.grad`` exists)."""
        if self.copies is None:
            return
        fresh_src, fresh_dst, add_src, add_dst = [], [], [], []
        for (_, p), c in zip(self.masters, self.copies):
            if c.grad is None:
                continue
            if p.grad is None:
                p.grad = torch.empty_like(p)
                fresh_src.append(c.grad), fresh_dst.append(p.grad)
            else:
                add_src.append(c.grad), add_dst.append(p.grad)
            c.grad = None
        with torch.no_grad():
            if fresh_dst:
                torch._foreach_copy_(fresh_dst, fresh_src)
            if add_dst:
                torch._foreach_add_(add_dst, [g.to(p.dtype) for g, p in zip(add_src, add_dst)])
