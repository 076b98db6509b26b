"""PyTorch's attention kernels alone at one shape, the app's layout against the contiguous one
and grouped (GQA) against expanded heads: forward and forward + backward ms and TFLOP/s per
backend (cuDNN, flash; FlashAttention-4's CuTe kernels when ``flash_attn.cute`` imports), causal,
bf16. Needs a CUDA GPU.

    python script/attention_layouts.py                       # Llama 3.2 1B: 32K tokens, 32/8 heads of 64
    python script/attention_layouts.py --heads 32 --kv-heads 8 --headdim 128 --seqlen 8192
    python script/attention_layouts.py --seqlens 1024 2048 4096 --backends cudnn fa4 --layouts bshd

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


def repeats(s: int) -> int:
    """Calls queued per timing: 5 at 32K tokens, more for short ones (whose host cost then counts
    as it does in a ring of short blocks)."""
    return max(5, 163840 // s)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", "--seqlens", dest="seqlens", type=int, nargs="+", default=[32768])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--backends", nargs="+", default=["cudnn", "flash", "fa4"], choices=["cudnn", "flash", "fa4"])
    p.add_argument("--layouts", nargs="+", default=["bshd", "bhsd"], choices=["bshd", "bhsd"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_layouts.py times CUDA kernels: no CUDA GPU here", file=sys.stderr)
        return 2
    for s in args.seqlens:
        one_shape(args, args.batch, s, args.heads, args.kv_heads, args.headdim)
    return 0


def one_shape(args, b: int, s: int, h: int, hk: int, d: int) -> None:
    """Every asked backend and layout at one shape, a line each."""
    print(f"b {b}, {s} tokens, {h}/{hk} heads of {d}, causal", flush=True)
    torch.manual_seed(0)
    fwd_flop = 4 * b * h * s * s * d / 2
    sdpa = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    for backend in (sdpa[n] for n in args.backends if n in sdpa):
        for layout in args.layouts:
            for gqa in (True, False):
                q, k, v = inputs(b, s, h, hk if gqa else h, d, layout)
                dout = torch.randn_like(q)
                try:
                    with sdpa_kernel(backend):
                        def fwd():
                            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                        t_fwd = ms_per_call(fwd, repeats(s))
                        t_all = ms_per_call(lambda: fwd().backward(dout), repeats(s))
                except RuntimeError as e:
                    print(f"{backend.name:16s} {layout} gqa={gqa!s:5s} not run: {str(e)[:100]}")
                    continue
                t_bwd = t_all - t_fwd
                print(f"{backend.name:16s} {layout} gqa={gqa!s:5s} fwd {t_fwd:7.2f} ms ({fwd_flop / t_fwd / 1e9:5.0f} TF/s)"
                      f"  fwd+bwd {t_all:7.2f} ms  bwd {t_bwd:7.2f} ms ({2.5 * fwd_flop / t_bwd / 1e9:5.0f} TF/s)",
                      flush=True)
                del q, k, v, dout
    if "fa4" in args.backends:
        fa4_rows(b, s, h, hk, d, fwd_flop)


def fa4_rows(b: int, s: int, h: int, hk: int, d: int, fwd_flop: float) -> None:
    """FlashAttention-4 (the flash-attn-4 package's ``flash_attn.cute``, (b, s, h, d) inputs,
    grouped heads) at the same shape, with its largest difference from cuDNN's output."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as e:
        print(f"FA4 (flash_attn.cute) not run: {e}")
        return
    q, k, v = (torch.randn(b, s, n, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for n in (h, hk, hk))
    dout = torch.randn_like(q)

    def fwd():
        return flash_attn_func(q, k, v, causal=True)[0]
    try:
        t_fwd = ms_per_call(fwd, repeats(s))
        t_all = ms_per_call(lambda: fwd().backward(dout), repeats(s))
    except Exception as e:  # a kernel the package cannot build on this GPU
        print(f"FA4 (flash_attn.cute) not run: {type(e).__name__}: {str(e)[:300]}")
        return
    t_bwd = t_all - t_fwd
    with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True).transpose(1, 2)
        diff = (fwd().float() - ref.float()).abs().max().item()
    print(f"{'FA4':16s} bshd gqa=True  fwd {t_fwd:7.2f} ms ({fwd_flop / t_fwd / 1e9:5.0f} TF/s)"
          f"  fwd+bwd {t_all:7.2f} ms  bwd {t_bwd:7.2f} ms ({2.5 * fwd_flop / t_bwd / 1e9:5.0f} TF/s)"
          f"  max |out - cuDNN's| {diff:.2e}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
