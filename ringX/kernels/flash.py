"""PyTorch's built-in flash-attention kernel on CUDA or ROCm
(aten._scaled_dot_product_flash_attention). fp16/bf16, head dim <= 256."""
from __future__ import annotations

import torch

from .base import Backend, KernelInputs, bhsd, bshd, dense_bshd, expand_kv, fold_kv_grad, gpu_reasons

_DTYPES = (torch.float16, torch.bfloat16)


class AtenFlashBackend(Backend):
    name = "flash"

    def not_supported_reasons(self, inp: KernelInputs) -> list[str]:
        return gpu_reasons(inp, _DTYPES, 256, min_capability=(8, 0))

    def forward(self, q, k, v, causal, scale):
        h = q.shape[2]
        q, k, v = dense_bshd(q), dense_bshd(expand_kv(k, h)), dense_bshd(expand_kv(v, h))
        res = torch.ops.aten._scaled_dot_product_flash_attention(
            bhsd(q), bhsd(k), bhsd(v), 0.0, causal, False, scale=scale)
        return bshd(res[0]), res[1]

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        h, kv_heads = q.shape[2], k.shape[2]
        q, out, dout = dense_bshd(q), dense_bshd(out), dense_bshd(dout)
        ke, ve = dense_bshd(expand_kv(k, h)), dense_bshd(expand_kv(v, h))
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            bhsd(dout), bhsd(q), bhsd(ke), bhsd(ve), bhsd(out), lse.contiguous(), None, None,
            q.shape[1], ke.shape[1], 0.0, causal, empty, empty, scale=scale)
        return (bshd(dq), fold_kv_grad(bshd(dk), kv_heads), fold_kv_grad(bshd(dv), kv_heads))
