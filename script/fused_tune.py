"""Device time of the fused merge kernels (ringX.fused) by launch configuration, on one GPU.

The grouped merges of a rank's blocks (``merge_many``: 4 bf16 partials and their lse into one
bf16 output; ``sum_many``: 4 bf16 gradients into one) are memory-bound: this times them per
tile shape (head-dim rows per program), warps per program and item order (rows of a head
fastest, as ringX.fused walks them, or the heads of a row fastest: each program then reads one
contiguous stretch of every partial), against a plain copy of one partial (the bandwidth
ceiling) and the bytes each moves:

    python script/fused_tune.py --sizes 2048 4096

(b, L, h, d) = (1, L, 32, 128) by default; median of ``--repeats`` replays of a CUDA graph of
``--queued`` launches (device time, no host cost). GPU only.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ringX import fused  # noqa: E402
from block_overhead import host_seconds  # noqa: E402  (this folder comes first on sys.path)

try:
    import triton
except ImportError:
    triton = None


def timed(fn, repeats: int, queued: int) -> float:
    """Median device seconds per launch of fn: ``queued`` launches captured in a CUDA graph
    (no host cost between them), the replay timed between CUDA events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(queued):
            fn()
    graph.replay()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / queued)
    return statistics.median(samples)


def launches(dst, lse_acc, outs, lses, order: str, rows_per_prog: int, warps: int):
    """(merge_many, sum_many) launchers of one configuration: 4 partials, no accumulator."""
    b, s, h, d = dst.shape
    block_d = triton.next_power_of_2(d)
    if order == "rows":          # the kernels' own decoding: items (b, h, s), s fastest
        shape, ts, os_, ls, las = (b, s, h), dst.stride()[:3], outs[0].stride()[:3], lses[0].stride(), lse_acc.stride()
    else:                        # heads fastest: swap the roles of s and h in shape and strides
        t, o = dst.stride(), outs[0].stride()
        shape, ts, os_ = (b, h, s), (t[0], t[2], t[1]), (o[0], o[2], o[1])
        ls = (lses[0].stride(0), lses[0].stride(2), lses[0].stride(1))
        las = (lse_acc.stride(0), lse_acc.stride(2), lse_acc.stride(1))
    n = shape[0] * shape[1] * shape[2]
    grid = (triton.cdiv(n, rows_per_prog),)
    meta = dict(BLOCK_M=rows_per_prog, BLOCK_D=block_d, num_warps=warps)

    def merge():
        fused._merge_many_kernel[grid](dst, dst, lse_acc, *outs, *lses, n, shape[1], shape[2], d,
                                       *ts, *ts, *las, *os_, *ls, COUNT=4, HAS_ACC=False, **meta)

    def summ():
        fused._sum_many_kernel[grid](dst, dst, *outs, n, shape[1], shape[2], d, *ts, *ts, *os_,
                                     COUNT=4, ADD=False, **meta)
    return merge, summ


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--queued", type=int, default=20)
    p.add_argument("--host_only", action="store_true", help="only the host costs per call (no sweep)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or triton is None:
        print("fused_tune.py needs a CUDA GPU and Triton")
        return 1
    dev, dt = torch.device("cuda"), torch.bfloat16
    for L in args.sizes:
        shape = (1, L, args.heads, args.headdim)
        outs = [torch.randn(shape, device=dev, dtype=dt) for _ in range(4)]
        lses = [torch.randn(1, args.heads, L, device=dev) for _ in range(4)]
        dst, lse_acc = torch.empty_like(outs[0]), torch.empty_like(lses[0])
        part = outs[0].numel() * outs[0].element_size()
        moved = 5 * part                      # 4 partials read, one result written (lse aside)
        copy = timed(lambda: dst.copy_(outs[0]), args.repeats, args.queued)
        print(f"L={L}: one partial {part / 2**20:.0f} MiB; copy of it {copy * 1e6:.1f} us "
              f"({2 * part / copy / 1e12:.2f} TB/s); merge and sum move {moved / 2**20:.0f} MiB")
        ref_o, ref_l = torch.empty_like(dst), torch.empty_like(lse_acc)
        fused.merge_many(ref_o, None, ref_l, outs, lses, has_acc=False)
        ref_s = torch.empty_like(dst)
        fused.sum_many(ref_s, outs)
        print(f"  {'order':>5} {'rows/prog':>9} {'warps':>5} {'merge us':>9} {'TB/s':>5} {'sum us':>8} {'TB/s':>5}")
        for order in () if args.host_only else ("rows", "heads"):
            for rows_per_prog in (8, 16, 32, 64):
                for warps in (2, 4, 8):
                    merge, summ = launches(dst, lse_acc, outs, lses, order, rows_per_prog, warps)
                    merge()
                    torch.testing.assert_close(dst, ref_o, rtol=0, atol=0)
                    torch.testing.assert_close(lse_acc, ref_l, rtol=0, atol=0)
                    summ()
                    torch.testing.assert_close(dst, ref_s, rtol=0, atol=0)
                    tm, tsum = timed(merge, args.repeats, args.queued), timed(summ, args.repeats, args.queued)
                    print(f"  {order:>5} {rows_per_prog:9d} {warps:5d} {tm * 1e6:9.1f} {moved / tm / 1e12:5.2f} "
                          f"{tsum * 1e6:8.1f} {moved / tsum / 1e12:5.2f}", flush=True)
        host_costs(dst, lse_acc, outs, lses)
    return 0


if triton is not None:           # launch cost by argument count (the kernels do nothing)
    import triton.language as tl

    @triton.jit
    def _nop_few(a, b, n, BLOCK: tl.constexpr):
        pass

    @triton.jit
    def _nop_many(a, b, c, d, e, f, g, h, i, j, k, n0, n1, n2, n3, n4, n5, n6, n7, n8, n9,
                  n10, n11, n12, n13, n14, n15, n16, n17, n18, BLOCK: tl.constexpr):
        pass


def direct_call(kernel, grid, args, meta, as_ints: bool):
    """A call of kernel's compiled launcher with these arguments, skipping Triton's binding (and,
    with ``as_ints``, passing the tensors' addresses, which skips the launcher's pointer query)."""
    compiled = kernel[grid](*args, **meta)
    bound, _, _ = kernel.device_caches[torch.cuda.current_device()][4](*args, **meta)
    vals = [v.data_ptr() if as_ints and isinstance(v, torch.Tensor) else v for v in bound.values()]
    stream = torch.cuda.current_stream().cuda_stream
    run, fn, packed = compiled.run, compiled.function, compiled.packed_metadata
    grid = (*grid, 1, 1)
    return lambda: run(grid[0], grid[1], grid[2], stream, fn, packed, None, None, None, *vals)


def host_costs(dst, lse_acc, outs, lses, calls: int = 200) -> None:
    """Host microseconds per call (queued, unsynchronized) of the wrappers, with ringX.fused's
    direct launches and with Triton's own launch path (RINGX_FUSED_DIRECT=0), of the bare
    Triton launches and of the compiled launcher called directly, against a PyTorch op."""
    merge, summ = launches(dst, lse_acc, outs, lses, "rows", 32, 4)
    wrappers = {"fused.merge_many": lambda: fused.merge_many(dst, None, lse_acc, outs, lses, has_acc=False),
                "fused.sum_many": lambda: fused.sum_many(dst, outs),
                "fused.merge": lambda acc=dst.float(): fused.merge(acc, lse_acc, outs[0], lses[0])}
    steps = {}
    for direct in ("1", "0"):
        for name, fn in wrappers.items():
            steps[f"{name} (RINGX_FUSED_DIRECT={direct})"] = (direct, fn)
    steps.update({"_merge_many_kernel[grid](...)": ("0", merge), "_sum_many_kernel[grid](...)": ("0", summ),
                  "torch add_ (reference)": ("0", lambda: dst.add_(outs[0])),
                  "empty kernel, 2 tensors + 1 int": ("0", lambda: _nop_few[(1,)](dst, outs[0], 1, BLOCK=16)),
                  "empty kernel, 11 tensors + 19 ints": ("0", lambda: _nop_many[(1,)](
                      dst, dst, lse_acc, *outs, *lses, *(16,) * 19, BLOCK=16))})
    nop_args = (dst, dst, lse_acc, *outs, *lses, *(16,) * 19)
    for as_ints in (False, True):      # the compiled launcher called directly (no argument binding)
        what = "pointers as ints" if as_ints else "tensors"
        steps[f"empty kernel direct, {what}"] = ("0", direct_call(_nop_many, (1,), nop_args, dict(BLOCK=16), as_ints))
    print("  host us per call:")
    for name, (direct, fn) in steps.items():
        os.environ["RINGX_FUSED_DIRECT"] = direct
        print(f"    {name:42s} {host_seconds(fn, calls, dst.device, warmup=5) * 1e6:7.1f}", flush=True)
    os.environ["RINGX_FUSED_DIRECT"] = "1"
    import cProfile
    import pstats
    prof = cProfile.Profile()      # where a wrapper call's host time goes, by function
    prof.enable()
    for _ in range(calls):
        wrappers["fused.merge_many"]()
    prof.disable()
    torch.cuda.synchronize()
    print(f"  cProfile of {calls} fused.merge_many calls, direct launches (tottime, by function):")
    pstats.Stats(prof).strip_dirs().sort_stats("tottime").print_stats(10)


if __name__ == "__main__":
    sys.exit(main())
