"""A job in which one rank dies (SIGKILL) in the middle of a ringX call: between the forward and
the backward, while the other ranks are already inside the backward's collectives.

    srun -n4 --kill-on-bad-exit=1 bash -c "source script/setup_dist_vars.sh; python test/dead_rank_worker.py FILE"
    torchrun --nproc_per_node 4 test/dead_rank_worker.py FILE

The victim writes the time of its death to FILE; the test asserts every rank is gone within 60 s
of it with a non-zero exit status.
"""
import os
import signal
import sys
import time

import launcher  # noqa: F401  (puts the checkout on sys.path when ringX is not installed)
import torch

from ringX import ringX4_attn_func
from ringX.launch import init_distributed

VICTIM = 1
KILL_STEP = 3


def main() -> None:
    stamp = sys.argv[1]
    info = init_distributed(timeout=float(os.environ.get("RINGX_TIMEOUT", "300")))
    q = torch.randn(1, 64, 4, 16, device=info.device, requires_grad=True)
    k = torch.randn(1, 64, 2, 16, device=info.device, requires_grad=True)
    v = torch.randn(1, 64, 2, 16, device=info.device, requires_grad=True)
    for step in range(1000):
        out = ringX4_attn_func(q, k, v, causal=True)
        if info.rank == VICTIM and step == KILL_STEP:
            with open(stamp, "w") as f:
                f.write(f"{time.time()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        out.sum().backward()
    print(f"rank {info.rank} finished all steps: the victim did not die", flush=True)


if __name__ == "__main__":
    main()
