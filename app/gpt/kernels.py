"""Which implementation runs the model's pointwise pieces and its loss.

Three pieces of a Llama step are memory-bound and, written as plain PyTorch, make several passes
over (tokens, dim) or (tokens, ffn_dim) tensors each: RMSNorm, the SwiGLU product
``silu(a) * b`` and the output projection with cross-entropy (whose float32 logits are
(tokens, vocab): 16 GB at 32K tokens and a 128K vocabulary). Paths:

- ``liger``: Liger-Kernel's Triton kernels (``liger_kernel``, optional, CUDA): RMSNorm in Llama's
  casting (float32 statistics, cast, then weight), ``silu(a) * b``, and the fused linear
  cross-entropy that computes the logits' gradient chunk by chunk in forward, so no logits are
  kept and none are recomputed;
- ``torch``: plain PyTorch; the loss makes ``loss_chunk`` tokens of logits at a time and remakes
  them in backward. With ``--compile`` torch.compile fuses the norms, RoPE and SwiGLU of each
  block itself, so the torch pieces are what a compiled block should see.

``auto`` takes Liger for the loss when it is importable on a CUDA device, and for the norms and
the SwiGLU as well when the blocks are not compiled; otherwise torch. In compiled blocks the
SwiGLU is Inductor's own (one kernel each way, no copy) unless activation checkpointing asks for
memory: then Liger's, as a custom op (``swiglu_op``) whose backward writes its gradients into its
saved inputs (no (tokens, ffn_dim) buffer more, but Inductor copies each input onto itself once
before it: about 0.5 ms a layer at 32K tokens on an H200). ``liger`` takes that op in compiled
blocks always. The chosen paths are in ``Kernels.paths`` (the app prints them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .swiglu_op import silu_mul_inplace_backward

KERNEL_CHOICES = ("auto", "liger", "torch")


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., dim), weight (dim,) -> (..., dim): float32 statistics, cast to x's dtype, times weight."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def silu_mul_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b (same shapes)."""
    return F.silu(a) * b


def linear_cross_entropy_torch(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk: int, ignore_index: int = -100) -> torch.Tensor:
    """Summed cross-entropy of ``h @ weight.T`` against ``labels`` ((N, dim), (vocab, dim), (N,)
    -> float32 scalar; float64 for float64 inputs). With ``chunk`` > 0 the logits of ``chunk`` rows at a time are made,
    reduced and freed, and remade in backward, so (N, vocab) logits never exist whole."""
    acc = torch.promote_types(h.dtype, torch.float32)        # float32, or float64 for float64 models
    def part(hc, lc):
        return F.cross_entropy(F.linear(hc, weight).to(acc), lc, reduction="sum", ignore_index=ignore_index)
    if not chunk or h.shape[0] <= chunk:
        return part(h, labels)
    total = h.new_zeros((), dtype=acc)
    for hc, lc in zip(h.split(chunk), labels.split(chunk)):
        total = total + (checkpoint(part, hc, lc, use_reentrant=False) if torch.is_grad_enabled() else part(hc, lc))
    return total


def _liger():
    """liger_kernel's functional API, or the reason it cannot be used."""
    try:
        from liger_kernel.transformers import functional
    except Exception as e:                   # not installed, or no triton / no GPU backend
        return None, f"liger_kernel is not importable ({type(e).__name__}: {e})"
    return functional, ""


@dataclass(frozen=True)
class Kernels:
    """rms_norm(x, weight, eps), silu_mul(a, b), linear_cross_entropy(h, weight, labels, chunk)
    (see the torch versions for shapes) and the name of the path each one takes."""
    rms_norm: Callable = rms_norm_torch
    silu_mul: Callable = silu_mul_torch
    linear_cross_entropy: Callable = linear_cross_entropy_torch
    paths: dict = field(default_factory=lambda: {"rms_norm": "torch", "swiglu": "torch",
                                                 "loss": "torch (chunked logits)"})

    def describe(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in self.paths.items())


def choose_kernels(request: str, device: torch.device, compiled: bool, checkpointed: bool = False) -> Kernels:
    """The kernels for ``request`` ("auto", "liger" or "torch") on ``device``; ``compiled``:
    the blocks go through torch.compile (which fuses the pointwise pieces itself);
    ``checkpointed``: activation checkpointing is on (memory first: see the module docstring).
    "liger" raises when Liger-Kernel cannot run here; "auto" then falls back to torch."""
    if request not in KERNEL_CHOICES:
        raise ValueError(f"--kernels {request!r}: expected one of {', '.join(KERNEL_CHOICES)}")
    rope = "torch.compile" if compiled else "torch"
    if request == "torch":
        return Kernels(paths={**Kernels().paths, "rope": rope,
                              **({"rms_norm": "torch.compile", "swiglu": "torch.compile"} if compiled else {})})
    liger, why = _liger() if device.type == "cuda" else (None, f"Liger-Kernel needs a CUDA device (this is {device.type})")
    if liger is None:
        if request == "liger":
            raise RuntimeError(f"--kernels liger: {why}; install liger-kernel or use --kernels torch")
        torch_paths = choose_kernels("torch", device, compiled).paths
        return Kernels(paths={**torch_paths, "note": f"torch fallback: {why}"})

    def linear_ce(h, weight, labels, chunk, ignore_index=-100):
        return liger.liger_fused_linear_cross_entropy(h, weight, labels, ignore_index=ignore_index,
                                                      reduction="sum", accum_dtype=torch.float32).float()
    # Liger's SwiGLU writes its gradients into its saved inputs (no third (tokens, ffn_dim) tensor
    # in backward); in a compiled block it runs as a custom op, which Inductor keeps in place
    swiglu, swiglu_path = ((silu_mul_inplace_backward, "liger (custom op)") if compiled
                           else (liger.liger_swiglu, "liger"))
    if compiled and request == "auto":       # torch.compile fuses the norms itself
        if not checkpointed:                 # and the SwiGLU, without the in-place op's copies
            swiglu, swiglu_path = silu_mul_torch, "torch.compile"
        return Kernels(silu_mul=swiglu, linear_cross_entropy=linear_ce,
                       paths={"rms_norm": "torch.compile", "swiglu": swiglu_path, "rope": rope,
                              "loss": "liger fused linear cross-entropy"})

    def norm(x, weight, eps):
        return liger.liger_rms_norm(x, weight, eps, 0.0, "llama", False)
    return Kernels(rms_norm=norm, silu_mul=swiglu, linear_cross_entropy=linear_ce,
                   paths={"rms_norm": "liger", "swiglu": swiglu_path, "rope": rope,
                          "loss": "liger fused linear cross-entropy"})
