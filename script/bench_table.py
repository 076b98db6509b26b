#!/usr/bin/env python3
"""Collect benchmark runs (results.csv from `python -m ringX.bench`, e.g. the run directories
that submit_frontier.sh / submit_cuda.sh write) into one table and a plot of TFLOP/s per GPU
against the number of GPUs, one line per algorithm.

    python script/bench_table.py runs/bench/*/results.csv --seqlen 131072 --mode fwd_bwd --causal true
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import sys


def load(paths: list[str]) -> list[dict]:
    rows = []
    for pattern in paths:
        for path in sorted(glob.glob(pattern)) or [pattern]:
            with open(path) as f:
                rows += list(csv.DictReader(f))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", help="results.csv files or glob patterns")
    p.add_argument("--seqlen", type=int, default=None, help="total sequence length (default: largest)")
    p.add_argument("--mode", default="fwd_bwd", choices=["fwd", "fwd_bwd"])
    p.add_argument("--causal", default="true", choices=["true", "false"])
    p.add_argument("--plot", default="tflops_vs_gpus.png")
    args = p.parse_args(argv)
    rows = [r for r in load(args.csv) if r.get("time_ms") and r["mode"] == args.mode
            and r["causal"].lower() == args.causal]
    if not rows:
        print("no timed rows match", file=sys.stderr)
        return 1
    seqlen = args.seqlen or max(int(r["seqlen"]) for r in rows)
    rows = [r for r in rows if int(r["seqlen"]) == seqlen]
    table: dict[str, dict[int, float]] = {}
    for r in rows:
        table.setdefault(r["method"], {})[int(r["world_size"])] = float(r["tflops_per_gpu"])
    gpus = sorted({n for v in table.values() for n in v})
    print(f"TFLOP/s per GPU, S={seqlen}, {args.mode}, causal={args.causal}")
    print(f"{'method':18}" + "".join(f"{n:>9}" for n in gpus))
    for method, by_n in table.items():
        print(f"{method:18}" + "".join(f"{by_n[n]:9.1f}" if n in by_n else f"{'-':>9}" for n in gpus))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return 0
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_n in table.items():
        ns = sorted(by_n)
        ax.plot(ns, [by_n[n] for n in ns], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("TFLOP/s per GPU")
    ax.set_title(f"S={seqlen} {args.mode} causal={args.causal}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {os.path.abspath(args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
