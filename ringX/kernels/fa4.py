"""FlashAttention-4 (the flash-attn-4 package, ``flash_attn.cute``: CuTe DSL kernels for Hopper
and Blackwell), used when installed (``pip install ringX[fa4]``).

On one H200 at Llama 3.2 1B's attention (32K tokens, 32/8 heads of 64, causal, bf16) its
forward and backward take 7.5 and 20.4 ms against cuDNN 9.19's 9.1 and 27.0 ms, and at 8K
tokens 1.90 against 2.37 ms (docs/benchmarks.md), so it comes before cuDNN in the registry for
calls of at least ``MIN_TOKENS`` rows and keys. Below that its host cost decides: about 0.2 ms a
forward and 1 ms a forward and backward, against cuDNN's whole 0.4 ms at 2K tokens; at 4K the
two tie (1.01 against 1.11 ms, FA4's host time as long as its kernels), which the ring
schedules' own host work per block would tip to cuDNN. Its kernels
are compiled on their first call for each shape class (seconds), then cached in the process.

It takes (b, s, h, d) tensors and grouped kv heads natively and returns the float32 natural-log
lse ringX merges with. The package's entry points with an explicit lse are private
(``_flash_attn_fwd`` / ``_flash_attn_bwd``); this is the only module that calls them, by keyword,
so a release that renames an argument fails here with a clear error rather than silently.
"""
from __future__ import annotations

import torch

from .base import Backend, KernelInputs, gpu_reasons, optional_module

_DTYPES = (torch.float16, torch.bfloat16)
MIN_TOKENS = 8192     # rows and keys of a call from which FA4 is taken (see the module docstring)


def _interface():
    """The installed ``flash_attn.cute.interface`` module, or None."""
    return optional_module("flash_attn.cute.interface")


def _dense(x: torch.Tensor) -> torch.Tensor:
    """The kernels need a unit stride in the head dim (other strides are taken as they are)."""
    return x if x.stride(-1) == 1 else x.contiguous()


class FlashAttn4Backend(Backend):
    name = "fa4"

    def not_supported_reasons(self, inp: KernelInputs) -> list[str]:
        reasons = gpu_reasons(inp, _DTYPES, 256, min_capability=(9, 0), nvidia_only=True)
        if inp.capability is not None and inp.capability[0] not in (9, 10):
            reasons.append(f"runs on Hopper and Blackwell data-center GPUs (compute capability 9.x "
                           f"or 10.x; device has {inp.capability})")
        if 0 < min(inp.rows, inp.keys) < MIN_TOKENS:
            reasons.append(f"calls under {MIN_TOKENS} rows or keys run faster on cuDNN (FlashAttention-4's "
                           f"host cost per call is larger than its gain there)")
        if not reasons and _interface() is None:
            reasons.append("the flash-attn-4 package (flash_attn.cute) is not installed "
                           "(pip install ringX[fa4])")
        return reasons

    def forward(self, q, k, v, causal, scale):
        out, lse = _interface()._flash_attn_fwd(_dense(q), _dense(k), _dense(v), softmax_scale=scale,
                                                causal=causal, return_lse=True)[:2]
        return out, lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        dq, dk, dv = _interface()._flash_attn_bwd(
            _dense(q), _dense(k), _dense(v), _dense(out), _dense(dout), lse.contiguous(),
            softmax_scale=scale, causal=causal)[:3]
        return dq, dk, dv
