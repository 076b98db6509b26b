"""Property-based exactness: hypothesis draws batch, sequence length (legal for the layout),
heads, kv heads, head dim, causal and dtype; all four algorithms are checked against the float64
reference under the pass rules of ringX.testing, on world sizes 1-4.

bfloat16 examples are drawn at 16+ tokens per rank, head dim 32+ and batch 2 (>= 1024 values
per gradient): the kernels hand back each block's partial gradients rounded to bf16 and ringX sums
N of them in float32, so with a few dozen values the 1.5x-of-one-rank rule is decided by rounding
luck (seen: 0.0043 vs 0.00426 at 2 tokens per rank, 1 head of dim 8). float32 is fuzzed at any size.

Each world size spawns its ranks once and runs the same derandomised examples on every rank (the
errors are reduced over the group, so all ranks pass or fail together). RINGX_FUZZ_PROFILE=nightly
draws 200 examples per world size instead of the CI profile's 12.
"""
import os

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from launcher import spawn
from ringX import ATTN_FUNCS
from ringX.testing import Case, check_case, solo_group

PROFILES = {"ci": 12, "nightly": 200}


def fuzz_body(rank, world_size, device, max_examples):
    solo = solo_group(world_size)

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(batch=st.integers(1, 2), chunk=st.integers(1, 12), kv_heads=st.integers(1, 3),
           group=st.integers(1, 3), headdim=st.sampled_from([8, 16, 32, 64]),
           causal=st.booleans(), bf16=st.booleans())
    def check(batch, chunk, kv_heads, group, headdim, causal, bf16):
        # 2 * chunk tokens per rank: legal for the zigzag layout and the contiguous one
        if bf16:
            batch, chunk, headdim = 2, max(chunk, 8), max(headdim, 32)
        case = Case(batch=batch, seqlen=2 * chunk * world_size, heads=kv_heads * group,
                    kv_heads=kv_heads, headdim=headdim, causal=causal,
                    dtype=torch.bfloat16 if bf16 else torch.float32,
                    seed=hash((batch, chunk, kv_heads, group, headdim, causal, bf16)) % 2**31)
        for algo, fn in ATTN_FUNCS.items():
            res = check_case(fn, algo, case, dist.group.WORLD, device, solo_group=solo)
            assert res.passed, f"{algo} N={world_size} {case.label()}: {res.failures}"

    check()


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_fuzzed_exactness(world_size):
    profile = os.environ.get("RINGX_FUZZ_PROFILE", "ci")
    spawn(world_size, fuzz_body, PROFILES[profile], deadline_s=1800 if profile == "nightly" else 600)
