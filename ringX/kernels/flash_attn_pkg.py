"""The flash-attn package (Dao-AILab), used when installed: the ROCm builds on Frontier-class
machines and CUDA builds elsewhere.

Its private ``_flash_attn_forward`` / ``_flash_attn_backward`` change signature between releases
(2.6 returns 8 values from the forward, 2.7+ returns 4; window and softcap arguments were added),
so this is the only module that touches them, and it passes arguments by name after reading the
installed signature. It takes (b, s, h, d) tensors and GQA natively.
"""
from __future__ import annotations

import inspect

import torch

from .base import Backend, KernelInputs, optional_module

_DTYPES = (torch.float16, torch.bfloat16)


def _interface():
    """The installed flash_attn_interface module, or None."""
    return optional_module("flash_attn.flash_attn_interface")


def _call(fn, **kwargs):
    """Call ``fn`` with the keyword arguments its installed signature knows (others dropped)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in params})


class FlashAttnPackageBackend(Backend):
    name = "flash_attn"

    def not_supported_reasons(self, inp: KernelInputs) -> list[str]:
        reasons = []
        if inp.device_type != "cuda":
            reasons.append(f"needs a CUDA/ROCm device (inputs are on {inp.device_type})")
        elif _interface() is None:
            reasons.append("the flash-attn package is not installed (pip install ringX[flash-attn])")
        if inp.dtype not in _DTYPES:
            reasons.append(f"dtype {inp.dtype} not in {_DTYPES}")
        if inp.headdim > 256:
            reasons.append(f"head dim {inp.headdim} > 256")
        if inp.dropout_p > 0:
            reasons.append("dropout masks cannot be replayed block by block")
        return reasons

    def forward(self, q, k, v, causal, scale):
        res = _call(_interface()._flash_attn_forward, q=q.contiguous(), k=k.contiguous(),
                    v=v.contiguous(), dropout_p=0.0, softmax_scale=scale, causal=causal,
                    window_size=(-1, -1), window_size_left=-1, window_size_right=-1,
                    softcap=0.0, alibi_slopes=None, return_softmax=False)
        # 2.7+: (out, lse, S_dmask, rng_state); 2.6: (out, q, k, v, out_padded, lse, S_dmask, rng)
        out, lse = (res[0], res[1]) if len(res) == 4 else (res[0], res[5])
        return out, lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _call(_interface()._flash_attn_backward, dout=dout.contiguous(), q=q.contiguous(),
              k=k.contiguous(), v=v.contiguous(), out=out.contiguous(), softmax_lse=lse.contiguous(),
              dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=causal,
              window_size=(-1, -1), window_size_left=-1, window_size_right=-1, softcap=0.0,
              alibi_slopes=None, deterministic=False, rng_state=None)
        return dq, dk, dv
