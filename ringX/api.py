"""What the four ringX functions share: argument checks, backend choice and one autograd.Function.

ringX.algorithms defines each ``Algorithm``: its layout and the choice of its forward and backward
schedules (ringX.schedules). ``ring_attention`` runs any of them behind the common public
signature. This module knows no algorithm and no schedule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .checks import check_across_ranks, documents_problem, local_problem, signature
from .comm import GroupComm, GroupStates
from .execute import calls_backward, calls_forward
from .kernels import Backend, select_backend, select_band_backend
from .merge import new_accumulators
from .plan import Block, Mask, Run, block_of, layout_runs, restrict
from .peer import ENV_VAR as TRANSPORT_ENV, TRANSPORTS, PeerWorkspace, requested_transport

# The only state ringX keeps between calls: per group, the input signatures already checked and
# the copy transport's staging buffer.
_STATE = GroupStates()


def _rows(x: torch.Tensor, rows: slice, dim: int = 1) -> torch.Tensor:
    """x restricted to ``rows`` along ``dim`` (1: (b, s, ...) tensors, 2: lse (b, h, s)): x itself
    when they cover it, so the hot path makes no view for a whole block."""
    n = x.shape[dim]
    if rows.indices(n) == (0, n, 1):              # the test ringX.merge.add_block_ makes
        return x
    return x[:, rows] if dim == 1 else x[:, :, rows]


@dataclass(frozen=True)
class RunContext:
    """Everything a schedule needs besides the tensors.

    ``mask`` is None for full or plain causal attention over one sequence in the contiguous or
    zigzag layout (the schedules keep their unmasked fast paths), otherwise the global mask
    (documents, window, or the stripe layout). Either way every block is planned by ringX.plan;
    FULL and CAUSAL calls run on ``kernel``, window and varlen calls on ``band_kernel``.
    """

    comm: GroupComm
    kernel: Backend
    scale: float
    causal: bool
    layout: str
    acc_dtype: torch.dtype
    mask: Mask | None = None
    band_kernel: Backend | None = None
    varlen_min: int = 0

    def runs(self, rank: int, seqlen_local: int, rows: slice | None = None) -> tuple[Run, ...]:
        """Global positions of rank ``rank``'s local rows (all, or ``rows``)."""
        runs = layout_runs(self.layout, rank, self.comm.size, seqlen_local)
        return runs if rows is None else restrict(runs, rows)

    @property
    def plan_mask(self) -> Mask:
        """The mask the planner works from (plain full or causal when ``mask`` is None)."""
        return self.mask if self.mask is not None else Mask(self.causal)

    def runs_block(self, q_runs: tuple[Run, ...], k_runs: tuple[Run, ...]) -> Block | None:
        """The block of queries at q_runs against keys at k_runs (rows and keys in the order of
        the runs), or None when no pair is visible (ringX.plan.block_of, cached)."""
        return block_of(q_runs, k_runs, self.plan_mask, self.band_kernel is self.kernel, self.varlen_min)

    def blocks(self, q_rank: int, kv_rank: int, seqlen_local: int, q_rows: slice | None = None) -> list[Block]:
        """The blocks in which rank q_rank's queries (all, or its local rows ``q_rows``, then
        numbered from 0) attend rank kv_rank's keys; [] when no pair is visible."""
        if q_rows is not None and q_rows.stop <= q_rows.start:
            return []
        blk = self.runs_block(self.runs(q_rank, seqlen_local, q_rows), self.runs(kv_rank, seqlen_local))
        return [] if blk is None else [blk]

    def result_dtype(self, blk: Block, dtype: torch.dtype, rows: int | None = None) -> torch.dtype:
        """The dtype of blk's forward out (of whole_block_forward when ``rows``, the rank's
        local length, is given) or gradients: the kernel's (``dtype``) when one call makes it,
        else the accumulation dtype. Lets a receiver size a partial a peer sends as it is."""
        one = blk.calls is None or len(blk.calls) == 1
        whole = rows is None or blk.q_rows == slice(0, rows)
        return dtype if one and whole else self.acc_dtype

    def owners(self, what: str, seqlen_local: int) -> frozenset | None:
        """The ranks whose ``what`` ("q": queries, "kv": keys/values) another rank needs under
        the mask, the same set on every rank; None (all) without a mask. A schedule leaves the
        others out of its broadcasts and reduces: a block with no visible pair costs no message."""
        if self.mask is None:
            return None
        n, s = self.comm.size, seqlen_local
        if what == "q":
            return frozenset(i for i in range(n) if any(self.blocks(i, j, s) for j in range(n) if j != i))
        return frozenset(i for i in range(n) if any(self.blocks(j, i, s) for j in range(n) if j != i))

    def block_forward(self, blk: Block, q, k, v):
        """(out, lse) of rows blk.q_rows of q (b, s, h, d) against rows blk.kv_rows of k/v
        (b, s, hk, d): out (b, rows, h, d) in the kernel's or the acc dtype, lse (b, h, rows)."""
        q, k, v = _rows(q, blk.q_rows), _rows(k, blk.kv_rows), _rows(v, blk.kv_rows)
        if blk.calls is None:
            return self.kernel.forward(q, k, v, blk.causal, self.scale)
        return calls_forward(self, blk.calls, q, k, v)

    def whole_block_forward(self, q_i, k, v, q_rank: int, kv_rank: int):
        """(out, lse) of every row of rank q_rank's queries q_i (b, s, h, d) against rank
        kv_rank's k/v (b, s, hk, d), or (None, None) if no pair is visible. For schedules that
        need one whole block per rank pair (the broadcast-q forward of contiguous layouts)."""
        blocks = self.blocks(q_rank, kv_rank, q_i.shape[1])
        if not blocks:
            return None, None
        assert len(blocks) == 1, "the broadcast-q schedule needs one whole block per rank pair"
        return self.rows_forward(blocks[0], q_i, k, v)

    def rows_forward(self, blk: Block, q, k, v):
        """block_forward for every row of q (b, s, h, d): rows outside blk.q_rows see nothing
        (out 0, lse -inf; in the acc dtype then)."""
        o, l = self.block_forward(blk, q, k, v)
        if blk.q_rows == slice(0, q.shape[1]):
            return o, l
        out, lse = new_accumulators(q, self.acc_dtype)
        out[:, blk.q_rows].copy_(o)
        lse[:, :, blk.q_rows].copy_(l)
        return out, lse

    def block_backward(self, blk: Block, dout, q, k, v, out, lse):
        """(dq, dk, dv) of one block of a block plan: rows blk.q_rows of this rank's dout/q/out
        (b, s, h, d) and lse (b, h, s) against rows blk.kv_rows of k/v (b, s, hk, d)."""
        qs, ks = blk.q_rows, blk.kv_rows
        dout, q, out, lse = _rows(dout, qs), _rows(q, qs), _rows(out, qs), _rows(lse, qs, dim=2)
        k, v = _rows(k, ks), _rows(v, ks)
        if blk.calls is not None:
            return calls_backward(self, blk.calls, dout, q, k, v, out, lse)
        return self.kernel.backward(dout, q, k, v, out, lse, blk.causal, self.scale)


