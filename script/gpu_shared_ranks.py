"""The multi-rank exactness checks of test/exactness.py with every rank on one GPU: N processes
share the first CUDA device and talk through gloo (which stages CUDA tensors through host
memory), so the GPU code paths of the schedules (cuDNN blocks, the fused float32 merges) run at
world sizes that a one-GPU machine cannot give NCCL (NCCL takes one GPU per rank):

    python script/gpu_shared_ranks.py --algos ringX4 --world_sizes 3 4

Each (algorithm, world size) prints PASSED or the failing rank's error; exit status 1 if any
failed. Checks correctness only: timings on a shared GPU mean nothing. ringX4 (broadcasts and
reduces) runs this way; ringX1 did not (a rank died inside gloo, "writev ... Bad address", most
likely in the paired schedule's point-to-point sends), so check ringX1/2 with one GPU per rank.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "test")]


def _rank(rank: int, world_size: int, init_file: str, algo: str, errors) -> None:
    import torch
    import torch.distributed as dist
    from exactness import check_algorithm
    torch.set_num_threads(1)
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        check_algorithm(rank, world_size, torch.device("cuda", 0), algo)
    except BaseException:
        errors.put((rank, traceback.format_exc()[-3000:]))
    finally:
        dist.destroy_process_group()


def run(algo: str, world_size: int, timeout_s: float) -> str | None:
    """None when every rank passed, else the first error."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_rank, args=(r, world_size, init_file, algo, errors)) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):    # a rank died: its peers would wait
                break
            time.sleep(0.5)
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
    if not errors.empty():
        rank, err = errors.get()
        return f"rank {rank}: {err}"
    if hung:
        return f"{len(hung)} ranks stopped (a rank died, or {timeout_s:.0f} s passed)"
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    return f"exit codes {bad}" if bad else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=["ringX4"])
    p.add_argument("--world_sizes", type=int, nargs="+", default=[3, 4])
    p.add_argument("--timeout_s", type=float, default=300)
    args = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu_shared_ranks: no CUDA device; the CPU test suite runs these checks on gloo")
        return 0
    failed = 0
    for algo in args.algos:
        for n in args.world_sizes:
            err = run(algo, n, args.timeout_s)
            print(f"{algo} world size {n}: {'PASSED' if err is None else 'FAILED ' + err}", flush=True)
            failed += err is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
