"""ringX.bench --profile: the time-line accounting, and a tiny CPU run that writes traces."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ringX.bench.profile import (kernel_breakdown, length, length_outside, merged, short_name, summarize,  # noqa: E402
                                 timeline)

ROOT = Path(__file__).resolve().parents[1]


def test_union_and_uncovered_lengths():
    assert merged([(5, 7), (0, 2), (1, 3), (3, 4)]) == [(0, 4), (5, 7)]
    assert length([(0, 2), (1, 3), (10, 11)]) == 4
    assert length_outside([(0, 10)], [(2, 3), (2.5, 4), (8, 12)]) == pytest.approx(10 - 2 - 2)
    assert length_outside([(0, 1)], []) == 1


def test_summary_splits_compute_communication_exposure_and_idle():
    # us: attention 0-100 on one stream, an NCCL kernel 80-130 on another (30 us exposed),
    # nothing 130-150, a merge kernel 150-160
    kernels = [(0, 100, "cudnn_flash_fprop"), (80, 130, "ncclDevKernel_Broadcast_RING_LL"),
               (150, 160, "elementwise_kernel")]
    s = summarize(kernels)
    assert s == pytest.approx({"span_ms": 0.160, "compute_ms": 0.110, "comm_ms": 0.050,
                               "exposed_comm_ms": 0.030, "idle_ms": 0.020})
    assert summarize([]) == dict.fromkeys(s)


def test_tiny_cpu_benchmark_with_profile_writes_traces(tmp_path):
    out = tmp_path / "bench"
    res = subprocess.run([sys.executable, "-m", "ringX.bench", "--nproc", "2", "--sweep", "none", "--seqlens", "64",
                          "--heads", "2", "--kv-heads", "1", "--headdim", "16", "--dtype", "float32",
                          "--causal", "true", "--modes", "fwd_bwd", "--methods", "ringX1", "ringX4",
                          "--warmup", "0", "--repeats", "1", "--profile", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})   # a CPU run on GPU nodes too
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "profile of one call" in res.stdout
    rows = {r["method"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert float(rows["ringX1"]["time_ms"]) > 0 and float(rows["ringX4"]["check_err"]) < 1e-5
    assert rows["ringX4"]["prof_span_ms"] == ""          # no device kernels on a CPU run
    traces = sorted(p.name for p in (out / "traces").iterdir())
    assert traces == [f"{m}_S64_causal_fwd_bwd_rank{r}.json" for m in ("ringX1", "ringX4") for r in (0, 1)]


def test_kernel_breakdown_sums_by_short_name(tmp_path):
    trace = tmp_path / "t.json"
    kernels = [("void cudnn::fmha_fwd<128, true>(Params)", 1000.0), ("void cudnn::fmha_fwd<128, false>(Params)", 500.0),
               ("ncclDevKernel_Reduce_Sum_f32_RING_LL(ncclDevKernelArgs)", 250.0),
               ("void at::native::elementwise_kernel<4>(int)", 10.0)]
    events = [{"cat": "kernel", "name": n, "ts": 0, "dur": d} for n, d in kernels]
    events.append({"cat": "cpu_op", "name": "aten::mul", "ts": 0, "dur": 9999.0})   # not a kernel
    trace.write_text(json.dumps({"traceEvents": events}))
    assert kernel_breakdown(str(trace), top=2) == [("void cudnn::fmha_fwd", 2, 1.5),
                                                   ("ncclDevKernel_Reduce_Sum_f32_RING_LL", 1, 0.25)]
    assert short_name("x" * 80) == "x" * 60


def test_timeline_merges_runs_per_stream_in_time_order(tmp_path):
    trace = tmp_path / "t.json"
    k = [("void cudnn::fmha_fwd<1>(P)", 7, 1000.0, 500.0), ("void cudnn::fmha_fwd<1>(P)", 7, 1600.0, 400.0),
         ("ncclDevKernel_Broadcast_RING_LL(A)", 20, 1100.0, 300.0), ("merge_kernel", 7, 2100.0, 50.0)]
    events = [{"cat": "kernel", "name": n, "ts": ts, "dur": d, "args": {"stream": s}} for n, s, ts, d in k]
    trace.write_text(json.dumps({"traceEvents": events}))
    assert timeline(str(trace)) == [("7", 0.0, 0.5, "void cudnn::fmha_fwd", 1),
                                    ("20", 0.1, 0.4, "ncclDevKernel_Broadcast_RING_LL", 1),
                                    ("7", 0.6, 1.0, "void cudnn::fmha_fwd", 1),
                                    ("7", 1.1, 1.15, "merge_kernel", 1)]


def _one_rank_fails(rank, world_size, device):
    """ringX1 fails to set up on rank 1 only, ringX4's result fails on rank 1 only after its
    collectives: both are skipped on every rank, and ringX2 after them is still measured."""
    from ringX.bench import methods as M
    from ringX.bench import run as R
    real = M.prepare

    class _BadNote:
        def __init__(self, prep):
            self._prep = prep

        def __getattr__(self, name):
            if name == "note":
                raise RuntimeError("note lost on rank 1")
            return getattr(self._prep, name)

    def prepare(method, *a):
        if rank == 1 and method == "ringX1":
            raise RuntimeError("cannot set up on rank 1")
        prep = real(method, *a)
        return _BadNote(prep) if rank == 1 and method == "ringX4" else prep
    M.prepare = prepare
    args = R.parse(["--seqlens", "64", "--heads", "2", "--kv-heads", "1", "--headdim", "16", "--dtype", "float32",
                    "--causal", "true", "--modes", "fwd_bwd", "--methods", "ringX1", "ringX4", "ringX2",
                    "--warmup", "0", "--repeats", "1", "--warmup-s", "0"])
    rows = {r["method"]: r for r in R.bench_config(args, 1, 64, True, "fwd_bwd", device, None, {})}
    mine = {1: ("cannot set up on rank 1", "note lost on rank 1")}.get(rank, ("another rank", "another rank"))
    assert mine[0] in rows["ringX1"]["note"] and "time_ms" not in rows["ringX1"], rows["ringX1"]
    assert mine[1] in rows["ringX4"]["note"] and "time_ms" not in rows["ringX4"], rows["ringX4"]
    assert rows["ringX2"]["time_ms"] > 0 and rows["ringX2"]["check_err"] < 1e-5, rows["ringX2"]


def test_a_method_failing_on_one_rank_is_skipped_on_every_rank():
    from ringX.launch import spawn
    spawn(2, _one_rank_fails, deadline_s=120)


def test_trace_tools_leave_out_kernels_before_the_profiled_call(tmp_path):
    from ringX.bench.profile import CALL_MARK
    trace = tmp_path / "t.json"
    events = [{"cat": "kernel", "name": "ncclDevKernel_AllReduce_Sum_u8(A)", "ts": 0.0, "dur": 50.0},   # the barrier
              {"cat": "user_annotation", "name": CALL_MARK, "ts": 100.0, "dur": 900.0},
              {"cat": "kernel", "name": "void cudnn::fmha_fwd<1>(P)", "ts": 200.0, "dur": 500.0, "args": {"stream": 7}}]
    trace.write_text(json.dumps({"traceEvents": events}))
    assert kernel_breakdown(str(trace)) == [("void cudnn::fmha_fwd", 1, 0.5)]
    assert timeline(str(trace)) == [("7", 0.0, 0.5, "void cudnn::fmha_fwd", 1)]
