"""ringX3_attn_func against the float64 reference.

Under pytest each test spawns its own ranks (gloo on CPU, NCCL where enough GPUs exist). As a
script it takes its ranks from srun / mpirun / torchrun, e.g. from script/:
    srun -n4 bash -c "source setup_dist_vars.sh; python ../test/test_ringX3_attn_func.py"
"""

import pytest

from exactness import check_algorithm, check_strided_subgroups, run_as_script
from launcher import spawn

ALGO = "ringX3"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_exact_against_reference(world_size):
    spawn(world_size, check_algorithm, ALGO)


def test_strided_subgroups():
    spawn(4, check_strided_subgroups, ALGO)


if __name__ == "__main__":
    from ringX.launch import leave
    leave(run_as_script(ALGO))
