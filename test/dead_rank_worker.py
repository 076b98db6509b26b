"""A job in which one rank dies (SIGKILL) in the middle of a ringX call: between the forward and
the backward, while the other ranks are already inside the backward's collectives.

    srun -n4 --kill-on-bad-exit=1 bash -c "source script/setup_dist_vars.sh; python test/dead_rank_worker.py FILE"
    torchrun --nproc_per_node 4 test/dead_rank_worker.py FILE

With a second argument ``decode`` the job decodes from a sequence-sharded KV cache instead
(ringX.inference) and the victim dies between two decode steps, while the others are inside the
next step's all-gather.

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


def _die(stamp: str) -> None:
    with open(stamp, "w") as f:
        f.write(f"{time.time()}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def decode(stamp: str, info) -> None:
    from ringX.inference import ShardedKVCache, chunk_layout, decode_attention, prefill_attention
    n, r = info.world_size, info.rank
    cache = ShardedKVCache.empty(1, 1, 64, 2, 16, r, n, torch.float32, info.device)
    q, k, v = (torch.randn(1, 8, h, 16, device=info.device) for h in (4, 2, 2))
    _, real = chunk_layout("zigzag", 8 * n, 8 * n, r, n)
    prefill_attention(ringX4_attn_func, q, k, v, cache, 0, real)
    cache.advance([8] * n)
    for step in range(1000):
        if info.rank == VICTIM and step == KILL_STEP:
            _die(stamp)
        decode_attention(q[:, :1], k[:, :1], v[:, :1], cache, 0)
        cache.advance_decoded()
        if min(cache.lengths) > 40:
            cache.lengths = [8] * n           # keep decoding within the capacity
    print(f"rank {info.rank} finished all steps: the victim did not die", flush=True)


def main() -> None:
    stamp = sys.argv[1]
    info = init_distributed(timeout=float(os.environ.get("RINGX_TIMEOUT", "300")))
    if len(sys.argv) > 2 and sys.argv[2] == "decode":
        return decode(stamp, info)
    q = torch.randn(1, 64, 4, 16, device=info.device, requires_grad=True)
    k = torch.randn(1, 64, 2, 16, device=info.device, requires_grad=True)
    v = torch.randn(1, 64, 2, 16, device=info.device, requires_grad=True)
    for step in range(1000):
        out = ringX4_attn_func(q, k, v, causal=True)
        if info.rank == VICTIM and step == KILL_STEP:
            _die(stamp)
        out.sum().backward()
    print(f"rank {info.rank} finished all steps: the victim did not die", flush=True)


if __name__ == "__main__":
    main()
