"""Per-block cost of RingX against the attention kernel alone, by block size.

A rank of an N-rank ring computes N blocks of (L queries x L keys) per call (L = S / N tokens
per rank) and merges their partial results in float32; backward runs N block backwards and sums
dq in float32. This script times, on one device and without communication, that per-rank work
through RingX's own block path (``RunContext.block_forward`` / ``block_backward`` with the plan
lookups, slicing and float32 merges the schedules do) against the same N kernel calls made
directly, and prints the overhead per block size, for two ways of merging: each partial as it
comes ("ringX", the first one copied into the float32 accumulators) and the later partials kept
and merged four at a time ("grouped": ringX.merge.PendingMerges / PendingSums, what the
broadcast-kv schedule of ringX4 and of the full-attention ringX1/2 does):

    python script/block_overhead.py --sizes 1024 2048 4096 8192 --blocks 4

(b, L, h, d) bfloat16 blocks, 32 query / 8 kv heads, head dim 128 by default; median of
``--repeats`` samples of ``--queued`` passes launched back to back (as in a training step),
the three paths taking turns. The last columns give the host's time a pass (until its last
launch returns): below the pass's time, the host runs ahead and the device waits only at the
start of a sample, whose share shrinks as ``--queued`` grows (20 is closer to a training step,
where many layers queue). ``--graph`` times CUDA-graph replays (the device alone). On CPU it
runs with small sizes (a smoke run).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ringX.algorithms import RINGX2  # noqa: E402
from ringX.api import prepare_run  # noqa: E402
from ringX.merge import (PendingMerges, PendingSums, acc_copy, accumulate_, merge_, merge_many_,  # noqa: E402
                         new_accumulators)
from ringX.plan import Run  # noqa: E402
from app.common.profiling import device_gaps  # noqa: E402


def _timed(fns, device, repeats: int, warmup: int, queued: int) -> tuple[list[float], list[float]]:
    """Median seconds per pass of each of ``fns``, and the host's share of it: each sample times
    ``queued`` passes launched back to back between two synchronizations (as the calls of a
    training step queue), the host's time being until the last launch returns; the functions
    take turns sample by sample, so a drift of the clock hits them alike. A path whose host time
    reaches its pass time is launch-bound: the device waits for the host."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns:
        for _ in range(warmup):
            fn()
    samples, hosts = [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeats):
        for fn, out, host in zip(fns, samples, hosts):
            sync()
            t = time.perf_counter()
            for _ in range(queued):
                fn()
            host.append((time.perf_counter() - t) / queued)
            sync()
            out.append((time.perf_counter() - t) / queued)
    return [statistics.median(x) for x in samples], [statistics.median(x) for x in hosts]


