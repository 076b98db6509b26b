"""One rank: no communication, no accumulators. The rank's queries attend its own keys as one
block, which the kernel (or, under a mask, the planner's calls) computes and returns as it is:
out in the kernel's dtype, gradients in the inputs' dtype, so a group of one costs what the
plain kernel costs in time and memory.
"""
from __future__ import annotations

import torch

from ..api import RunContext


def solo_forward(run: RunContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q: (b, s, h, d), k/v: (b, s, hk, d) -> (out (b, s, h, d), lse (b, h, s))."""
    (blk,) = run.blocks(0, 0, q.shape[1])           # every row sees its own key: one whole block
    o, l = run.block_forward(blk, q, k, v)
    return o, l.to(run.acc_dtype)


def solo_backward(run: RunContext, dout, q, k, v, out, lse):
    """(dq, dk, dv) shaped like (q, k, v)."""
    (blk,) = run.blocks(0, 0, q.shape[1])
    return run.block_backward(blk, dout, q, k, v, out, lse)
