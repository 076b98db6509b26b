"""Reference backend: explicit attention in float64 on any device and dtype.

Slow (it materialises the (seqlen_q, seqlen_k) score matrix) but exact; ringX falls back to it
only when no fused kernel can take the inputs, and the tests use the same formulas as their oracle.
"""
from __future__ import annotations

import torch

from .base import Backend, KernelInputs, band_mask

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float,
            visible: torch.Tensor | None = None) -> torch.Tensor:
    """q (b, sq, h, d), k (b, sk, hk, d) -> float64 scores (b, hk, g, sq, sk), g = h // hk;
    ``visible`` (sq, sk) bool masks the rest."""
    b, sq, h, d = q.shape
    hk = k.shape[2]
    qg = q.double().view(b, sq, hk, h // hk, d).permute(0, 2, 3, 1, 4)   # (b, hk, g, sq, d)
    kk = k.double().permute(0, 2, 1, 3).unsqueeze(2)                     # (b, hk, 1, sk, d)
    s = torch.matmul(qg, kk.transpose(-1, -2)) * scale
    if causal:
        sk = k.shape[1]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    return s


class MathBackend(Backend):
    name = "math"
    band = True

    def not_supported_reasons(self, inp: KernelInputs) -> list[str]:
        reasons = []
        if inp.dtype not in _FLOAT:
            reasons.append(f"dtype {inp.dtype} is not a floating type")
        if inp.dropout_p > 0:
            reasons.append("dropout is not implemented")
        return reasons

    def forward(self, q, k, v, causal, scale, visible=None):
        b, sq, h, d = q.shape
        s = _scores(q, k, causal, scale, visible)
        lse = torch.logsumexp(s, dim=-1)                                    # (b, hk, g, sq)
        p = torch.exp(s - lse.unsqueeze(-1))
        vv = v.double().permute(0, 2, 1, 3).unsqueeze(2)                    # (b, hk, 1, sk, d)
        out = torch.matmul(p, vv)                                           # (b, hk, g, sq, d)
        out = out.permute(0, 3, 1, 2, 4).reshape(b, sq, h, d)
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return out.to(q.dtype), lse.reshape(b, h, sq).to(lse_dtype)

    def forward_band(self, q, k, v, left, right, scale):
        return self.forward(q, k, v, False, scale, band_mask(q.shape[1], k.shape[1], left, right, q.device))

    def backward_band(self, dout, q, k, v, out, lse, left, right, scale):
        return self.backward(dout, q, k, v, out, lse, False, scale,
                             band_mask(q.shape[1], k.shape[1], left, right, q.device))

    def backward(self, dout, q, k, v, out, lse, causal, scale, visible=None):
        b, sq, h, d = q.shape
        hk = k.shape[2]
        g = h // hk
        s = _scores(q, k, causal, scale, visible)
        p = torch.exp(s - lse.double().view(b, hk, g, sq).unsqueeze(-1))    # (b, hk, g, sq, sk)
        do = dout.double().view(b, sq, hk, g, d).permute(0, 2, 3, 1, 4)     # (b, hk, g, sq, d)
        o = out.double().view(b, sq, hk, g, d).permute(0, 2, 3, 1, 4)
        vv = v.double().permute(0, 2, 1, 3).unsqueeze(2)                    # (b, hk, 1, sk, d)
        kk = k.double().permute(0, 2, 1, 3).unsqueeze(2)
        qg = q.double().view(b, sq, hk, g, d).permute(0, 2, 3, 1, 4)
        dv = torch.matmul(p.transpose(-1, -2), do).sum(dim=2)               # (b, hk, sk, d)
        dp = torch.matmul(do, vv.transpose(-1, -2))                         # (b, hk, g, sq, sk)
        delta = (do * o).sum(dim=-1, keepdim=True)
        ds = p * (dp - delta) * scale
        dq = torch.matmul(ds, kk)                                           # (b, hk, g, sq, d)
        dk = torch.matmul(ds.transpose(-1, -2), qg).sum(dim=2)              # (b, hk, sk, d)
        dq = dq.permute(0, 3, 1, 2, 4).reshape(b, sq, h, d)
        return (dq.to(q.dtype), dk.permute(0, 2, 1, 3).to(k.dtype), dv.permute(0, 2, 1, 3).to(v.dtype))