def measure(L: int, n: int, causal_diag: bool, args, device, dtype) -> tuple[float, float, float]:
    """Seconds of the N bare kernel calls fwd+bwd, of RingX's block path merging each partial as
    it comes (the schedules before grouped merges), and of the same path keeping the partials and
    merging them four at a time (PendingMerges / PendingSums, as the broadcast-kv schedule does),
    for one rank."""
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(1, L, args.heads, args.headdim, device=device, dtype=dtype, generator=g)
    ks = [torch.randn(1, L, args.kv_heads, args.headdim, device=device, dtype=dtype, generator=g) for _ in range(n)]
    vs = [torch.randn_like(k) for k in ks]
    dout = torch.randn_like(q)
    run = prepare_run(RINGX2, q, ks[0], vs[0], causal=causal_diag, group=None)
    kern, scale = run.kernel, run.scale
    # block j: the diagonal (causal when asked) for j == 0, a whole earlier block otherwise
    q_runs = (Run(n * L, 1, L),) if causal_diag else (Run(0, 1, L),)

    def plan(j: int):            # the block path's plan lookup (cached), timed with it
        return run.runs_block(q_runs, (Run(n * L if j == 0 and causal_diag else j * L, 1, L),))

    partials = [run.block_forward(plan(j), q, ks[j], vs[j]) for j in range(n)]
    out_ref, lse_ref = new_accumulators(q, run.acc_dtype)
    for o_j, l_j in partials:
        merge_(out_ref, lse_ref, o_j, l_j)
    out_final, lse_final = out_ref.to(dtype), lse_ref.float()
    out_many, lse_many = torch.empty_like(out_ref), torch.empty_like(lse_ref)
    merge_many_(out_many, lse_many, partials, True)
    del partials
    torch.testing.assert_close(out_many, out_ref, rtol=1e-5, atol=1e-5)   # the two merges agree
    torch.testing.assert_close(lse_many, lse_ref, rtol=1e-5, atol=1e-5)

    def bare():
        for j in range(n):
            kern.forward(q, ks[j], vs[j], causal_diag and j == 0, scale)
        for j in range(n):
            kern.backward(dout, q, ks[j], vs[j], out_final, lse_final, causal_diag and j == 0, scale)

    def ringx():
        for j in range(n):       # the first partial is copied into the accumulators, as the schedules do
            blk = plan(j)
            o_j, l_j = run.block_forward(blk, q, ks[j], vs[j])
            if j == 0:
                out, lse = acc_copy(o_j, run.acc_dtype), l_j.to(run.acc_dtype).contiguous()
            else:
                merge_(out, lse, o_j, l_j)
        o = out.to(dtype)
        dq = torch.empty(q.shape, dtype=run.acc_dtype, device=device)
        for j in range(n):
            blk = plan(j)
            dq_j, dk_j, dv_j = run.block_backward(blk, dout, q, ks[j], vs[j], o, lse_final)
            accumulate_(dq, dq_j, first=j == 0)

    def grouped():
        merges = PendingMerges(q.shape, device, run.acc_dtype)
        for j in range(n):       # the partials merged four at a time, as broadcast-kv does
            merges.add(slice(0, L), *run.block_forward(plan(j), q, ks[j], vs[j]))
        o, lse = merges.finish(dtype)
        sums = PendingSums(q.shape, device, run.acc_dtype)
        for j in range(n):
            sums.add(slice(0, L), run.block_backward(plan(j), dout, q, ks[j], vs[j], o, lse_final)[0])
        sums.finish(dtype)

    fns = (bare, ringx, grouped)
    if args.graph and device.type == "cuda":       # each pass captured once, then replayed: no host work
        fns = tuple(_graphed(fn, device) for fn in fns)
    times, hosts = _timed(fns, device, args.repeats, args.warmup, args.queued)
    result = tuple(times)
    if args.profile:                      # device time of queued passes of each, by kernel
        from app.common.profiling import profiler
        for name, fn, wall in (("kernel alone", bare, result[0]), ("ringX block path", ringx, result[1]),
                               ("grouped merges", grouped, result[2])):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            with profiler(True) as prof:
                for _ in range(args.queued):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            print(f"-- L={L} {'causal' if causal_diag else 'full'} {name}: {args.queued} passes queued, "
                  f"{wall * 1e3:.3f} ms a pass unprofiled")
            print(kernel_means(prof, args.queued))
            print(idle_gaps(prof, args.queued))
    return result, tuple(hosts)


