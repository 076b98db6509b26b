"""Benchmark driver: ``python -m ringX.bench`` (see ringX.bench for the metrics).

Ranks come from the launcher (torchrun, srun, mpirun via ringX.launch) or, with no launcher,
``--nproc`` ranks are spawned here. Rank 0 writes results.csv, results.json and efficiency.png
under --out and prints the table last.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..api import bytes_sent, transport_workspace_bytes
from ..comm import GroupComm
from ..testing import global_rel_err
from ..layout import shard
from . import methods as M
from . import profile as P
from . import report

SEED_SWEEP = [(16, 8192), (8, 16384), (4, 32768), (2, 65536), (1, 131072), (1, 262144),
              (1, 524288), (1, 1048576)]
TINY_SWEEP = [(2, 128), (1, 256)]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def attn_flops(batch: int, seqlen: int, heads: int, headdim: int, causal: bool, mode: str) -> float:
    fwd = 4.0 * batch * seqlen * seqlen * heads * headdim * (0.5 if causal else 1.0)
    return fwd * (3.5 if mode == "fwd_bwd" else 1.0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step, fwd_only: bool, warmup: int, repeats: int, device, group,
              timing: str = "queued", warmup_s: float = 0.0) -> tuple[float, torch.Tensor]:
    """Median seconds per call over ``repeats`` (after ``warmup``), max over the group's ranks.

    With ``warmup_s`` > 0 the warm-up goes on for at least that many seconds of calls (the same
    number on every rank), so the timed calls run at the clock a sustained training run gets: a
    GPU coming out of an idle gap runs faster until its power limit pulls the clock down.

    On GPUs each call lies between two CUDA events. timing="queued" queues the calls back to back,
    as a training step does, so the host launches a call while the device still runs the one
    before it; timing="idle" waits for each call before launching the next, so every call also
    pays its host time before its first kernel. On CPUs: wall time per call.
    """
    out = None
    for _ in range(warmup):
        out = step(fwd_only)
    _sync(device)
    if warmup_s > 0:
        t0 = time.perf_counter()
        out = step(fwd_only)
        _sync(device)
        more = _max_over(math.ceil(warmup_s / max(time.perf_counter() - t0, 1e-6)) - 1, group)
        for _ in range(int(more)):
            out = step(fwd_only)
        _sync(device)
    samples = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            out = step(fwd_only)
            end.record()
            if timing == "idle":
                end.synchronize()
        _sync(device)
        samples = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = step(fwd_only)
            samples.append(time.perf_counter() - t0)
    return _max_over(statistics.median(samples), group), out


def _max_over(x: float, group) -> float:
    """The largest ``x`` over the ranks of ``group``."""
    comm = GroupComm(group)
    t = torch.tensor([x], dtype=torch.float64, device=comm.collective_device())
    comm.all_reduce(t, op=dist.ReduceOp.MAX, async_op=False)
    return float(t.item())


def document_boundaries(spec: str, seqlen: int, seed: int) -> tuple[int, ...] | None:
    """Global cu_seqlens of a packed sequence from --docs: "none", "fixed:L" (documents of L
    tokens, the last one shorter), "lognormal:MEAN" (lengths drawn lognormal with that mean,
    sigma 1, from ``seed``; the last one cut at S) or "corpus:X.docs.npy" (the document lengths
    of a real corpus, app/gpt/corpus.py's index, in order from its first document)."""
    if spec in (None, "", "none"):
        return None
    kind, _, value = spec.partition(":")
    if kind == "corpus":
        import numpy as np
        lengths = iter(np.diff(np.load(value)).tolist())
    elif kind not in ("fixed", "lognormal") or not value.isdigit() or int(value) < 1:
        raise ValueError(f"--docs must be none, fixed:LENGTH, lognormal:MEAN or corpus:X.docs.npy, got {spec!r}")
    mean = int(value) if kind != "corpus" else 0
    g = torch.Generator().manual_seed(seed)
    cuts, x = [0], 0
    while x < seqlen:
        if kind == "fixed":
            step = mean
        elif kind == "corpus":
            step = next(lengths, seqlen)                  # a corpus shorter than S: one last document
        else:                                             # E[exp(N(mu, 1))] = exp(mu + 1/2) = mean
            step = max(1, int(torch.empty(1).log_normal_(math.log(mean) - 0.5, 1.0, generator=g)))
        x = min(seqlen, x + int(step))
        cuts.append(x)
    return tuple(cuts)


def bench_mask(args, seqlen: int, causal: bool):
    """The benchmark's global mask (ringX.plan.Mask), or None for plain full / causal attention.
    --window W: each query sees W keys ending at itself (causal) or W - 1 on each side (full)."""
    from ..plan import Mask
    docs = document_boundaries(args.docs, seqlen, args.seed)
    w = args.window
    window = (-1, -1) if not w else (w - 1, 0 if causal else w - 1)
    if docs is None and window == (-1, -1):
        return None
    return Mask(causal, window, docs)


def mask_pairs(mask, seqlen: int) -> int:
    """Visible (query, key) pairs of the whole masked sequence (its FLOPs count only these)."""
    from ..plan import Run, plan_block
    plan = plan_block((Run(0, 1, seqlen),), (Run(0, 1, seqlen),), mask, True, 0)
    return 0 if plan is None else plan.pairs


def make_full(batch, seqlen, heads, kv_heads, headdim, dtype, device, seed) -> dict:
    """Global random inputs (normal, never zeros), identical on every rank."""
    g = torch.Generator(device=device).manual_seed(seed)
    def rnd(h):
        return torch.randn(batch, seqlen, h, headdim, generator=g, device=device, dtype=dtype)
    return {"q": rnd(heads), "k": rnd(kv_heads), "v": rnd(kv_heads), "dout": rnd(heads)}


def measure(prep, fwd_only, args, device, group, local_bytes: int) -> dict:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    seconds, out = time_step(prep.step, fwd_only, args.warmup, args.repeats, device, group, args.timing,
                              args.warmup_s)
    mem = None
    if device.type == "cuda":
        mem = _max_over((torch.cuda.max_memory_allocated(device) - base + local_bytes) / 2**30, group)
    return {"seconds": seconds, "out": out.detach(), "mem": mem}


@dataclass(frozen=True)
class _Config:
    """One (S, causal, mode) point of the sweep: what every method's row is measured against.
    full: the whole-sequence inputs; ref_out: the single device's output (None: no check);
    ideal: seconds per call of the ideal (None: unknown) and ``source``, how it was obtained;
    single_local: the single device's measurement at S/N (for its memory)."""
    args: argparse.Namespace
    device: torch.device
    group: object
    seqlen: int
    causal: bool
    mode: str
    full: dict
    flops: float
    ref_out: torch.Tensor | None
    ideal: float | None
    source: str
    single_local: dict


def bench_config(args, batch, seqlen, causal, mode, device, group, single_times: dict) -> list[dict]:
    n = dist.get_world_size(group)
    fwd_only = mode == "fwd"
    full = make_full(batch, seqlen, args.heads, args.kv_heads, args.headdim, DTYPES[args.dtype],
                     device, args.seed + seqlen + int(causal))
    base = {"world_size": n, "batch": batch, "seqlen": seqlen, "heads": args.heads,
            "kv_heads": args.kv_heads, "headdim": args.headdim, "dtype": args.dtype,
            "causal": causal, "mode": mode, "timing": args.timing,
            "warmup_s": args.warmup_s}
    mask = bench_mask(args, seqlen, causal)
    flops = attn_flops(batch, seqlen, args.heads, args.headdim, causal, mode)
    if mask is not None:
        flops = 4.0 * batch * mask_pairs(mask, seqlen) * args.heads * args.headdim * (
            3.5 if mode == "fwd_bwd" else 1.0)
        base.update(docs=args.docs, window=args.window,
                    num_docs=len(mask.docs) - 1 if mask.docs else 1)
    rows, ref_out = [], None
    # single device on the whole sequence (ideal = its time / N), and its memory at S/N
    key = (batch * args.heads, causal, mode, args.docs, args.window)
    if seqlen <= args.single_max_seqlen:
        prep = (M.single_device(full, causal, args.backend) if mask is None
                else M.single_device_masked(full, mask, args.backend))
        m = measure(prep, fwd_only, args, device, group, 0)
        single_times[key] = (seqlen, m["seconds"], flops)
        ideal, source = m["seconds"] / n, "measured"
        if seqlen <= args.check_max_seqlen:
            ref_out = m["out"]
        rows.append({**base, "method": "single", "time_ms": m["seconds"] * 1e3,
                     "tflops_per_gpu": flops / m["seconds"] / 1e12, "peak_mem_gb": m["mem"],
                     "note": f"1 device, whole S; {prep.note}"})
        del prep, m
    elif key in single_times:
        s_meas, t_meas, f_meas = single_times[key]
        ideal, source = t_meas * flops / f_meas / n, f"extrapolated from S={s_meas} as FLOPs"
    else:
        ideal, source = None, "no single-device measurement"
    local = seqlen // n
    single_local = measure(M.single_device(full, causal, args.backend, local), fwd_only, args, device, group,
                           sum(full[x][:, :local].numel() * full[x].element_size() for x in full))
    cfg = _Config(args, device, group, seqlen, causal, mode, full, flops, ref_out, ideal, source, single_local)
    for method in args.methods:
        row = {**base, "method": method}
        prep, failure = None, None
        try:
            prep = M.prepare(method, full, causal, group, args.backend, mask)
        except Exception as exc:  # a method that cannot run here is reported, not fatal
            failure = exc
        # every rank skips a method that any rank could not set up, so that no rank is left
        # waiting in a collective the others never join
        ok = _all_true(failure is None, group)
        if ok:
            try:
                _measure_method(row, method, prep, cfg)
            except Exception as exc:
                failure = exc
            ok = _all_true(failure is None, group)
        if not ok:
            row = {**base, "method": method, "note": _skip_note(failure)}
        if hasattr(prep, "close"):
            prep.close()
        del prep
        rows.append(row)
    native_best = min((row["time_ms"] for row in rows if row["method"] in M.NATIVE and row.get("time_ms")),
                      default=None)
    for row in rows:
        if native_best and row.get("time_ms") and row["method"] not in M.NATIVE:
            row["speedup_vs_native"] = native_best / row["time_ms"]
    if device.type == "cuda":
        del full, cfg
        torch.cuda.empty_cache()
    return rows


def _skip_note(exc: BaseException | None) -> str:
    if exc is None:
        return "skipped: failed on another rank"
    return f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def _all_true(flag: bool, group) -> bool:
    """True on every rank when ``flag`` holds on every rank of ``group``."""
    return _max_over(0.0 if flag else 1.0, group) == 0.0


def _measure_method(row, method, prep, cfg: _Config) -> None:
    """Times ``prep`` into ``row``: time, TFLOP/s, efficiency, memory, the check against the
    single device, and with --profile one profiled call."""
    args, full, ref_out, group = cfg.args, cfg.full, cfg.ref_out, cfg.group
    n, r = dist.get_world_size(group), dist.get_rank(group)
    local_bytes = sum(full[x].numel() * full[x].element_size() for x in full) // n
    if method in M.NATIVE:
        local_bytes = sum(full[x].numel() * full[x].element_size() * (args.heads // args.kv_heads if x in "kv" else 1)
                          for x in full) // n
    m = measure(prep, cfg.mode == "fwd", args, cfg.device, group, local_bytes)
    if m["mem"] is not None and method in M.COPY:    # the staging buffer, outside torch's stats
        m["mem"] += transport_workspace_bytes(group) / 2**30
    err = None
    if ref_out is not None and prep.layout in ("contiguous", "zigzag"):
        err = global_rel_err(m["out"], shard(ref_out, prep.layout, r, n), group)
    elif ref_out is not None and prep.positions is not None:
        err = global_rel_err(m["out"], ref_out.index_select(1, prep.positions), group)
    elif ref_out is not None and hasattr(prep, "to_full"):
        err = global_rel_err(prep.to_full(m["out"]), ref_out)
    row["sent_mb"] = None
    if method in M.ATTN_FUNCS or method in M.COPY or method in M.HIERARCHICAL:   # ringX calls tally their bytes
        sent = bytes_sent(group)
        prep.step(cfg.mode == "fwd")              # one more call: the bytes it puts on the wire
        row["sent_mb"] = _max_over((bytes_sent(group) - sent) / 2**20, group)
    row.update(time_ms=m["seconds"] * 1e3, tflops_per_gpu=cfg.flops / n / m["seconds"] / 1e12,
               peak_mem_gb=m["mem"], single_mem_gb=cfg.single_local["mem"], check_err=err, note=prep.note)
    if cfg.ideal is not None:
        row.update(efficiency=cfg.ideal / m["seconds"], ideal_ms=cfg.ideal * 1e3, ideal_source=cfg.source)
    if err is not None and not err < args.check_tol:
        row["note"] = f"WRONG: rel err {err:.2e} vs single device"
    if args.profile:
        name = f"{method}_S{cfg.seqlen}_{'causal' if cfg.causal else 'full'}_{cfg.mode}_rank{r}.json"
        prof = P.profile_call(prep.step, cfg.mode == "fwd", cfg.device, os.path.join(args.out, "traces", name), group)
        row.update({f"prof_{k}": v if v is None else _max_over(v, group) for k, v in prof.items()})


def run(args, device) -> list[dict]:
    group = dist.group.WORLD
    sweep = {"seed": SEED_SWEEP, "tiny": TINY_SWEEP}.get(args.sweep) or [(args.batch, s) for s in args.seqlens]
    causals = {"true": [True], "false": [False], "both": [False, True]}[args.causal]
    rows, single_times = [], {}
    for batch, seqlen in sweep:
        for causal in causals:
            for mode in args.modes:
                rows += bench_config(args, batch, seqlen, causal, mode, device, group, single_times)
                if dist.get_rank() == 0:
                    print(report.table(rows[-len(args.methods) - 1:]).split("\n", 2)[-1], flush=True)
    return rows


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m ringX.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+",
                   default=[m for m in M.all_methods() if m not in M.COPY + M.HYBRID + M.HIERARCHICAL],
                   choices=M.all_methods(),
                   help="NAME+copy: a ringX function with RINGX_TRANSPORT=copy (CUDA, one node)")
    p.add_argument("--sweep", choices=["seed", "tiny", "none"], default="none",
                   help="seed: the seed project's (batch, S) pairs; tiny: CPU smoke test")
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 65536, 131072, 262144])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--causal", choices=["true", "false", "both"], default="both")
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd_bwd"], default=["fwd", "fwd_bwd"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--warmup-s", type=float, default=None,
                   help="warm up each method for at least this many seconds (default 1 on GPUs, 0 on "
                        "CPUs), so it is timed at the sustained, power-limited clock, not the boost "
                        "clock that follows the idle gap before it")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timing", choices=["queued", "idle"], default="queued",
                   help="GPUs: queued = calls back to back as in training (the host launches ahead); "
                        "idle = each call starts on an idle device, so its host time counts too")
    p.add_argument("--single-max-seqlen", type=int, default=262144)
    p.add_argument("--check-max-seqlen", type=int, default=262144)
    p.add_argument("--check-tol", type=float, default=2e-2, help="max rel L2 error vs single device")
    p.add_argument("--backend", default=None, help="local kernel backend (default: registry choice)")
    p.add_argument("--docs", default="none",
                   help="packed documents: none, fixed:LENGTH, lognormal:MEAN or corpus:X.docs.npy (a real "
                        "corpus's document lengths, python -m app.gpt.corpus) (batch 1; ringX through "
                        "its varlen function; ideal = the single device's varlen time of the same "
                        "mask / N)")
    p.add_argument("--window", type=int, default=0,
                   help="sliding window of W tokens: window_size (W-1, 0) causal, (W-1, W-1) full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="one more call per method under torch.profiler: compute, communication, exposed "
                        "communication and idle time on the device (max over ranks), Chrome traces under OUT/traces")
    p.add_argument("--out", default=None, help="run directory (default runs/bench/<time>)")
    p.add_argument("--nproc", type=int, default=4, help="ranks to spawn when no launcher started us")
    args = p.parse_args(argv)
    if args.sweep == "tiny":
        args.heads, args.kv_heads, args.headdim = min(args.heads, 4), min(args.kv_heads, 2), min(args.headdim, 32)
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
    if args.warmup_s is None:
        args.warmup_s = 1.0 if torch.cuda.is_available() else 0.0
    if args.warmup_s < 0:
        p.error(f"--warmup-s must be >= 0, got {args.warmup_s}")
    args.out = args.out or os.path.join("runs", "bench", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return args


def _entry(args, rank: int, world_size: int, device) -> None:
    if rank == 0:
        print(f"ringX.bench: {world_size} ranks, {dist.get_backend()} on "
              f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
              f"{torch.__version__}, cudnn {torch.backends.cudnn.version()}, nccl "
              f"{'.'.join(map(str, torch.cuda.nccl.version())) if device.type == 'cuda' else '-'}, "
              f"{args.dtype}, heads {args.heads}/{args.kv_heads}, dim {args.headdim}, timing {args.timing}, "
              f"documents {args.docs}, window {args.window or 'none'}, "
              f"warm-up {args.warmup} calls + {args.warmup_s:g} s",
              flush=True)
    rows = run(args, device)
    if rank == 0:
        paths = report.write(rows, args.out)
        print("wrote " + ", ".join(paths))
        if args.profile:
            print(report.profile_table(rows))
        print(report.table(rows))


def _entry_spawned(rank, world_size, device, args) -> None:
    _entry(args, rank, world_size, device)


def main(argv=None) -> int:
    args = parse(argv)
    from ..launch import detect_env, init_distributed, spawn
    if detect_env().launcher != "none":
        info = init_distributed()
        try:
            _entry(args, info.rank, info.world_size, info.device)
        finally:
            dist.destroy_process_group()
        return 0
    spawn(args.nproc, _entry_spawned, args, pg_timeout_s=600)
    return 0


if __name__ == "__main__":
    from ..launch import leave
    leave(main())
