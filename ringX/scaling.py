"""A scaling model of context-parallel attention: predicted time of one forward + backward of
each schedule, for a machine description, any cp degree and sequence length.

    python -m ringX.scaling --machine h200-ib --seqlen 1048576 --cp 128     # recommend a schedule
    python -m ringX.scaling --check                   # predicted vs measured on the recorded runs
    python -m ringX.scaling --curves OUT              # efficiency tables for the published machines

Per rank: compute = the rank's attention FLOPs (fwd + bwd = 3.5 x the forward's 4 S_q S_k h d,
half of it causal) / the kernel's throughput at the schedule's block size (measured by the
benchmark: ``Machine.kernel_tflops``); communication = the bytes each rank moves over each
level of the network / that level's bandwidth, plus a latency per message; the schedules
overlap communication with compute, so time = compute + the part of communication that compute
does not hide + a fixed cost per step. Bytes per rank and level (S tokens, N = Ni x No ranks,
kv = k + v bytes of a token, q = q bytes of a token; derived from the schedules and checked
against the schedules' own byte tally where they are point-to-point; collectives follow NCCL's
ring algorithms: an all-gather or reduce-scatter moves (N-1)/N of the data through each rank, a
broadcast or reduce the whole message once per rank):

- ringX3 (all-gather k/v, reduce-scatter dk/dv): full 3 (N-1) S/N kv, causal 4 (N-1) S/N kv;
- ringX4 (a broadcast of each rank's k/v, reduces of dk/dv): 4 N S/N kv;
- ringX1/ringX2 full (broadcast q, reduce float32 out / dq): N S/N (7 q) + small;
- ringX1/ringX2 causal (paired point-to-point): (4.625 N - 4.125) S/N kv (the byte tally:
  test/test_scaling.py);
- hierarchical ringX3 (ringX.node_groups): each all-gather first across nodes among the ranks at
  the same place of a node ((No - 1) S/N kv per GPU over its own network link), then inside the
  node over NVLink; reduce-scatters the other way round. The network stage of the two
  all-gathers is waited for before the node stage (not hidden behind compute);
- hybrid (Ulysses over Ni x a ringX function over No): four all-to-alls of (q, k, v, out) and
  four back in backward within the node, then the function over No ranks on Ni S/N tokens and
  h/Ni heads;
- PyTorch's all-gather context parallel: like ringX3 with k/v expanded to all heads' groups.

Calibration: ``fit`` chooses the overlap and per-step cost of each schedule and the effective
NVLink bandwidth from the recorded single-node runs (docs/data), least squares on relative error.
"""
from __future__ import annotations

import argparse
import csv
import functools
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

SCHEDULES = ("ringX1", "ringX2", "ringX3", "ringX4", "ringX3-hier", "native-allgather")
# ringX1 with causal=True ran the broadcast-q schedule before the balanced paired one (commit
# 8f2a736), and so did ringX2 before its fourth round (the 4- and 8-GPU records): those recorded
# causal rows are of that schedule, whose busiest rank (the last) computes 2 - 1/N times the mean.
HISTORICAL = ("ringX1-bcast", "ringX2-bcast")


@dataclass(frozen=True)
class Machine:
    """What the model needs to know about a machine. kernel_tflops: (block tokens, TFLOP/s of
    the attention kernel fwd+bwd) points, interpolated in log(block); bandwidths in GB/s per GPU
    and direction; latencies in microseconds per message."""

    name: str
    gpus_per_node: int
    intra_gb_s: float
    inter_gb_s: float
    memory_gb: float = 141.0
    intra_latency_us: float = 10.0
    inter_latency_us: float = 20.0
    kernel_tflops: tuple = ((1024, 283.0), (2048, 491.0), (4096, 547.0), (8192, 540.0), (32768, 545.0),
                            (131072, 557.0))
    # fitted per schedule: (fraction of communication hidden behind compute, ms per step)
    overlap: dict = field(default_factory=lambda: {s: 0.85 for s in SCHEDULES + HISTORICAL})
    step_ms: dict = field(default_factory=lambda: {s: 0.05 for s in SCHEDULES + HISTORICAL})

    def tflops(self, block: float) -> float:
        pts = self.kernel_tflops
        if block <= pts[0][0]:
            return pts[0][1] * block / pts[0][0]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if block <= x1:
                t = math.log(block / x0) / math.log(x1 / x0)
                return y0 + t * (y1 - y0)
        return pts[-1][1]


