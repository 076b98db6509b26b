"""Where one call's time goes on the GPU: ``python -m ringX.bench --profile``.

After a method is timed, one more call runs under ``torch.profiler``. Its device kernels are split
into communication (NCCL / RCCL kernels, whatever stream they run on) and compute (every other
kernel: attention, merges, casts, copies). On the device time line of that call:

- ``span_ms``: first kernel start to last kernel end;
- ``compute_ms`` / ``comm_ms``: time during which at least one compute / communication kernel runs;
- ``exposed_comm_ms``: communication with no compute kernel beside it (what overlap did not hide);
- ``idle_ms``: no kernel at all (launch gaps, a stream waiting on an event or on the host).

Each rank writes its Chrome trace (``chrome://tracing`` or Perfetto) under ``OUT/traces/``, to see
which stream waits on what. On a CPU run no device kernels are recorded and the fields are empty.
"""
from __future__ import annotations

import os

COMM_MARKERS = ("nccl", "rccl")
CALL_MARK = "ringX.bench.profiled_call"
FIELDS = ("span_ms", "compute_ms", "comm_ms", "exposed_comm_ms", "idle_ms")


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Sorted, non-overlapping union of (start, end) intervals."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def length(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``intervals``."""
    return sum(b - a for a, b in merged(intervals))


def length_outside(intervals, cover) -> float:
    """Length of the union of ``intervals`` not covered by the union of ``cover``."""
    total, cov = 0.0, merged(cover)
    for a, b in merged(intervals):
        inside = sum(max(0.0, min(b, d) - max(a, c)) for c, d in cov)
        total += (b - a) - inside
    return total


def summarize(kernels: list[tuple[float, float, str]]) -> dict:
    """kernels: (start_us, end_us, name) of one call's device kernels -> the FIELDS in ms
    (None each when no kernel was recorded)."""
    if not kernels:
        return dict.fromkeys(FIELDS)
    comm, compute = [], []
    for s, e, name in kernels:
        (comm if any(m in name.lower() for m in COMM_MARKERS) else compute).append((s, e))
    span = max(e for _, e, _ in kernels) - min(s for s, _, _ in kernels)
    busy = length([(s, e) for s, e, _ in kernels])
    return {"span_ms": span / 1e3, "compute_ms": length(compute) / 1e3, "comm_ms": length(comm) / 1e3,
            "exposed_comm_ms": length_outside(comm, compute) / 1e3, "idle_ms": (span - busy) / 1e3}


def profile_call(step, fwd_only: bool, device, trace_path: str, group=None) -> dict:
    """Run ``step(fwd_only)`` once under torch.profiler, write its Chrome trace to ``trace_path``
    and return ``summarize`` of its device kernels.

    With a process group, its ranks first meet in a barrier inside the profiler (each rank starts
    its profiler at a different moment), and only kernels that start after the call was entered
    count: so a point-to-point kernel waiting for a peer shows the call's own skew, not the
    profilers'."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sync()
    with profile(activities=activities) as prof:
        if group is not None and dist.is_initialized():
            dist.barrier(group=group)
            sync()
        with record_function(CALL_MARK):
            step(fwd_only)
            sync()
    os.makedirs(os.path.dirname(trace_path) or ".", exist_ok=True)
    prof.export_chrome_trace(trace_path)
    events = prof.events()
    entered = min((e.time_range.start for e in events if e.name == CALL_MARK), default=0)
    kernels = [(e.time_range.start, e.time_range.end, e.name) for e in events
               if e.device_type.name in ("CUDA", "PrivateUse1") and e.time_range.end > e.time_range.start
               and e.time_range.start >= entered]
    return summarize(kernels)


def _call_kernels(trace_path: str) -> list[dict]:
    """The kernel events of a Chrome trace written by ``profile_call``, those before the profiled
    call (the barrier that lines the ranks up) left out."""
    import json

    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    entered = min((e["ts"] for e in events if e.get("name") == CALL_MARK and "ts" in e), default=None)
    return [e for e in events if e.get("cat") == "kernel" and e.get("dur")
            and (entered is None or e["ts"] >= entered)]


def short_name(name: str) -> str:
    """A kernel's name without template arguments and parameter lists, at most 60 characters."""
    for cut in ("<", "("):
        name = name.split(cut, 1)[0]
    return name.strip()[:60]


def kernel_breakdown(trace_path: str, top: int = 12) -> list[tuple[str, int, float]]:
    """The ``top`` kernels of a Chrome trace written by ``profile_call``: (short name, calls,
    total ms), largest total first. Kernels of one short name are summed."""
    totals: dict[str, list] = {}
    for e in _call_kernels(trace_path):
        t = totals.setdefault(short_name(e["name"]), [0, 0.0])
        t[0] += 1
        t[1] += e["dur"] / 1e3
    return sorted(((k, c, ms) for k, (c, ms) in totals.items()), key=lambda x: -x[2])[:top]


def timeline(trace_path: str) -> list[tuple[str, float, float, str, int]]:
    """The device kernels of a Chrome trace in time order, runs of one kernel name on one stream
    merged: (stream, start ms from the first kernel, end ms, short name, kernels in the run).
    Reading the streams side by side shows which one waits on what."""
    kernels = sorted((e["ts"], e["ts"] + e["dur"], str(e.get("args", {}).get("stream", e.get("tid"))),
                      short_name(e["name"])) for e in _call_kernels(trace_path))
    if not kernels:
        return []
    t0 = kernels[0][0]
    runs: list[list] = []
    for s, e, stream, name in kernels:
        if runs and runs[-1][0] == stream and runs[-1][3] == name:   # the run continues
            runs[-1][2], runs[-1][4] = (e - t0) / 1e3, runs[-1][4] + 1
        else:
            runs.append([stream, (s - t0) / 1e3, (e - t0) / 1e3, name, 1])
    return [tuple(r) for r in runs]


def main(argv=None) -> int:
    """``python -m ringX.bench.profile TRACE.json ...``: each trace's largest kernels
    (``--timeline``: also its kernels in time order, one column per stream)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ringX.bench.profile", description=main.__doc__)
    p.add_argument("traces", nargs="+")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--timeline", action="store_true", help="also print the kernels in time order")
    args = p.parse_args(argv)
    for path in args.traces:
        print(f"== {os.path.basename(path)}")
        print(f"{'calls':>6} {'total ms':>9}  kernel")
        for name, calls, ms in kernel_breakdown(path, args.top):
            print(f"{calls:6d} {ms:9.2f}  {name}")
        if args.timeline:
            runs = timeline(path)
            streams = sorted({r[0] for r in runs})
            print("stream  " + "  ".join(f"{i}={s}" for i, s in enumerate(streams)))
            for stream, start, end, name, n in runs:
                print(f"{start:9.3f} {end:9.3f}  s{streams.index(stream)}  "
                      f"{'    ' * streams.index(stream)}{name[:48]}{f' x{n}' if n > 1 else ''}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
