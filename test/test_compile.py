"""torch.compile through the ringX functions: each is a custom op (ringX.ops), so a block that
calls one compiles with fullgraph=True (no graph break) on one rank and with a cp group, and its
outputs and gradients equal eager mode (float32)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import launcher  # noqa: F401
from launcher import spawn
from ringX import ATTN_FUNCS, VARLEN_FUNCS


class _Block(torch.nn.Module):
    """A projection, one ringX attention call (dense or varlen, optional window), an output
    projection: (b, s, 32) -> (b, s, 32)."""

    def __init__(self, algo: str, group, causal: bool, window=(-1, -1), cu=None):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 64)
        self.o = torch.nn.Linear(32, 32)
        self.algo, self.group, self.causal, self.window, self.cu = algo, group, causal, window, cu
        self.longest = None if cu is None else int((cu[1:] - cu[:-1]).max())

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).split([32, 16, 16], -1)
        q, k, v = q.reshape(b, s, 4, 8), k.reshape(b, s, 2, 8), v.reshape(b, s, 2, 8)
        if self.cu is None:
            out = ATTN_FUNCS[self.algo](q, k, v, causal=self.causal, window_size=self.window, group=self.group)
        else:
            out = VARLEN_FUNCS[self.algo](q[0], k[0], v[0], self.cu, self.longest, causal=self.causal,
                                          window_size=self.window, group=self.group).unsqueeze(0)
        return self.o(out.reshape(b, s, 32))


def _compare(block: torch.nn.Module, x: torch.Tensor, backend: str, tol: float) -> None:
    import torch._dynamo
    ref = block(x)
    ref.square().sum().backward()
    grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    block.zero_grad(set_to_none=True)
    x.grad = None
    torch._dynamo.reset()
    out = torch.compile(block, fullgraph=True, backend=backend)(x)
    out.square().sum().backward()
    got = [p.grad for p in block.parameters()] + [x.grad]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    for g, r in zip(got, grads):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


def _compiled_on_a_group(rank, world_size, device):
    group = dist.group.WORLD
    S = 8 * world_size
    cu = torch.tensor([0, 3, 4, S - 5, S], dtype=torch.int32)
    for algo in ATTN_FUNCS:
        for kwargs in (dict(causal=True), dict(causal=False), dict(causal=True, window=(5, 0)),
                       dict(causal=True, cu=cu), dict(causal=False, cu=cu, window=(2, 3))):
            torch.manual_seed(0)
            block = _Block(algo, group, **kwargs)
            b = 1 if "cu" in kwargs else 2
            x = torch.randn(b, 8, 32, requires_grad=True)
            x.data += rank                                   # each rank holds its own shard
            _compare(block, x, "aot_eager", 1e-6)


def test_compiled_blocks_equal_eager_on_a_cp_group():
    """fullgraph=True (a graph break would raise) with 2 ranks, every function, dense, windowed
    and varlen, forward and backward."""
    spawn(2, _compiled_on_a_group)


@pytest.mark.parametrize("algo", ["ringX2", "ringX4"])
def test_inductor_compiled_block_equals_eager_on_one_rank(algo):
    torch.manual_seed(0)
    block = _Block(algo, None, causal=True, window=(6, 0))
    x = torch.randn(2, 16, 32, requires_grad=True)
    _compare(block, x, "inductor", 1e-5)
