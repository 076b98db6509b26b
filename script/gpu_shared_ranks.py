"""The multi-rank exactness checks of test/exactness.py with every rank on one GPU: N processes
share the first CUDA device and talk through gloo (``ringX.launch.spawn(shared_gpu=True)``), so
the GPU code paths of the schedules (cuDNN blocks, the fused float32 merges) run at world sizes
that a one-GPU machine cannot give NCCL (NCCL takes one GPU per rank):

    python script/gpu_shared_ranks.py --algos ringX4 --world_sizes 3 4

Each (algorithm, world size) prints PASSED or the failing rank's error; exit status 1 if any
failed. Checks correctness only: timings on a shared GPU mean nothing. ringX4 (broadcasts and
reduces) runs this way; ringX1 did not (a rank died inside gloo, "writev ... Bad address", most
likely in the paired schedule's point-to-point sends), so check ringX1/2 with one GPU per rank.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "test")]


def _check(rank: int, world_size: int, device, algo: str) -> None:
    import torch
    from exactness import check_algorithm
    torch.set_num_threads(1)
    check_algorithm(rank, world_size, device, algo)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=["ringX4"])
    p.add_argument("--world_sizes", type=int, nargs="+", default=[3, 4])
    p.add_argument("--timeout_s", type=float, default=300)
    args = p.parse_args(argv)
    import torch
    from ringX.launch import spawn
    if not torch.cuda.is_available():
        print("gpu_shared_ranks: no CUDA device; the CPU test suite runs these checks on gloo")
        return 0
    failed = 0
    for algo in args.algos:
        for n in args.world_sizes:
            try:
                spawn(n, _check, algo, deadline_s=args.timeout_s, threads=1, shared_gpu=True)
                err = None
            except Exception as exc:          # a rank's error (its traceback), or the deadline
                err = str(exc)[-3000:]
            print(f"{algo} world size {n}: {'PASSED' if err is None else 'FAILED ' + err}", flush=True)
            failed += err is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
