"""ringX2_attn_func against the float64 reference.

Under pytest each test spawns its own ranks (gloo on CPU, NCCL where enough GPUs exist). As a
script it takes its ranks from srun / mpirun / torchrun, e.g. from script/:
    srun -n4 bash -c "source setup_dist_vars.sh; python ../test/test_ringX2_attn_func.py"
"""

import pytest
import torch

from exactness import (check_algorithm, check_algorithm_copy_transport, check_strided_subgroups,
                       run_as_script)
from launcher import spawn

ALGO = "ringX2"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_exact_against_reference(world_size):
    spawn(world_size, check_algorithm, ALGO)


@pytest.mark.parametrize("world_size", [2, 4])
def test_exact_with_the_copy_transport(world_size):
    """The same cases with broadcasts pulled through the copy engines (NCCL groups on one node)."""
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"the copy transport needs {world_size} GPUs")
    spawn(world_size, check_algorithm_copy_transport, ALGO)


def _odd_shards(rank, world_size, device):
    """The paired schedule's shared block of an even N is split by query rows: odd and one-row
    local shards (an empty half on one side) stay exact, causal and full."""
    import torch.distributed as dist
    from exactness import _assert_all_pass
    from ringX import ATTN_FUNCS
    from ringX.testing import Case, check_case
    results = [check_case(ATTN_FUNCS[ALGO], ALGO, Case(batch=2, seqlen=local * world_size, heads=4, kv_heads=2,
                                                       headdim=16, causal=causal, dtype=torch.float32, seed=local),
                          dist.group.WORLD, device)
               for local in (1, 3) for causal in (True, False)]
    _assert_all_pass(results)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_odd_and_one_row_shards(world_size):
    spawn(world_size, _odd_shards)


def test_strided_subgroups():
    spawn(4, check_strided_subgroups, ALGO)


if __name__ == "__main__":
    from ringX.launch import leave
    leave(run_as_script(ALGO))
