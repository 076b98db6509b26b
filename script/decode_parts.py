"""Where a decode step's time goes on one GPU: each memory-bound piece of a Llama layer at one
new token, timed alone (CUDA graphs of 20 calls, median of 5) against its bytes read at the
memory bandwidth.

    python script/decode_parts.py --config llama3-8b --context 32768 131072

Pieces: the seven weight products of one layer (q, k, v, o, w1, w3, w2: bf16 matrix-vector
products), the output projection, and the attention of one query over ``context`` cached
keys (ringX.inference.StaticDecode: flash-attn's varlen kernel with the cache's fill on the
device). The per-step total multiplies the layer pieces by the layer count.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.gpt.config import load_preset  # noqa: E402
from ringX.inference import ShardedKVCache, StaticDecode  # noqa: E402


def graph_ms(fn, calls: int = 20, repeats: int = 5) -> float:
    """Milliseconds per call of ``fn`` replayed from a CUDA graph of ``calls`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama3-8b")
    p.add_argument("--context", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--hbm_gb_s", type=float, default=4800.0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_parts.py times GPU kernels; no CUDA device here")
    cfg = load_preset(args.config)
    dev, dt = torch.device("cuda"), torch.bfloat16
    bw = args.hbm_gb_s * 1e9
    x = torch.randn(1, cfg.dim, device=dev, dtype=dt)
    hd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"q": (hd, cfg.dim), "k": (kvd, cfg.dim), "v": (kvd, cfg.dim), "o": (cfg.dim, hd),
              "w1": (cfg.ffn_dim, cfg.dim), "w3": (cfg.ffn_dim, cfg.dim), "w2": (cfg.dim, cfg.ffn_dim)}
    print(f"{args.config}: {cfg.n_layers} layers, bandwidth {args.hbm_gb_s:.0f} GB/s")
    print(f"{'piece':28s} {'ms':>8s} {'bound ms':>9s} {'of bound':>9s}")
    layer_ms = layer_bound = 0.0
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device=dev, dtype=dt)
        inp = x if k == cfg.dim else torch.randn(1, k, device=dev, dtype=dt)
        ms = graph_ms(lambda: torch.nn.functional.linear(inp, w))
        bound = w.numel() * 2 / bw * 1e3
        layer_ms, layer_bound = layer_ms + ms, layer_bound + bound
        print(f"{'weights ' + name:28s} {ms:8.4f} {bound:9.4f} {bound / ms:8.0%}")
        del w
    out_w = torch.randn(cfg.vocab_size, cfg.dim, device=dev, dtype=dt)
    out_ms = graph_ms(lambda: torch.nn.functional.linear(x, out_w))
    out_bound = out_w.numel() * 2 / bw * 1e3
    print(f"{'output projection':28s} {out_ms:8.4f} {out_bound:9.4f} {out_bound / out_ms:8.0%}")
    del out_w
    print(f"{'one layer, weights':28s} {layer_ms:8.4f} {layer_bound:9.4f} {layer_bound / layer_ms:8.0%}")
    for ctx in args.context:
        cache = ShardedKVCache.empty(1, 1, ctx + 1, cfg.n_kv_heads, cfg.head_dim, 0, 1, dt, dev)
        cache.k[0].normal_()
        cache.v[0].normal_()
        static = StaticDecode(cache, 1, dev)
        static.set_fill(ctx)
        q = torch.randn(1, 1, cfg.n_heads, cfg.head_dim, device=dev, dtype=dt)
        kv = torch.randn(1, 1, cfg.n_kv_heads, cfg.head_dim, device=dev, dtype=dt)
        ms = graph_ms(lambda: static.attention(q, kv, kv, 0))
        bound = 2 * (ctx + 1) * kvd * 2 / bw * 1e3
        print(f"{f'attention at {ctx} keys':28s} {ms:8.4f} {bound:9.4f} {bound / ms:8.0%}")
        step = cfg.n_layers * (layer_ms + ms) + out_ms
        step_bound = cfg.n_layers * (layer_bound + bound) + out_bound
        print(f"{f'step at {ctx}: pieces summed':28s} {step:8.3f} {step_bound:9.3f} {step_bound / step:8.0%}")
        del cache
    return 0


if __name__ == "__main__":
    sys.exit(main())
