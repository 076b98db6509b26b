"""SwiGLU ``silu(a) * b`` as torch.library custom ops whose backward writes its gradients into
its saved inputs, for compiled blocks.

Liger-Kernel's SwiGLU backward overwrites the saved ``a`` and ``b`` with their gradients, so a
block keeps no third (tokens, ffn_dim) tensor alive in backward. Traced by torch.compile as a
user Triton kernel, that mutation of a view is functionalized into a clone of each input. As a
custom op that declares what it mutates, the gradients still land in the saved inputs' own
buffers (no buffer more), but Inductor does not mutate a backward graph's inputs in place: it
clones each into the input's (then dead) buffer, a copy of each input onto itself before the op
(one pass over 2 x (tokens, ffn_dim) bf16, about 0.5 ms a layer at 32K tokens on an H200). The
app uses this op where memory comes first (compiled blocks under activation checkpointing) and
Inductor's own SwiGLU otherwise (app/gpt/kernels.py). On CUDA the kernels are Liger's
(``liger_kernel.ops.swiglu``); on other devices the same arithmetic in PyTorch (float32 inside,
like Liger), so that CPU tests check the op and its compiled graph.

Shapes: a, b (..., ffn_dim) -> (..., ffn_dim); the gradients have the inputs' shapes.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _forward_torch(a: Tensor, b: Tensor) -> Tensor:
    a32 = a.float()
    return (a32 * torch.sigmoid(a32)).to(b.dtype) * b


@torch.library.custom_op("ringx_app::swiglu", mutates_args=())
def swiglu_forward(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.contiguous(), b.contiguous()
    if a.device.type == "cuda":
        from liger_kernel.ops.swiglu import swiglu_forward as liger_forward
        return liger_forward(a, b)[2]
    return _forward_torch(a, b)


@swiglu_forward.register_fake
def _(a, b):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


@torch.library.custom_op("ringx_app::swiglu_backward_", mutates_args=("a", "b"))
def swiglu_backward_(dc: Tensor, a: Tensor, b: Tensor) -> None:
    """a <- d(loss)/da, b <- d(loss)/db, given dc = d(loss)/d(silu(a) * b); a, b contiguous."""
    dc = dc.contiguous()
    if a.device.type == "cuda":
        from liger_kernel.ops.swiglu import swiglu_backward as liger_backward
        liger_backward(a, b, dc)
        return
    a32, dc32 = a.float(), dc.float()
    sig = torch.sigmoid(a32)
    silu = a32 * sig
    da = dc32 * (silu * (1 - sig) + sig) * b.float()
    b.copy_(dc32 * silu)
    a.copy_(da)


@swiglu_backward_.register_fake
def _(dc, a, b):
    return None


def _setup_context(ctx, inputs, output):
    a, b = inputs
    ctx.save_for_backward(a.contiguous(), b.contiguous())


def _backward(ctx, dc):
    a, b = ctx.saved_tensors
    swiglu_backward_(dc, a, b)
    return a, b


swiglu_forward.register_autograd(_backward, setup_context=_setup_context)


def silu_mul_inplace_backward(a: Tensor, b: Tensor) -> Tensor:
    """silu(a) * b through the custom ops. Backward overwrites a and b with their gradients, so
    they must be intermediates used nowhere else (a block's two up-projections), not leaves."""
    if (a.is_leaf and a.requires_grad) or (b.is_leaf and b.requires_grad):
        raise ValueError("silu_mul_inplace_backward overwrites a and b with their gradients in "
                         "backward: pass intermediate tensors (e.g. x @ w1.T), not leaves that require grad")
    return swiglu_forward(a, b)
