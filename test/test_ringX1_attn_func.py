"""ringX1_attn_func against the float64 reference.

Under pytest each test spawns its own ranks (gloo on CPU, NCCL where enough GPUs exist). As a
script it takes its ranks from srun / mpirun / torchrun, e.g. from script/:
    srun -n4 bash -c "source setup_dist_vars.sh; python ../test/test_ringX1_attn_func.py"
"""

import pytest
import torch

from exactness import (check_algorithm, check_algorithm_copy_transport, check_strided_subgroups,
                       run_as_script)
from launcher import spawn

ALGO = "ringX1"


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_exact_against_reference(world_size):
    spawn(world_size, check_algorithm, ALGO)


@pytest.mark.parametrize("world_size", [2, 4])
def test_exact_with_the_copy_transport(world_size):
    """The same cases with broadcasts pulled through the copy engines (NCCL groups on one node)."""
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"the copy transport needs {world_size} GPUs")
    spawn(world_size, check_algorithm_copy_transport, ALGO)


def _pair_schedules(rank, world_size, device):
    """On two ranks the broadcast schedules post no reduce (ringX.schedules.broadcast_pair sends each partial to its
    owner) and every standard case still passes: ringX1 both ways, ringX4's backward."""
    from ringX.comm import GroupComm
    reduce = GroupComm.reduce

    def refuse(self, *args, **kwargs):
        assert self.size == 1, f"a reduce was posted on a group of {self.size} ranks"
        return reduce(self, *args, **kwargs)        # the one-rank runs the checks compare with

    GroupComm.reduce = refuse
    for algo in ("ringX1", "ringX4"):
        check_algorithm(rank, world_size, device, algo)


def test_two_ranks_send_partials_point_to_point():
    spawn(2, _pair_schedules)


def test_strided_subgroups():
    spawn(4, check_strided_subgroups, ALGO)


if __name__ == "__main__":
    from ringX.launch import leave
    leave(run_as_script(ALGO))