def _graphed(fn, device):
    """fn captured in a CUDA graph (after a warm-up on a side stream): its replay."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def kernel_means(prof, passes: int) -> str:
    """Device microseconds per pass of each kernel (and copy or memset) name, with its launches
    per pass and mean duration."""
    per: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start:
            per.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
    rows = sorted(((sum(v) / passes, len(v) / passes, sum(v) / len(v), k) for k, v in per.items()), reverse=True)
    lines = [f"  device us a pass {sum(r[0] for r in rows):.1f}; by kernel (us a pass, launches a pass, mean us):"]
    lines += [f"    {t:8.1f} {c:5.1f} {m:8.1f}  {k[:90]}" for t, c, m, k in rows]
    calls: dict[str, list[float]] = {}          # host runtime calls: a synchronizing one shows here
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith(("cuda", "cu")):
            calls.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
    lines.append("  runtime calls a pass (count, mean host us): " + ", ".join(
        f"{k} {len(v) / passes:.1f} x {sum(v) / len(v):.1f}" for k, v in sorted(calls.items())))
    return "\n".join(lines)


def idle_gaps(prof, passes: int = 1, top: int = 6) -> str:
    """Where the device waits in profiled passes: the idle time between kernels (and copies),
    per pass (the device events split evenly), and the ``top`` longest gaps with the kernel that
    follows each."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if len(spans) < 2:
        return "  idle: fewer than two device events"
    per_pass = max(1, len(spans) // passes)
    gaps, by_pass = [], [0.0] * passes
    for g, _, _, after, i in device_gaps(spans):
        gaps.append((g, after))
        by_pass[min(i // per_pass, passes - 1)] += g
    reach = max(e for _, e, _ in spans)
    total = sum(g for g, _ in gaps)
    lines = [f"  idle between kernels {total / 1e3:.3f} ms of {(reach - spans[0][0]) / 1e3:.3f} ms "
             f"({len(gaps)} gaps, {len(spans)} device events); by pass (us): "
             + " ".join(f"{x:.0f}" for x in by_pass) + "; the longest, before:"]
    lines += [f"    {g:8.1f} us  {name[:100]}" for g, name in sorted(gaps, reverse=True)[:top]]
    return "\n".join(lines)


def host_costs(L: int, args, device, dtype) -> None:
    """Host microseconds per call of each step of the block path (launch cost: the calls are
    queued without synchronizing, fewer than the launch queue holds), at block size L."""
    from ringX import fused
    g = torch.Generator(device).manual_seed(0)
    q = torch.randn(1, L, args.heads, args.headdim, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, L, args.kv_heads, args.headdim, device=device, dtype=dtype, generator=g)
    v = torch.randn_like(k)
    run = prepare_run(RINGX2, q, k, v, causal=False, group=None)
    kern, scale = run.kernel, run.scale
    o, l = kern.forward(q, k, v, False, scale)
    out, lse = new_accumulators(q, run.acc_dtype)
    blk = run.runs_block((Run(0, 1, L),), (Run(L, 1, L),))
    dq = torch.empty(q.shape, dtype=run.acc_dtype, device=device)
    steps = {
        "kernel.forward": lambda: kern.forward(q, k, v, False, scale),
        "kernel.backward": lambda: kern.backward(o, q, k, v, o, l, False, scale),
        "runs_block (plan lookup)": lambda: run.runs_block((Run(0, 1, L),), (Run(L, 1, L),)),
        "run.block_forward": lambda: run.block_forward(blk, q, k, v),
        "merge_": lambda: merge_(out, lse, o, l),
        "accumulate_": lambda: accumulate_(dq, o),
        "new_accumulators": lambda: new_accumulators(q, run.acc_dtype),
        "empty (b, L, h, d) f32": lambda: torch.empty(q.shape, dtype=torch.float32, device=device),
        "to(bf16)": lambda: out.to(dtype),
        "torch.add_ (same shape)": lambda: out.add_(out),
    }
    if fused.usable(out, o):
        steps["fused.merge (direct)"] = lambda: fused.merge(out, lse, o, l)
    print(f"host us per call at L={L} (queued, unsynchronized; fused kernels: {fused.usable(out, o)}):")
    for name, fn in steps.items():
        print(f"  {name:28s} {host_seconds(fn, args.host_calls, device) * 1e6:8.1f}", flush=True)


def host_seconds(fn, calls: int, device, warmup: int = 3) -> float:
    """Host seconds per call of fn: ``calls`` calls queued without synchronizing (launch cost,
    fewer than the launch queue holds), after ``warmup`` calls and a synchronization."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t) / calls
    sync()
    return host


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="tokens per block (L)")
    p.add_argument("--blocks", type=int, default=4, help="blocks per rank (N)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--queued", type=int, default=5, help="passes launched back to back per timed sample")
    p.add_argument("--graph", action="store_true",
                   help="time CUDA-graph replays of each path (what they cost without host work)")
    p.add_argument("--profile", action="store_true", help="also print each path's device time by kind of kernel")
    p.add_argument("--host", action="store_true",
                   help="instead: host microseconds per call of each step of the block path")
    p.add_argument("--host_calls", type=int, default=50, help="calls per step timed by --host")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    if args.host:
        for L in args.sizes:
            host_costs(L, args, device, dtype)
        dist.destroy_process_group()
        return 0
    print(f"{'L':>6} {'blocks':>6} {'diag':>7} {'kernel ms':>10} {'ringX ms':>10} {'overhead':>9} "
          f"{'grouped ms':>10} {'overhead':>9}  host ms a pass (kernel, ringX, grouped)")
    for L in args.sizes:
        for causal_diag in (False, True):
            (bare, ringx, grouped), hosts = measure(L, args.blocks, causal_diag, args, device, dtype)
            print(f"{L:6d} {args.blocks:6d} {'causal' if causal_diag else 'full':>7} {bare * 1e3:10.3f} "
                  f"{ringx * 1e3:10.3f} {100 * (ringx / bare - 1):8.1f}% {grouped * 1e3:10.3f} "
                  f"{100 * (grouped / bare - 1):8.1f}%  " + " ".join(f"{h * 1e3:6.3f}" for h in hosts), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
