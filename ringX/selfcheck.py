"""Check all four ringX functions against the float64 reference and print a table.

    python -m ringX.selfcheck                 # 4 ranks spawned here (gloo on CPU, NCCL on GPUs)
    torchrun --nproc_per_node 4 -m ringX.selfcheck
    srun -n 4 python -m ringX.selfcheck       # ranks from the launcher (see ringX.launch)

For each algorithm, causal and full attention, float32 and bfloat16, GQA (heads/kv_heads), it
runs forward and backward, reports the relative L2 error of out, lse, dq, dk, dv against the
float64 reference with the bound the test suite enforces (ringX.testing), and the fwd+bwd time.
Exits 1 if any error is above its bound.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from . import ATTN_FUNCS
from .testing import OUTPUTS, Case, check_case, solo_group


def _cases(args, world_size: int) -> list[Case]:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            cases.append(Case(batch=args.batch, seqlen=args.seqlen_per_rank * world_size,
                              heads=args.heads, kv_heads=args.kv_heads, headdim=args.headdim,
                              causal=causal, dtype=dtype, seed=len(cases)))
    return cases


def run(args, rank: int, world_size: int, device: torch.device) -> bool:
    """Run every algorithm and case on the default group; rank 0 prints the table."""
    solo = solo_group(world_size)
    results = []
    for algo in args.algos:
        for case in _cases(args, world_size):
            results.append(check_case(ATTN_FUNCS[algo], algo, case, dist.group.WORLD, device,
                                      solo_group=solo, backend=args.backend))
    if rank == 0:
        print(f"ringX selfcheck: {world_size} ranks, {dist.get_backend()} on {device.type}, "
              f"torch {torch.__version__}")
        head = f"{'algo':7} {'case':40} " + " ".join(f"{n:>9}" for n in OUTPUTS) + f" {'fwd+bwd':>9}  ok"
        print(head)
        print("-" * len(head))
        for r in results:
            errs = " ".join(f"{r.errors[n]:9.2e}" for n in OUTPUTS)
            print(f"{r.algo:7} {r.case.label():40} {errs} {r.seconds * 1e3:7.1f}ms  "
                  f"{'yes' if r.passed else 'NO: ' + '; '.join(r.failures)}")
        bnd = results[-1].bounds
        print("bounds: float32 out/lse <= 2e-5, grads <= 1e-4; bfloat16 <= min(2x single-device "
              "PyTorch bf16, 1.5x one rank), e.g. last row: "
              + ", ".join(f"{n} {bnd[n]:.2e}" for n in OUTPUTS))
        print(f"{sum(r.passed for r in results)} passed, {sum(not r.passed for r in results)} failed")
    return all(r.passed for r in results)


def _spawned_run(rank: int, world_size: int, device: torch.device, args, ok) -> None:
    ok[rank] = int(run(args, rank, world_size, device))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=4, help="ranks to spawn when no launcher started us")
    p.add_argument("--algos", nargs="+", default=list(ATTN_FUNCS), choices=list(ATTN_FUNCS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen-per-rank", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--backend", default=None, help="force a kernel backend (see ringX.kernels)")
    args = p.parse_args(argv)
    from .launch import detect_env, init_distributed, spawn
    if detect_env().launcher != "none":
        info = init_distributed()
        try:
            return 0 if run(args, info.rank, info.world_size, info.device) else 1
        finally:
            dist.destroy_process_group()
    ok = torch.zeros(args.nproc, dtype=torch.int32).share_memory_()
    spawn(args.nproc, _spawned_run, args, ok, pg_timeout_s=300)
    return 0 if bool(ok.all()) else 1


if __name__ == "__main__":
    from .launch import leave
    leave(main())  # skips torch's exit-time teardown, which can abort a finished rank
