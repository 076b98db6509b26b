"""How long does a GPU run above its sustained clock after an idle gap? One cuDNN forward +
backward (8K queries, 16K keys, 32/8 heads, dim 128, bf16) back to back for about 3 s after
3 s and after 0.5 s of idle; prints the mean ms per call in windows of elapsed time. A benchmark
whose timed calls fit in the first window measures the boost, not what a training run sustains
(hence ``python -m ringX.bench --warmup-s``).

    python script/clock_probe.py [GPU index]
"""
import sys
import time

import torch

from ringX.kernels import get_backend

WINDOWS_S = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def windows(times_ms: list[float]) -> list[str]:
    """Mean per call within each elapsed-time window of WINDOWS_S."""
    out, elapsed, first, marks = [], 0.0, 0, list(WINDOWS_S)
    for i, t in enumerate(times_ms):
        elapsed += t / 1e3
        if marks and elapsed >= marks[0]:
            seg = times_ms[first:i + 1]
            out.append(f"<{marks.pop(0)}s: {sum(seg) / len(seg):.3f}")
            first = i + 1
    return out


def main() -> None:
    dev = torch.device("cuda", int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    torch.cuda.set_device(dev)
    kern = get_backend("cudnn")
    q = torch.randn(1, 8192, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, 16384, 8, 128, device=dev, dtype=torch.bfloat16)
    v, dout, scale = torch.randn_like(k), torch.randn_like(q), 128 ** -0.5

    def call():
        o, lse = kern.forward(q, k, v, False, scale)
        kern.backward(dout, q, k, v, o, lse, False, scale)
    call()
    torch.cuda.synchronize()
    for gap in (3.0, 0.5):
        time.sleep(gap)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(400)]
        for start, end in events:
            start.record()
            call()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in events]
        print(f"GPU {dev.index} after {gap} s idle, ms per call by elapsed time: " + ", ".join(windows(times)))


if __name__ == "__main__":
    main()
