"""PyTorch's attention kernels alone at one shape, the app's layout against the contiguous one
and grouped (GQA) against expanded heads: forward and forward + backward ms and TFLOP/s per
backend (cuDNN, flash), causal, bf16. Needs a CUDA GPU.

    python script/attention_layouts.py                       # Llama 3.2 1B: 32K tokens, 32/8 heads of 64
    python script/attention_layouts.py --heads 32 --kv-heads 8 --headdim 128 --seqlen 8192

"bshd" is what the models hand over (a (b, s, h, d) tensor seen as (b, h, s, d)), "bhsd" a
contiguous (b, h, s, d) tensor. TFLOP/s count causal attention as half of 4·b·h·s²·d forward,
the backward as 2.5x the forward.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def inputs(b: int, s: int, h: int, hk: int, d: int, layout: str) -> list[torch.Tensor]:
    """q (b, h, s, d) and k, v (b, hk, s, d), bf16 on the GPU, in ``layout``, requiring grad."""
    def one(heads):
        if layout == "bshd":
            return torch.randn(b, s, heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        return torch.randn(b, heads, s, d, device="cuda", dtype=torch.bfloat16)
    return [one(n).requires_grad_() for n in (h, hk, hk)]


def ms_per_call(fn, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=32768)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=64)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_layouts.py times CUDA kernels: no CUDA GPU here", file=sys.stderr)
        return 2
    b, s, h, hk, d = args.batch, args.seqlen, args.heads, args.kv_heads, args.headdim
    torch.manual_seed(0)
    fwd_flop = 4 * b * h * s * s * d / 2
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        for layout in ("bshd", "bhsd"):
            for gqa in (True, False):
                q, k, v = inputs(b, s, h, hk if gqa else h, d, layout)
                dout = torch.randn_like(q)
                try:
                    with sdpa_kernel(backend):
                        def fwd():
                            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                        t_fwd = ms_per_call(fwd)
                        t_all = ms_per_call(lambda: fwd().backward(dout))
                except RuntimeError as e:
                    print(f"{backend.name:16s} {layout} gqa={gqa!s:5s} not run: {str(e)[:100]}")
                    continue
                t_bwd = t_all - t_fwd
                print(f"{backend.name:16s} {layout} gqa={gqa!s:5s} fwd {t_fwd:7.2f} ms ({fwd_flop / t_fwd / 1e9:5.0f} TF/s)"
                      f"  fwd+bwd {t_all:7.2f} ms  bwd {t_bwd:7.2f} ms ({2.5 * fwd_flop / t_bwd / 1e9:5.0f} TF/s)",
                      flush=True)
                del q, k, v, dout
    return 0


if __name__ == "__main__":
    sys.exit(main())