@dataclass(frozen=True)
class Algorithm:
    """One ringX algorithm: a layout and ``choose(run) -> (forward, backward)``, its schedules
    for this call (ringX.algorithms decides; ringX.schedules holds them).

    forward(run, q, k, v) -> (out, lse): out (b, s, h, d) and lse (b, h, s) in run.acc_dtype.
    backward(run, dout, q, k, v, out, lse) -> (dq, dk, dv) in run.acc_dtype.
    A final result may come back in the input's dtype instead (no float32 round trip): one kernel
    call's output as it stands, or a merge or sum whose last pass rounds its acc-dtype result
    once into the input's dtype; lse is always in run.acc_dtype.
    """

    name: str
    code: int
    layout: str
    choose: Callable
    other_layouts: tuple[str, ...] = ()     # layouts accepted besides the default (layout=...)


class RingAttnFunction(torch.autograd.Function):
    """Autograd wrapper around an Algorithm's forward and backward schedules."""

    @staticmethod
    def forward(ctx, q, k, v, algo: Algorithm, run: RunContext):
        forward, backward = algo.choose(run)
        out_acc, lse = forward(run, q, k, v)
        out = out_acc.to(q.dtype)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.backward, ctx.run = backward, run
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backward(ctx.run, dout.contiguous(), q, k, v, out, lse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def bytes_sent(group=None) -> int:
    """Payload bytes this rank has sent in ringX calls on ``group`` so far (data messages, not
    the input checks; see GroupComm.tally). The difference around a call is what it sent."""
    return _STATE.of(GroupComm(group)).sent_bytes


def transport_workspace_bytes(group=None) -> int:
    """Device memory held by ``group``'s copy-transport staging buffer (0 if it has none). It
    comes from CUDA's virtual memory API, outside PyTorch's allocator statistics."""
    peer = _STATE.of(GroupComm(group)).peer
    return peer.nbytes if peer is not None else 0


LAYOUT_CODES = {"contiguous": 1, "zigzag": 2, "stripe": 3}


def ring_attention(algo: Algorithm, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                   window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                   return_attn_probs=False, group=None, backend: str | None = None,
                   cu_seqlens=None, max_seqlen=None, layout: str | None = None):
    """Run ``algo`` with the public ringX signature (see ringX1_attn_func for the contract).

    cu_seqlens (varlen functions): global document boundaries of the packed sequence (q, k, v
    then carry a batch of one); layout: one of the algorithm's layouts (default its own).
    Under torch.compile the call goes through the custom op ``ringx::attention`` (ringX.ops),
    which runs this same code eagerly, so a compiled model has no graph break here."""
    if torch.compiler.is_compiling():
        from .ops import compiled_attention
        out, lse = compiled_attention(algo, q, k, v, dropout_p, softmax_scale, causal, window_size,
                                      alibi_slopes, deterministic, group, backend, cu_seqlens,
                                      max_seqlen, layout)
        return (out, lse, None) if return_attn_probs else out
    run = prepare_run(algo, q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                      deterministic, return_attn_probs, group, backend, cu_seqlens, max_seqlen, layout)
    out, lse = RingAttnFunction.apply(q, k, v, algo, run)
    return (out, lse, None) if return_attn_probs else out


def prepare_run(algo: Algorithm, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                return_attn_probs=False, group=None, backend: str | None = None,
                cu_seqlens=None, max_seqlen=None, layout: str | None = None) -> RunContext:
    """Check the arguments on every rank of the group (one small collective) and build the
    RunContext of this call: kernels, scale, mask, layout. Raises on every rank alike."""
    varlen = cu_seqlens is not None
    fn_name = f"{algo.name}_attn_{'varlen_' if varlen else ''}func"
    comm = GroupComm(group)
    state = _STATE.of(comm)
    comm.tally = state
    transport = requested_transport()
    layout = algo.layout if layout is None else layout
    layouts = (algo.layout,) + algo.other_layouts
    if layout not in layouts:
        raise ValueError(f"{fn_name}: layout={layout!r} is not one of {', '.join(layouts)}")
    problem = local_problem(q, k, v, layout)
    docs = None
    if varlen and problem[0] == 0:
        docs, problem = documents_problem(cu_seqlens, q.shape[1] * comm.size, max_seqlen)
    if problem[0] == 0:
        try:
            window = tuple(int(w) for w in window_size)
            if len(window) != 2:
                raise ValueError
        except (TypeError, ValueError):
            problem = (12, f"window_size must be two ints (left, right), got {window_size!r}")
    sig = signature(algo.code, q, k, v, causal, dropout_p, softmax_scale, window_size,
                    alibi_slopes, deterministic, return_attn_probs, transport,
                    LAYOUT_CODES[layout], docs)
    device = q.device if isinstance(q, torch.Tensor) else None
    check_across_ranks(fn_name, comm, state.checked, sig, problem, device)
    # Every rank got here with the same flags, so these raise on every rank alike.
    if transport < 0:
        raise ValueError(f"{fn_name}: ${TRANSPORT_ENV} must be one of {', '.join(TRANSPORTS)} "
                         "(or unset)")
    if dropout_p and dropout_p > 0:
        raise NotImplementedError(
            f"{fn_name}: dropout_p={dropout_p} is not supported: no ringX kernel backend replays "
            "its dropout mask block by block; pass dropout_p=0.0")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{fn_name}: alibi_slopes are not implemented; pass None")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if TRANSPORTS[transport] == "copy" and comm.size > 1:
        if state.peer is None:          # collective: every rank makes it at the same call
            state.peer = PeerWorkspace(comm)
        comm.peer = state.peer
    mask = Mask(bool(causal), (max(window[0], -1), max(window[1], -1)), docs)
    kernel = select_backend(q, k, dropout_p, backend)
    masked = not mask.plain or layout == "stripe"
    band_kernel = select_band_backend(q, k, kernel) if masked else None
    varlen_min = 2 if masked and band_kernel.varlen and q.shape[0] == 1 else 0
    run = RunContext(comm=comm, kernel=kernel, scale=float(softmax_scale), causal=bool(causal),
                     layout=layout, acc_dtype=acc_dtype, mask=mask if masked else None,
                     band_kernel=band_kernel, varlen_min=varlen_min)
    return run
