"""Test bodies shared by test_ringX{1,2,3,4}_attn_func.py: every standard case against the
float64 reference, on the default group and on strided sub-groups."""
from __future__ import annotations

import torch
import torch.distributed as dist

import launcher  # noqa: F401  (puts the checkout on sys.path when ringX is not installed)
from ringX import ATTN_FUNCS
from ringX.testing import Case, check_case, solo_group, standard_cases


def _assert_all_pass(results) -> None:
    failed = [f"{r.algo} N={r.world_size} {r.case.label()}: {'; '.join(r.failures)}"
              for r in results if not r.passed]
    assert not failed, "errors above the pass rules:\n" + "\n".join(failed)


def check_algorithm(rank: int, world_size: int, device: torch.device, algo: str) -> None:
    """All standard cases (causal/full x fp32/bf16 x MHA/GQA, batch 2) on the default group; the
    bf16 cases are also bounded by 1.5x the same function's error on one rank."""
    fn = ATTN_FUNCS[algo]
    solo = solo_group(world_size)
    results = [check_case(fn, algo, case, dist.group.WORLD, device, solo_group=solo)
               for case in standard_cases(world_size)]
    _assert_all_pass(results)


def check_algorithm_copy_transport(rank: int, world_size: int, device: torch.device, algo: str) -> None:
    """check_algorithm with RINGX_TRANSPORT=copy (broadcasts through the copy engines; CUDA)."""
    import os
    os.environ["RINGX_TRANSPORT"] = "copy"
    try:
        check_algorithm(rank, world_size, device, algo)
    finally:
        del os.environ["RINGX_TRANSPORT"]


def check_strided_subgroups(rank: int, world_size: int, device: torch.device, algo: str) -> None:
    """Ranks {0, 2, ...} and {1, 3, ...} each run their own problem (different data) on a
    strided sub-group, so group ranks differ from global ranks."""
    assert world_size % 2 == 0 and world_size >= 4
    groups = [dist.new_group(list(range(p, world_size, 2))) for p in (0, 1)]
    mine = groups[rank % 2]
    size = world_size // 2
    results = []
    for causal in (False, True):
        case = Case(batch=2, seqlen=8 * size, heads=6, kv_heads=2, headdim=16, causal=causal,
                    dtype=torch.float32, seed=100 + 10 * (rank % 2) + int(causal))
        results.append(check_case(ATTN_FUNCS[algo], algo, case, mine, device))
    _assert_all_pass(results)


def run_as_script(algo: str) -> int:
    """Under srun / mpirun / torchrun: the standard cases on the world group, plus strided
    sub-groups when the world size allows."""
    from launcher import script_main

    def body(rank, world_size, device):
        check_algorithm(rank, world_size, device, algo)
        if world_size >= 4 and world_size % 2 == 0:
            check_strided_subgroups(rank, world_size, device, algo)
    return script_main(body)