H200_NODE = Machine("h200-node", 8, 900.0 * 0.62, 900.0 * 0.62)
MACHINES = {
    "h200-node": H200_NODE,                                       # one NVLink node (the recorded runs)
    "h200-ib": replace(H200_NODE, name="h200-ib", inter_gb_s=50.0),  # nodes of 8, 400 Gb/s IB per GPU
    # 8 MI250X GCDs per node joined by Infinity Fabric (50-100 GB/s between GCDs: 100 taken),
    # 25 GB/s Slingshot per GCD. The attention kernel is ASSUMED, not measured: the H200 curve
    # scaled to 95 TFLOP/s at long blocks (half the GCD's 191.5 bf16 peak); replace it with
    # `python -m ringX.bench --nproc 1` figures from the machine.
    "frontier": replace(H200_NODE, name="frontier", gpus_per_node=8, intra_gb_s=100.0, inter_gb_s=25.0,
                        inter_latency_us=30.0, memory_gb=64.0,
                        kernel_tflops=tuple((b, t * 95.0 / 557.0) for b, t in H200_NODE.kernel_tflops)),
}


@dataclass(frozen=True)
class Shape:
    """Attention shape: heads, kv heads, head dim, bytes per element, batch."""

    heads: int = 32
    kv_heads: int = 8
    headdim: int = 128
    itemsize: int = 2
    batch: int = 1

    @property
    def q_bytes(self) -> float:           # per token
        return self.batch * self.heads * self.headdim * self.itemsize

    @property
    def kv_bytes(self) -> float:          # per token, k and v
        return self.batch * 2 * self.kv_heads * self.headdim * self.itemsize

    def flops(self, seqlen: int, causal: bool) -> float:
        """fwd + bwd FLOPs of the whole sequence (the benchmark's count)."""
        return 14.0 * self.batch * seqlen * seqlen * self.heads * self.headdim * (0.5 if causal else 1.0)


def _levels(m: Machine, n: int) -> tuple[int, int]:
    """(ranks per node, nodes) of a cp group of n ranks packed onto whole nodes."""
    ni = min(n, m.gpus_per_node)
    return ni, math.ceil(n / ni)


def _link(m: Machine, n: int) -> tuple[float, float]:
    """(GB/s, latency us) of a flat collective over n ranks: the network's once it leaves a node."""
    return (m.intra_gb_s, m.intra_latency_us) if n <= m.gpus_per_node else (m.inter_gb_s, m.inter_latency_us)


def traffic(schedule: str, m: Machine, shape: Shape, seqlen: int, n: int, causal: bool) -> tuple[float, int, float]:
    """(communication seconds per rank, steps, block tokens) of a flat schedule over n ranks."""
    local = seqlen / n
    kv, q = local * shape.kv_bytes, local * shape.q_bytes
    gb, lat = _link(m, n)
    if schedule in ("ringX3", "native-allgather"):
        expand = shape.heads / shape.kv_heads if schedule == "native-allgather" else 1.0
        nbytes, steps, block = (4 if causal else 3) * (n - 1) * kv * expand, 3, seqlen / 2 if causal else seqlen
    elif schedule == "ringX4":
        nbytes, steps, block = 4 * n * kv, 3 * n, local / 2 if causal else local
    elif schedule in ("ringX1", "ringX2"):
        nbytes = (4.625 * n - 4.125) * kv if causal else 7 * n * q
        steps, block = 3 * n, local / 2 if causal else local
    elif schedule in HISTORICAL:
        nbytes, steps, block = 7 * n * q, 3 * n, local
    elif schedule == "ringX3-hier" and n <= m.gpus_per_node:      # one node: it is ringX3
        return traffic("ringX3", m, shape, seqlen, n, causal)
    elif schedule == "ringX3-hier":
        ni, no = _levels(m, n)
        inter = (4 if causal else 3) * (no - 1) * kv                  # per GPU: its rail of the node
        intra = (4 if causal else 3) * (ni - 1) * no * kv
        seconds = inter / (m.inter_gb_s * 1e9) + intra / (m.intra_gb_s * 1e9) \
            + 6 * (m.inter_latency_us + m.intra_latency_us) * 1e-6
        return seconds, 6, seqlen / 2 if causal else seqlen
    else:
        raise ValueError(f"unknown schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}")
    return nbytes / (gb * 1e9) + steps * lat * 1e-6, steps, block


