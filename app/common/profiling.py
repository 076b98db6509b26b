"""Where a training step's device time goes: one step under torch.profiler, summed by kind of
kernel (attention, matrix multiply, Triton-generated or Liger, communication, other), and where
the device waits for the host (idle gaps, by the kernels around them and the host call under way)."""
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


def device_gaps(spans: list[tuple[float, float, str]], min_us: float = 0.0) -> list[tuple]:
    """The gaps in which no span runs, from (start_us, end_us, name) spans sorted by start: each
    gap longer than 0 and at least ``min_us`` as (length_us, start_us, name of the span that ended
    last before it, name of the span after it, index of that span in ``spans``)."""
    gaps, end, before = [], spans[0][1], spans[0][2]
    for i, (s, e, name) in enumerate(spans[1:], 1):
        if s - end > 0 and s - end >= min_us:
            gaps.append((s - end, end, before, name, i))
        if e > end:
            end, before = e, name
    return gaps


def idle_gaps(kernels: list[tuple[float, float, str]], host: list[tuple[float, float, str]] = (),
              top: int = 12, min_us: float = 20.0) -> list[str]:
    """Where the device had no kernel to run, from one step's kernels and host calls, each a
    (start_us, end_us, name): the total idle between the first and the last kernel, and the
    ``top`` kinds of gap of ``min_us`` or more, by (kernel before, kernel after), each with the
    innermost host call under way in its middle for its largest instance."""
    if not kernels:
        return []
    spans = sorted(kernels)
    gaps = [g[:4] for g in device_gaps(spans, min_us)]
    end = max(e for _, e, _ in spans)
    total = sum(g[0] for g in gaps)
    by_pair: dict[tuple[str, str], list] = {}
    for gap in gaps:
        key = (gap[2][:48], gap[3][:48])
        acc = by_pair.setdefault(key, [0.0, 0, gap])
        acc[0] += gap[0]
        acc[1] += 1
        acc[2] = max(acc[2], gap)
    lines = [f"  idle between kernels: {total / 1e3:.1f} ms in {len(gaps)} gaps of >= {min_us:.0f} us "
             f"(first kernel to last: {(end - spans[0][0]) / 1e3:.1f} ms)"]
    for (a, b), (us, n, big) in sorted(by_pair.items(), key=lambda x: -x[1][0])[:top]:
        mid = big[1] + big[0] / 2
        under = [h for h in host if h[0] <= mid <= h[1]]
        call = min(under, key=lambda h: h[1] - h[0])[2][:40] if under else "-"
        lines.append(f"    {us / 1e3:7.2f} ms x{n:<4d} after {a} | before {b} | host in: {call}")
    return lines


def _profiled_spans(prof):
    """(kernels, host calls) of a finished profiler as (start_us, end_us, name) lists (device
    kernels, copies and sets; user annotations left out)."""
    kernels, host = [], []
    for evt in prof.events():
        span = (evt.time_range.start, evt.time_range.end, evt.name)
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            if not getattr(evt, "is_user_annotation", False):
                kernels.append(span)
        else:
            host.append(span)
    return kernels, host


def device_time_summary(prof, wall_s: float, top: int = 12, table=None) -> str:
    """Device milliseconds per kind of kernel and the ``top`` kernels, from a finished profiler,
    beside the step's wall time. With ``table`` (a path), every kernel's row is also written there."""
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0)
        if (t and getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA
                and not getattr(evt, "is_user_annotation", False)):        # a range, not a kernel
            rows.append((t / 1e3, evt.count, evt.key))
    if not rows:
        if table is not None:
            with open(table, "w") as f:
                f.write("profile: no device kernels recorded\n")
        return "profile: no device kernels recorded"
    by_kind: dict[str, float] = {}
    for ms, _, name in rows:
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + ms
    total = sum(by_kind.values())
    lines = [f"profile: step wall {wall_s * 1e3:.1f} ms, device busy {total:.1f} ms"]
    lines += [f"  {k:14s} {ms:9.1f} ms {100 * ms / total:5.1f} %" for k, ms in sorted(by_kind.items(), key=lambda x: -x[1])]
    lines += idle_gaps(*_profiled_spans(prof))
    every = [f"    {ms:9.1f} ms x{n:<5d} {kind_of(name):13s} {name[:110]}" for ms, n, name in sorted(rows, reverse=True)]
    if table is not None:
        with open(table, "w") as f:
            f.write("\n".join(lines + ["  every kernel:"] + every) + "\n")
    return "\n".join(lines + ["  top kernels:"] + every[:top])
