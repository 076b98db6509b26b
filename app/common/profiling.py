"""Where a training step's device time goes: one step under torch.profiler, summed by kind of
kernel (attention, matrix multiply, Triton-generated or Liger, communication, other)."""
from __future__ import annotations

from contextlib import nullcontext

import torch

KINDS = (("attention", ("fmha", "flash", "attn", "sdpa", "cudnn")),
         ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm100_")),
         ("communication", ("nccl",)),
         ("triton", ("triton", "liger")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(key in low for key in keys):
            return kind
    return "other"


def profiler(enabled: bool):
    """A torch.profiler context recording CPU and CUDA activity (nullcontext when not enabled)."""
    if not enabled:
        return nullcontext()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=acts)


def device_time_summary(prof, wall_s: float, top: int = 12) -> str:
    """Device milliseconds per kind of kernel and the ``top`` kernels, from a finished profiler,
    beside the step's wall time."""
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0)
        if t and getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
            rows.append((t / 1e3, evt.count, evt.key))
    if not rows:
        return "profile: no device kernels recorded"
    by_kind: dict[str, float] = {}
    for ms, _, name in rows:
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + ms
    total = sum(by_kind.values())
    lines = [f"profile: step wall {wall_s * 1e3:.1f} ms, device busy {total:.1f} ms"]
    lines += [f"  {k:14s} {ms:9.1f} ms {100 * ms / total:5.1f} %" for k, ms in sorted(by_kind.items(), key=lambda x: -x[1])]
    lines.append("  top kernels:")
    lines += [f"    {ms:9.1f} ms x{n:<5d} {kind_of(name):13s} {name[:110]}" for ms, n, name in sorted(rows, reverse=True)[:top]]
    return "\n".join(lines)