def predict(schedule: str, m: Machine, seqlen: int, n: int, causal: bool, shape: Shape = Shape(),
            inner: int = 1) -> float:
    """Predicted seconds of one fwd + bwd on n ranks; ``inner`` > 1: the hybrid (Ulysses over
    ``inner`` ranks of a node x ``schedule`` over n / inner)."""
    if inner > 1:
        if n % inner or inner > m.gpus_per_node or shape.heads % inner:
            return math.inf
        outer = n // inner
        sub = replace(shape, heads=shape.heads // inner, kv_heads=max(1, shape.kv_heads // inner))
        local = seqlen / n
        a2a = 8 * (inner - 1) / inner * local * (2 * shape.q_bytes + shape.kv_bytes)   # q,k,v,out and back
        t_a2a = a2a / (m.intra_gb_s * 1e9) + 8 * m.intra_latency_us * 1e-6
        wide = replace(m, gpus_per_node=max(1, m.gpus_per_node // inner))            # outer ranks per node
        return t_a2a + predict(schedule, wide, seqlen, outer, causal, sub) if outer > 1 else \
            t_a2a + shape.flops(seqlen, causal) / inner / (m.tflops(seqlen) * 1e12)
    flops = shape.flops(seqlen, causal) / n
    if n == 1:
        return flops / (m.tflops(seqlen) * 1e12)
    comm, steps, block = traffic(schedule, m, shape, seqlen, n, causal)
    compute = flops / (m.tflops(block) * 1e12) * ((2 - 1 / n) if schedule in HISTORICAL and causal else 1.0)
    # ringX3-hier is ringX3's schedule with two-level collectives: its fitted overlap and step cost
    key = "ringX3" if schedule == "ringX3-hier" or schedule not in m.overlap else schedule
    hidden = m.overlap[key] * compute
    exposed = 0.0
    if schedule == "ringX3-hier":   # each all-gather's network stage is waited for before its node stage
        exposed = 2 * (_levels(m, n)[1] - 1) * seqlen / n * shape.kv_bytes / (m.inter_gb_s * 1e9)
    return compute + exposed + max(0.0, comm - exposed - hidden) + steps * m.step_ms[key] * 1e-3


def ideal(m: Machine, seqlen: int, n: int, causal: bool, shape: Shape = Shape()) -> float:
    """The single device's time of the whole sequence / n (the benchmark's ideal)."""
    return shape.flops(seqlen, causal) / (m.tflops(seqlen) * 1e12) / n


GATHERING = ("ringX3", "ringX3-hier", "native-allgather")     # hold every rank's k/v: O(S) memory


def fits(schedule: str, m: Machine, seqlen: int, n: int, shape: Shape = Shape(), inner: int = 1) -> bool:
    """Whether one attention call's k/v working set fits half the GPU's memory: the gathering
    schedules hold the whole sequence's k/v and their float32 gradients (3 x S x kv bytes), the
    others a few local shards."""
    tokens = seqlen if schedule in GATHERING else 8 * seqlen / n
    kv = shape.kv_bytes * (shape.heads / shape.kv_heads if schedule == "native-allgather" else 1.0) / inner
    return 3 * tokens * kv <= 0.5 * m.memory_gb * 1e9


def best(m: Machine, seqlen: int, n: int, causal: bool, shape: Shape = Shape()) -> list[tuple[float, str]]:
    """Every schedule and hybrid split at (seqlen, n) whose working set fits, fastest first:
    (seconds, name). ringX3-hier: ringX3 with ``group=ringX.node_groups(cp_group, gpus_per_node)``."""
    rows = [(predict(s, m, seqlen, n, causal, shape), s) for s in SCHEDULES if fits(s, m, seqlen, n, shape)]
    for inner in (2, 4, 8):
        if inner < n and n % inner == 0 and inner <= m.gpus_per_node:
            for s in ("ringX3", "ringX4", "ringX2"):
                if fits(s, m, seqlen, n, shape, inner):
                    rows.append((predict(s, m, seqlen, n, causal, shape, inner), f"hybrid {inner}x{n // inner} {s}"))
    return sorted((t, s) for t, s in rows if math.isfinite(t))


# ---- calibration on the recorded runs -------------------------------------------------------

DATA = Path(__file__).resolve().parents[1] / "docs" / "data"
CALIBRATION_FILES = ("h200x2_r5/llama_16k_64k.csv", "h200x4_r2/short_32k-128k.csv", "h200x4_r2/long_256k.csv",
                     "h200x8/scale_N2.csv", "h200x8/scale_N4.csv", "h200x8/long_N8_512k.csv")


def recorded(files=CALIBRATION_FILES, data: Path = DATA) -> list[dict]:
    """The recorded fwd+bwd rows of the modelled schedules (32/8 heads of 128, bf16)."""
    rows = []
    for name in files:
        path = data / name
        if not path.exists():
            continue
        for r in csv.DictReader(open(path)):
            if r.get("mode") != "fwd_bwd" or not r.get("time_ms") or r["method"] not in SCHEDULES:
                continue
            if (r["heads"], r["kv_heads"], r["headdim"]) != ("32", "8", "128"):
                continue
            causal = r["causal"] == "True"
            old = r["method"] == "ringX1" or (r["method"] == "ringX2" and not name.startswith("h200x2_r5"))
            method = f"{r['method']}-bcast" if causal and old else r["method"]
            rows.append({"file": name, "method": method, "n": int(r["world_size"]), "seqlen": int(r["seqlen"]),
                         "causal": causal, "ms": float(r["time_ms"])})
    return rows


def fit(rows: list[dict], base: Machine = H200_NODE) -> Machine:
    """Fit the effective NVLink bandwidth, and each schedule's overlap and per-step cost, to
    the recorded rows (grid search on the largest relative error, then the mean)."""
    def err(m, subset):
        e = [abs(predict(r["method"], m, r["seqlen"], r["n"], r["causal"]) * 1e3 / r["ms"] - 1) for r in subset]
        return (max(e), sum(e) / len(e)) if e else (0.0, 0.0)
    best_m, best_e = base, (math.inf, math.inf)
    for eff in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        m = replace(base, intra_gb_s=900.0 * eff, inter_gb_s=900.0 * eff)
        overlap, step = dict(m.overlap), dict(m.step_ms)
        for s in SCHEDULES + HISTORICAL:
            subset = [r for r in rows if r["method"] == s]
            if not subset:
                continue
            cands = [(err(replace(m, overlap={**overlap, s: ov}, step_ms={**step, s: st}), subset), ov, st)
                     for ov in (0.0, 0.25, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0)
                     for st in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8)]
            _, overlap[s], step[s] = min(cands)
        m = replace(m, overlap=overlap, step_ms=step)
        e = err(m, rows)
        if e < best_e:
            best_m, best_e = m, e
    return best_m


def check(m: Machine, rows: list[dict]) -> list[dict]:
    """Each recorded row with the model's prediction and their ratio."""
    out = []
    for r in rows:
        p = predict(r["method"], m, r["seqlen"], r["n"], r["causal"]) * 1e3
        out.append({**r, "predicted_ms": p, "ratio": p / r["ms"]})
    return out


@functools.lru_cache(maxsize=1)
def fitted_to_records() -> Machine:
    """The one-node machine fitted to the recorded runs (computed once per process)."""
    return fit(recorded())


def calibrated(machine: str = "h200-node") -> Machine:
    """``machine`` with the schedule parameters fitted on the recorded runs (network as given)."""
    fitted = fitted_to_records()
    base = MACHINES[machine]
    if machine == "h200-node":
        return fitted
    return replace(base, overlap=fitted.overlap, step_ms=fitted.step_ms,
                   intra_gb_s=fitted.intra_gb_s if machine == "h200-ib" else base.intra_gb_s)


def curves(m: Machine, causal: bool = True) -> list[dict]:
    """Predicted efficiency (ideal / time) of the best schedule per (cp, S), cp 2..1024, S 128K..16M."""
    rows = []
    for n in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
        for seqlen in (2 ** p for p in range(17, 25)):
            if seqlen % (2 * n):
                continue
            ranked = best(m, seqlen, n, causal)
            if not ranked:                    # nothing fits this GPU's memory
                continue
            implemented = ranked                      # every modelled schedule is implemented
            flat = {s: predict(s, m, seqlen, n, causal) if fits(s, m, seqlen, n) else math.inf
                    for s in ("ringX3", "ringX4", "ringX2", "native-allgather")}
            eff = ideal(m, seqlen, n, causal)
            rows.append({"machine": m.name, "cp": n, "seqlen": seqlen, "causal": causal,
                         "best": ranked[0][1], "efficiency": eff / ranked[0][0],
                         "best_implemented": implemented[0][1], "efficiency_implemented": eff / implemented[0][0],
                         **{f"eff_{k}": eff / v for k, v in flat.items()}})
    return rows


def plot_curves(rows: list[dict], path: Path) -> bool:
    """Predicted efficiency against cp, one line per sequence length: the best schedule (solid)
    and the flat ringX3 (dashed), from ``curves`` rows; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, seqlen in enumerate(sorted({r["seqlen"] for r in rows})):
        pts = sorted((r["cp"], r["efficiency"], r["eff_ringX3"]) for r in rows if r["seqlen"] == seqlen)
        color = f"C{i % 10}"
        ax.plot([c for c, _, _ in pts], [e for _, e, _ in pts], "-o", ms=3, color=color, label=f"{seqlen // 1024}K")
        flat = [(c, f) for c, _, f in pts if f > 0]
        ax.plot([c for c, _ in flat], [f for _, f in flat], "--", color=color, alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("cp (GPUs)")
    ax.set_ylabel("predicted efficiency (ideal / time)")
    ax.set_title(f"{rows[0]['machine']}, causal: best schedule (solid), flat ringX3 (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(title="S", fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine", choices=tuple(MACHINES), default="h200-ib")
    p.add_argument("--seqlen", type=int, default=1 << 20)
    p.add_argument("--cp", type=int, default=128)
    p.add_argument("--full", action="store_true", help="full attention (default causal)")
    p.add_argument("--check", action="store_true", help="predicted vs measured on the recorded runs")
    p.add_argument("--curves", metavar="DIR", help="write the efficiency tables of the published machines here")
    args = p.parse_args(argv)
    if args.check:
        m = fitted_to_records()
        rows = check(m, recorded())
        for r in rows:
            print(f"{r['file']:32s} {r['method']:16s} N={r['n']} S={r['seqlen']:8d} {'causal' if r['causal'] else 'full  '} "
                  f"measured {r['ms']:9.2f} ms predicted {r['predicted_ms']:9.2f} ms ratio {r['ratio']:.3f}")
        worst = max(abs(r["ratio"] - 1) for r in rows)
        print(f"{len(rows)} rows, worst |predicted/measured - 1| = {worst:.3f}; fitted NVLink {m.intra_gb_s:.0f} GB/s")
        return 0
    if args.curves:
        out = Path(args.curves)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("h200-ib", "frontier"):
            rows = curves(calibrated(name))
            with open(out / f"{name}_causal.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
            print(f"wrote {out / f'{name}_causal.csv'} ({len(rows)} points)")
            if plot_curves(rows, out / f"{name}_causal.png"):
                print(f"wrote {out / f'{name}_causal.png'}")
        return 0
    m = calibrated(args.machine)
    causal = not args.full
    print(f"{m.name}: S = {args.seqlen}, cp = {args.cp}, {'causal' if causal else 'full'}; ideal "
          f"{ideal(m, args.seqlen, args.cp, causal) * 1e3:.1f} ms")
    ranked = best(m, args.seqlen, args.cp, causal)
    if not ranked:
        print("  no schedule's working set fits this GPU's memory: raise cp")
    for t, name in ranked:
        note = "  (ringX3 with group=ringX.node_groups(cp_group, gpus_per_node))" if "hier" in name else ""
        print(f"  {name:28s} {t * 1e3:10.1f} ms  efficiency {ideal(m, args.seqlen, args.cp, causal) / t:.3f}{note}")
    return 0


def recommend(seqlen: int, cp: int, machine: str = "h200-ib", causal: bool = True) -> str:
    """The implemented schedule (or hybrid split) the model predicts fastest for ``machine`` at
    (seqlen, cp); raises when no schedule's working set fits."""
    ranked = [s for _, s in best(calibrated(machine), seqlen, cp, causal)]
    if not ranked:
        raise ValueError(f"no schedule fits {machine}'s memory at S = {seqlen} over {cp} ranks: raise cp")
    return ranked[0]


if __name__ == "__main__":
    sys.exit(main())
