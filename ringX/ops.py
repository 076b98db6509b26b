"""The ringX functions as torch.library custom ops, for torch.compile.

Under ``torch.compile`` the public functions call ``ringx::attention`` (and its backward
``ringx::attention_backward``) instead of their Python body: the compiler sees one opaque op per
attention call with known output shapes (out like q, lse (b, h, s) float32), so a transformer
block compiles without a graph break, on one rank and with a cp group. The ops run the same
eager code (argument checks across ranks, schedules, collectives) at run time; the process group
travels by its name. Eager calls do not go through them.

    ringx::attention(q, k, v, cu_seqlens?, algo, causal, window_left, window_right, scale,
                     group_name, backend, layout, max_seqlen) -> (out, lse)
    ringx::attention_backward(dout, q, k, v, out, lse, cu_seqlens?, ...same) -> (dq, dk, dv)

q: (b, s, h, d), k/v: (b, s, hk, d) local shards (the varlen functions pass their batch of one);
outputs are contiguous (the fake kernels cannot know a kernel's strides);
scale <= 0 means headdim ** -0.5; backend, layout "" mean the defaults; max_seqlen 0: unknown.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def _group_name(group) -> str:
    """The name that finds ``group`` again in another frame ("" for the default group or a
    process without torch.distributed)."""
    if group is None or not dist.is_initialized():
        return ""
    return group.group_name


def _group(name: str):
    if not name:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(name)


def _unaliased(outputs, inputs):
    """A custom op's outputs may share storage with no input and no other output (the schedules
    return dk and dv as two halves of one buffer, for example): copies where they would."""
    seen = {t.untyped_storage().data_ptr() for t in inputs}
    out = []
    for t in outputs:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out.append(t)
    return tuple(out)


def _prepare(q, k, v, cu_seqlens, algo, causal, window_left, window_right, scale, group_name,
             backend, layout, max_seqlen):
    from .algorithms import ALGORITHMS
    from .api import prepare_run
    row = ALGORITHMS[algo]
    run = prepare_run(row, q, k, v, 0.0, scale if scale > 0 else None, causal,
                      (window_left, window_right), None, False, False, _group(group_name),
                      backend or None, cu_seqlens, max_seqlen or None, layout or None)
    return row, run


@torch.library.custom_op("ringx::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor], algo: str, causal: bool,
              window_left: int, window_right: int, scale: float, group_name: str, backend: str,
              layout: str, max_seqlen: int) -> tuple[Tensor, Tensor]:
    row, run = _prepare(q, k, v, cu_seqlens, algo, causal, window_left, window_right, scale,
                        group_name, backend, layout, max_seqlen)
    forward, _ = row.choose(run)
    out, lse = forward(run, q, k, v)
    return _unaliased((out.to(q.dtype).contiguous(), lse.contiguous()), (q, k, v))


@attention.register_fake
def _attention_fake(q, k, v, cu_seqlens, algo, causal, window_left, window_right, scale, group_name,
                    backend, layout, max_seqlen):
    b, s, h, _ = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty((b, h, s), dtype=acc)


@torch.library.custom_op("ringx::attention_backward", mutates_args=())
def attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                       cu_seqlens: Optional[Tensor], algo: str, causal: bool, window_left: int,
                       window_right: int, scale: float, group_name: str, backend: str, layout: str,
                       max_seqlen: int) -> tuple[Tensor, Tensor, Tensor]:
    row, run = _prepare(q, k, v, cu_seqlens, algo, causal, window_left, window_right, scale,
                        group_name, backend, layout, max_seqlen)
    _, backward = row.choose(run)
    dq, dk, dv = backward(run, dout.contiguous(), q, k, v, out, lse)
    return _unaliased(tuple(g.to(x.dtype).contiguous() for g, x in ((dq, q), (dk, k), (dv, v))),
                      (dout, q, k, v, out, lse))


@attention_backward.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, cu_seqlens, algo, causal, window_left,
                             window_right, scale, group_name, backend, layout, max_seqlen):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens = inputs[:4]
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.cu_seqlens = cu_seqlens
    ctx.rest = inputs[4:]
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, ctx.cu_seqlens, *ctx.rest)
    return (dq, dk, dv) + (None,) * 10


attention.register_autograd(_backward, setup_context=_setup_context)


def compiled_attention(algo, q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                       deterministic, group, backend, cu_seqlens, max_seqlen, layout):
    """ring_attention's arguments -> ringx::attention (what the public functions call while
    torch.compile traces them). Options the op does not carry must be at their defaults."""
    if dropout_p or alibi_slopes is not None:
        raise NotImplementedError(f"{algo.name}: dropout and alibi_slopes are not implemented")
    if cu_seqlens is not None and not isinstance(cu_seqlens, Tensor):
        cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.int32)
    left, right = window_size
    return attention(q, k, v, cu_seqlens, algo.name, bool(causal), int(left), int(right),
                     float(softmax_scale) if softmax_scale else -1.0, _group_name(group),
                     backend or "", layout or "", int(max_seqlen or 0))


def attention_through_op(fn: str, q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1),
                         group=None, backend=None, layout=None, cu_seqlens=None, max_seqlen=None):
    """The function ``fn`` ("ringX1".."ringX4") called through ``ringx::attention`` in eager
    mode as well: (b, s, h, d) q and (b, s, hk, d) k, v shards -> out like q (with
    ``cu_seqlens``: the varlen function on a batch of one packed sequence). A selective
    activation-checkpointing policy then sees one op whose outputs (out, lse) it can keep."""
    from .algorithms import ALGORITHMS
    out, _ = compiled_attention(ALGORITHMS[fn], q, k, v, 0.0, softmax_scale, causal, window_size,
                                None, False, group, backend, cu_seqlens, max_seqlen, layout)
    return out
