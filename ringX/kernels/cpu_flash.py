"""PyTorch's CPU flash-attention kernel (aten._scaled_dot_product_flash_attention_for_cpu).

Takes GQA natively and the (b, s, h, d) strides as views. A fully masked row would give out 0 and
lse 0 (not -inf), but ringX never hands it one: causal blocks are square diagonal blocks.
"""
from __future__ import annotations

import torch

from .base import Backend, KernelInputs, bhsd, bshd

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class CpuFlashBackend(Backend):
    name = "cpu_flash"

    def not_supported_reasons(self, inp: KernelInputs) -> list[str]:
        reasons = []
        if inp.device_type != "cpu":
            reasons.append(f"runs on CPU only (inputs are on {inp.device_type})")
        if inp.dtype not in _DTYPES:
            reasons.append(f"dtype {inp.dtype} not in {_DTYPES}")
        if inp.dropout_p > 0:
            reasons.append("dropout masks cannot be replayed block by block")
        return reasons

    def forward(self, q, k, v, causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            bhsd(q), bhsd(k), bhsd(v), 0.0, causal, scale=scale)
        return bshd(out), lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            bhsd(dout), bhsd(q), bhsd(k), bhsd(v), bhsd(out), lse.contiguous(), 0.0, causal,
            scale=scale)
        return bshd(dq), bshd(dk), bshd(dv)
