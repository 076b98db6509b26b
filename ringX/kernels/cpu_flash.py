"""PyTorch's CPU flash-attention kernel (aten._scaled_dot_product_flash_attention_for_cpu).

Takes GQA natively and the (b, s, h, d) strides as views. A fully masked row would give out 0 and
lse 0 (not -inf), but ringX never hands it one: causal blocks are square diagonal blocks.

The kernel also returns out 0 and lse 0, instead of NaN, for a row whose scores are all NaN (a
NaN in the query row, or a NaN key that is the only one the row sees in the block): that would
let a NaN input vanish once ringX splits the keys into blocks. ``forward`` sets the rows that
attend a NaN (a NaN in the query row, or in a key the row sees), and the all-NaN rows that Inf
inputs cause, to NaN, as a whole-sequence kernel gives them.
"""
from __future__ import annotations

import torch

from .base import Backend, KernelInputs, band_mask, bhsd, bshd, varlen_mask

_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class CpuFlashBackend(Backend):
    name = "cpu_flash"
    band = True             # windows and documents as an additive float mask (exact)
    varlen = True

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
        return poison_nan_rows(q, k, causal, bshd(out), lse)

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            bhsd(dout), bhsd(q), bhsd(k), bhsd(v), bhsd(out), lse.contiguous(), 0.0, causal,
            scale=scale)
        return bshd(dq), bshd(dk), bshd(dv)

    def forward_band(self, q, k, v, left, right, scale):
        return _masked_forward(q, k, v, band_mask(q.shape[1], k.shape[1], left, right, q.device), scale)

    def backward_band(self, dout, q, k, v, out, lse, left, right, scale):
        vis = band_mask(q.shape[1], k.shape[1], left, right, q.device)
        return _masked_backward(dout, q, k, v, out, lse, vis, scale)

    def forward_varlen(self, q, k, v, cu, max_len, left, right, scale):
        return _masked_forward(q, k, v, varlen_mask(cu.tolist(), left, right, q.device), scale)

    def backward_varlen(self, dout, q, k, v, out, lse, cu, max_len, left, right, scale):
        vis = varlen_mask(cu.tolist(), left, right, q.device)
        return _masked_backward(dout, q, k, v, out, lse, vis, scale)


def _additive(vis: torch.Tensor, dtype) -> torch.Tensor:
    """bool (sq, sk) -> (1, 1, sq, sk) additive mask in the kernel's dtype: 0 or -inf."""
    return torch.zeros(vis.shape, dtype=dtype).masked_fill(~vis, float("-inf")).view(1, 1, *vis.shape)


def _masked_forward(q, k, v, vis, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        bhsd(q), bhsd(k), bhsd(v), 0.0, False, attn_mask=_additive(vis, q.dtype), scale=scale)
    return bshd(out), lse


def _masked_backward(dout, q, k, v, out, lse, vis, scale):
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        bhsd(dout), bhsd(q), bhsd(k), bhsd(v), bhsd(out), lse.contiguous(), 0.0, False,
        attn_mask=_additive(vis, q.dtype), scale=scale)
    return bshd(dq), bshd(dk), bshd(dv)


def poison_nan_rows(q, k, causal: bool, out, lse):
    """out (b, s, h, d), lse (b, h, s) with NaN in every row whose scores the kernel found all NaN
    or that attends a NaN: a NaN in the query row or in a key the row sees (keys <= the row in a
    causal diagonal block), or out 0 with lse 0 (the kernel's answer for all-NaN scores) where the
    query row or a key it sees is infinite."""
    def seen(flags):                                                    # (b, sk, hk) -> (b, s, h)
        hit = flags.cumsum(dim=1) > 0 if causal else flags.any(dim=1, keepdim=True).expand(-1, q.shape[1], -1)
        return hit.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    nan = torch.isnan(q).any(dim=-1) | seen(torch.isnan(k).any(dim=-1))
    inf = torch.isinf(q).any(dim=-1) | seen(torch.isinf(k).any(dim=-1))
    zero = (out == 0).all(dim=-1) & (lse.transpose(1, 2) == 0)
    bad = nan | (inf & zero)
    return out.masked_fill(bad.unsqueeze(-1), float("nan")), lse.masked_fill(bad.transpose(1, 2), float("nan"))
