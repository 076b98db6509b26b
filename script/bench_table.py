#!/usr/bin/env python3
"""Collect benchmark runs (results.csv from `python -m ringX.bench`, e.g. the run directories
that submit_frontier.sh / submit_cuda.sh write) into tables and a plot of TFLOP/s per GPU
and efficiency against the number of GPUs, one line per algorithm. The single-device kernel on the
whole sequence (the "single" rows) is the 1-GPU point.

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


def _table(title: str, table: dict[str, dict[int, float]], gpus: list[int], spec: str) -> None:
    print(title)
    print(f"{'method':18}" + "".join(f"{n:>9}" for n in gpus))
    for method, by_n in table.items():
        print(f"{method:18}" + "".join(format(by_n[n], f"9{spec}") if n in by_n else f"{'-':>9}" for n in gpus))


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
    # the single-device kernel on the whole sequence is the 1-GPU point of every scaling line
    tflops: dict[str, dict[int, float]] = {}
    eff: dict[str, dict[int, float]] = {}
    for r in rows:
        n = 1 if r["method"] == "single" else int(r["world_size"])
        tflops.setdefault(r["method"], {})[n] = float(r["tflops_per_gpu"])
        if r["method"] == "single":
            eff.setdefault("single", {})[1] = 1.0
        elif r.get("efficiency"):
            eff.setdefault(r["method"], {})[n] = float(r["efficiency"])
    gpus = sorted({n for v in tflops.values() for n in v})
    _table(f"TFLOP/s per GPU, S={seqlen}, {args.mode}, causal={args.causal}", tflops, gpus, ".1f")
    if any(m != "single" for m in eff):
        _table("efficiency (single-GPU time / N / measured)", eff, gpus, ".2f")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return 0
    panels = [(tflops, "TFLOP/s per GPU")] + ([(eff, "efficiency (ideal / measured)")] if eff else [])
    colors = {m: f"C{i}" for i, m in enumerate(tflops)}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (table, label) in zip(axes[0], panels):
        for method, by_n in table.items():
            if method == "single" and table is eff:
                continue
            # every efficiency line starts at the single-GPU kernel's point (1 GPU, efficiency 1)
            pts = (list(eff.get("single", {}).items()) if table is eff else []) + sorted(by_n.items())
            ax.plot([n for n, _ in pts], [v for _, v in pts], marker="s" if method == "single" else "o",
                    color=colors[method], label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs")
        ax.set_ylabel(label)
        ax.set_title(f"S={seqlen} {args.mode} causal={args.causal}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {os.path.abspath(args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
