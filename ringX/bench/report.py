"""Benchmark output: CSV, JSON, a plot of efficiency vs sequence length, and a short table."""
from __future__ import annotations

import csv
import json
import os

COLUMNS = ("method", "world_size", "batch", "seqlen", "heads", "kv_heads", "headdim", "dtype",
           "causal", "docs", "num_docs", "window", "mode", "timing", "warmup_s", "time_ms", "tflops_per_gpu", "efficiency",
           "speedup_vs_native",
           "peak_mem_gb", "single_mem_gb", "sent_mb", "check_err", "ideal_ms", "ideal_source", "note",
           "prof_span_ms", "prof_compute_ms", "prof_comm_ms", "prof_exposed_comm_ms", "prof_idle_ms")


def write(rows: list[dict], out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.csv"), os.path.join(out_dir, "results.json")]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})
    with open(paths[1], "w") as f:
        json.dump(rows, f, indent=1)
    plot = _plot(rows, os.path.join(out_dir, "efficiency.png"))
    return paths + ([plot] if plot else [])


def _plot(rows: list[dict], path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return None
    modes = sorted({(r["causal"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, (causal, mode) in zip(axes[0], modes):
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "single"):
            pts = sorted((r["seqlen"], r["efficiency"]) for r in rows if r["method"] == method
                         and r["causal"] == causal and r["mode"] == mode and r.get("efficiency"))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("total sequence length")
        ax.set_ylabel("efficiency (ideal / measured)")
        ax.set_title(f"{'causal' if causal else 'full'} {mode}, N={rows[0]['world_size']}")
        ax.axhline(1.0, color="gray", lw=0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else str(v or "-")


def table(rows: list[dict]) -> str:
    head = (f"{'method':18} {'S':>8} {'b':>2} {'causal':>6} {'mode':>7} {'ms':>9} {'TF/s/gpu':>8} "
            f"{'eff':>5} {'x native':>8} {'mem GB':>7} {'1gpu@S/N':>8} {'sent MB':>8} {'err':>8}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['method']:18} {r['seqlen']:>8} {r['batch']:>2} {str(r['causal']):>6} {r['mode']:>7} "
            f"{_fmt(r.get('time_ms'), '9.2f')} {_fmt(r.get('tflops_per_gpu'), '8.1f')} "
            f"{_fmt(r.get('efficiency'), '5.2f')} {_fmt(r.get('speedup_vs_native'), '8.2f')} "
            f"{_fmt(r.get('peak_mem_gb'), '7.2f')} {_fmt(r.get('single_mem_gb'), '8.2f')} "
            f"{_fmt(r.get('sent_mb'), '8.2f')} {_fmt(r.get('check_err'), '8.1e')}  {r.get('note', '')}")
    return "\n".join(lines)


def profile_table(rows: list[dict]) -> str:
    """The --profile columns (ms on the device time line of one call, max over ranks)."""
    head = (f"{'method':18} {'S':>8} {'causal':>6} {'mode':>7} {'call ms':>9} {'span':>9} {'compute':>9} "
            f"{'comm':>9} {'exposed':>9} {'idle':>9}")
    lines = ["profile of one call (device kernels; exposed = communication with no compute beside it)",
             head, "-" * len(head)]
    for r in rows:
        if "prof_span_ms" not in r:
            continue
        lines.append(f"{r['method']:18} {r['seqlen']:>8} {str(r['causal']):>6} {r['mode']:>7} "
                     f"{_fmt(r.get('time_ms'), '9.2f')} " + " ".join(
                         _fmt(r.get(f"prof_{k}"), '9.2f') for k in ("span_ms", "compute_ms", "comm_ms",
                                                                     "exposed_comm_ms", "idle_ms")))
    return "\n".join(lines)
