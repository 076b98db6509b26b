"""PyTorch's memory-efficient attention kernel on CUDA or ROCm
(aten._scaled_dot_product_efficient_attention). Also takes float32, so it is the fused choice for
float32 on GPUs. Its lse is padded to a multiple of 32 query rows (sliced off / padded back here).
"""
from __future__ import annotations

import torch

from .base import Backend, KernelInputs, bhsd, bshd, dense_bshd, expand_kv, fold_kv_grad, gpu_reasons

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class EfficientBackend(Backend):
    name = "efficient"

    def not_supported_reasons(self, inp: KernelInputs) -> list[str]:
        return gpu_reasons(inp, _DTYPES, 256)

    def forward(self, q, k, v, causal, scale):
        h = q.shape[2]
        q, k, v = dense_bshd(q), dense_bshd(expand_kv(k, h)), dense_bshd(expand_kv(v, h))
        res = torch.ops.aten._scaled_dot_product_efficient_attention(
            bhsd(q), bhsd(k), bhsd(v), None, True, 0.0, causal, scale=scale)
        return bshd(res[0]), res[1][:, :, : q.shape[1]]

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        h, kv_heads = q.shape[2], k.shape[2]
        q, out, dout = dense_bshd(q), dense_bshd(out), dense_bshd(dout)
        ke, ve = dense_bshd(expand_kv(k, h)), dense_bshd(expand_kv(v, h))
        sq = q.shape[1]
        padded = -(-sq // 32) * 32
        lse_p = torch.nn.functional.pad(lse.float(), (0, padded - sq)).contiguous()
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            bhsd(dout), bhsd(q), bhsd(ke), bhsd(ve), None, bhsd(out), lse_p, seed, seed, 0.0,
            [True, True, True, False], causal, scale=scale)
        return (bshd(dq), fold_kv_grad(bshd(dk), kv_heads), fold_kv_grad(bshd(dv), kv_heads))
