"""What the four ringX functions share: argument checks, backend choice and one autograd.Function.

Each algorithm module (ringX1 .. ringX4) defines an ``Algorithm``: its layout and its forward and
backward schedules. ``ring_attention`` runs any of them behind the common public signature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .checks import check_across_ranks, local_problem, signature
from .comm import GroupComm, GroupStates
from .kernels import Backend, select_backend
from .layout import Block, block_plan
from .peer import ENV_VAR as TRANSPORT_ENV, TRANSPORTS, PeerWorkspace, requested_transport

# The only state ringX keeps between calls: per group, the input signatures already checked and
# the copy transport's staging buffer.
_STATE = GroupStates()


@dataclass(frozen=True)
class RunContext:
    """Everything a schedule needs besides the tensors."""

    comm: GroupComm
    kernel: Backend
    scale: float
    causal: bool
    layout: str
    acc_dtype: torch.dtype

    def whole_block_forward(self, q_i, k, v, q_rank: int, kv_rank: int):
        """(out, lse) of rank q_rank's queries q_i (b, s, h, d) against rank kv_rank's k/v
        (b, s, hk, d), or (None, None) if every query is masked. For schedules that need one
        whole block per rank pair (the broadcast-q forward of contiguous layouts)."""
        blocks = block_plan(self.layout, self.causal, q_rank, kv_rank, q_i.shape[1])
        if not blocks:
            return None, None
        assert len(blocks) == 1, "the broadcast-q schedule needs one whole block per rank pair"
        return self.kernel.forward(q_i, k, v, blocks[0].causal, self.scale)

    def block_backward(self, blk: Block, dout, q, k, v, out, lse):
        """(dq, dk, dv) of one block of a block plan: rows blk.q_rows of this rank's dout/q/out
        (b, s, h, d) and lse (b, h, s) against rows blk.kv_rows of k/v (b, s, hk, d)."""
        qs, ks = blk.q_rows, blk.kv_rows
        return self.kernel.backward(dout[:, qs], q[:, qs], k[:, ks], v[:, ks], out[:, qs],
                                    lse[:, :, qs], blk.causal, self.scale)


@dataclass(frozen=True)
class Algorithm:
    """One ringX algorithm.

    forward(run, q, k, v) -> (out, lse): out (b, s, h, d) and lse (b, h, s) in run.acc_dtype.
    backward(run, dout, q, k, v, out, lse) -> (dq, dk, dv) in run.acc_dtype.
    A result that is one kernel call's output, final as it stands, may come back in the input's
    dtype instead (no float32 round trip); lse is always in run.acc_dtype.
    """

    name: str
    code: int
    layout: str
    forward: Callable
    backward: Callable


class RingAttnFunction(torch.autograd.Function):
    """Autograd wrapper around an Algorithm's forward and backward schedules."""

    @staticmethod
    def forward(ctx, q, k, v, algo: Algorithm, run: RunContext):
        out_acc, lse = algo.forward(run, q, k, v)
        out = out_acc.to(q.dtype)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.algo, ctx.run = algo, run
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.algo.backward(ctx.run, dout.contiguous(), q, k, v, out, lse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def transport_workspace_bytes(group=None) -> int:
    """Device memory held by ``group``'s copy-transport staging buffer (0 if it has none). It
    comes from CUDA's virtual memory API, outside PyTorch's allocator statistics."""
    peer = _STATE.of(GroupComm(group)).peer
    return peer.nbytes if peer is not None else 0


def ring_attention(algo: Algorithm, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                   window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                   return_attn_probs=False, group=None, backend: str | None = None):
    """Run ``algo`` with the public ringX signature (see ringX1_attn_func for the contract)."""
    fn_name = f"{algo.name}_attn_func"
    comm = GroupComm(group)
    state = _STATE.of(comm)
    transport = requested_transport()
    sig = signature(algo.code, q, k, v, causal, dropout_p, softmax_scale, window_size,
                    alibi_slopes, deterministic, return_attn_probs, transport)
    device = q.device if isinstance(q, torch.Tensor) else None
    check_across_ranks(fn_name, comm, state.checked, sig, local_problem(q, k, v, algo.layout), device)
    # Every rank got here with the same flags, so these raise on every rank alike.
    if transport < 0:
        raise ValueError(f"{fn_name}: ${TRANSPORT_ENV} must be one of {', '.join(TRANSPORTS)} "
                         "(or unset)")
    if dropout_p and dropout_p > 0:
        raise NotImplementedError(
            f"{fn_name}: dropout_p={dropout_p} is not supported: no ringX kernel backend replays "
            "its dropout mask block by block; pass dropout_p=0.0")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(
            f"{fn_name}: sliding-window attention (window_size={tuple(window_size)}) is not "
            "implemented; pass window_size=(-1, -1)")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{fn_name}: alibi_slopes are not implemented; pass None")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if TRANSPORTS[transport] == "copy" and comm.size > 1:
        if state.peer is None:          # collective: every rank makes it at the same call
            state.peer = PeerWorkspace(comm)
        comm.peer = state.peer
    run = RunContext(comm=comm, kernel=select_backend(q, k, dropout_p, backend),
                     scale=float(softmax_scale), causal=bool(causal), layout=algo.layout,
                     acc_dtype=acc_dtype)
    out, lse = RingAttnFunction.apply(q, k, v, algo, run)
    return (out, lse, None) if return_attn_probs else out
