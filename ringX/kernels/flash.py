"""PyTorch's built-in flash-attention kernel on CUDA or ROCm
(aten._scaled_dot_product_flash_attention). fp16/bf16, head dim <= 256.

Masked blocks use the same kernel through aten._flash_attention_forward/_backward, which take
flash-attn's windows (bottom-right aligned), cu_seqlens (varlen) and GQA natively, (b, s, h, d)
tensors, and the merged out and lse in the backward. Its lse of a row that sees no key is +inf;
the planner never makes such rows, and they are set to -inf here all the same.
"""
from __future__ import annotations

import torch

from .base import Backend, KernelInputs, bhsd, bshd, dense_bshd, expand_kv, fold_kv_grad, gpu_reasons

_DTYPES = (torch.float16, torch.bfloat16)


class AtenFlashBackend(Backend):
    name = "flash"
    band = True
    varlen = True

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

    def forward_band(self, q, k, v, left, right, scale):
        q, k, v = dense_bshd(q), dense_bshd(k), dense_bshd(v)
        res = torch.ops.aten._flash_attention_forward(
            q, k, v, None, None, q.shape[1], k.shape[1], 0.0, False, False, scale=scale,
            window_size_left=left, window_size_right=right)
        return res[0], _no_pos_inf(res[1])

    def backward_band(self, dout, q, k, v, out, lse, left, right, scale):
        q, k, v, out, dout = (dense_bshd(x) for x in (q, k, v, out, dout))
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), None, None, q.shape[1], k.shape[1], 0.0, False,
            empty, empty, scale=scale, window_size_left=left, window_size_right=right)
        return dq, dk, dv

    def forward_varlen(self, q, k, v, cu, max_len, left, right, scale):
        q, k, v = (dense_bshd(x)[0] for x in (q, k, v))                  # (T, h, d), batch 1
        res = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, False, False, scale=scale,
            window_size_left=left, window_size_right=right)
        return res[0].unsqueeze(0), _no_pos_inf(res[1]).unsqueeze(0)        # lse (h, T) -> (1, h, T)

    def backward_varlen(self, dout, q, k, v, out, lse, cu, max_len, left, right, scale):
        q, k, v, out, dout = (dense_bshd(x)[0] for x in (q, k, v, out, dout))
        empty = torch.empty(0, dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, lse[0].contiguous(), cu, cu, max_len, max_len, 0.0, False,
            empty, empty, scale=scale, window_size_left=left, window_size_right=right)
        return dq.unsqueeze(0), dk.unsqueeze(0), dv.unsqueeze(0)


def _no_pos_inf(lse: torch.Tensor) -> torch.Tensor:
    """flash-attn's lse is +inf for a row that sees no key; a merge needs -inf."""
    return lse.masked_fill(lse == float("inf"), float("-inf"))
