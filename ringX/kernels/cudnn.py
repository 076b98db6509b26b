"""cuDNN attention through PyTorch (aten._scaled_dot_product_cudnn_attention): the fastest local
kernel on Hopper (about 600 TFLOP/s bf16 forward on an H200).

Grouped-query attention runs natively: k/v go in with their own (fewer) heads, unexpanded, and
cuDNN returns dk/dv per kv head (no repeat of k/v, no fold of their gradients).
"""
from __future__ import annotations

import torch

from .base import Backend, KernelInputs, bhsd, bshd, dense_bshd, fold_kv_grad, gpu_reasons

_DTYPES = (torch.float16, torch.bfloat16)


class CudnnBackend(Backend):
    name = "cudnn"

    def not_supported_reasons(self, inp: KernelInputs) -> list[str]:
        return gpu_reasons(inp, _DTYPES, 128, min_capability=(9, 0), nvidia_only=True)

    def takes_shape(self, rows, keys):
        return rows > 1 or keys > 1          # "cuDNN Frontend error: s_q = s_kv = 1 is not supported"

    def forward(self, q, k, v, causal, scale):
        h = q.shape[2]
        q, k, v = dense_bshd(q), dense_bshd(k), dense_bshd(v)
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            bhsd(q), bhsd(k), bhsd(v), None, True, 0.0, causal, False, scale=scale)
        out, lse = res[0], res[1]
        b, _, sq, _ = out.shape
        return bshd(out), lse.reshape(b, h, sq)

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        kv_heads = k.shape[2]
        q, out, dout, k, v = (dense_bshd(x) for x in (q, out, dout, k, v))
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            bhsd(dout), bhsd(q), bhsd(k), bhsd(v), bhsd(out),
            lse.reshape(b, q.shape[2], sq, 1).contiguous(), empty, empty, None, None, None, sq, sk,
            0.0, causal, scale=scale)
        return bshd(dq), fold_kv_grad(bshd(dk), kv_heads), fold_kv_grad(bshd(dv), kv_heads)
