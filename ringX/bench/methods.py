"""How each benchmarked method is set up and called.

Every method gets the same global problem (identical on every rank, drawn from one seed) and
returns a ``Prepared``: the local inputs in the layout it expects and a ``step(fwd_only)``
callable that runs forward (and backward) once and returns the local output.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .. import ATTN_FUNCS, VARLEN_FUNCS, expected_layout
from ..execute import calls_backward, calls_forward
from ..kernels import select_backend, select_band_backend
from ..layout import shard
from ..peer import ENV_VAR as TRANSPORT_ENV
from ..plan import Mask, Run, layout_runs, plan_block

NATIVE = ("native-allgather", "native-alltoall")
RING_FLASH = ("ring-flash-zigzag",)
COPY = ("ringX1+copy", "ringX2+copy", "ringX4+copy")    # the broadcasting ones, copy transport
BASELINE = ("allgather",)       # ringX.baseline: the seed's all-gather baseline (full attention)
MASKED_BASELINE = ("allgather-varlen",)   # gather k/v, one planned (varlen / window) call per rank
SPLITS = (2, 4, 8)
# two levels (ringX.hybrid): heads over Ni consecutive ranks by all-to-all, ringXk over the rest
HYBRID = tuple(f"hybrid{ni}-{fn}" for ni in SPLITS for fn in ATTN_FUNCS)
# ringX3 over node_groups(group, Ni): k/v gathered within each Ni ranks, then across them
HIERARCHICAL = tuple(f"ringX3-nodes{ni}" for ni in SPLITS)


@dataclass
class Prepared:
    step: Callable[[bool], torch.Tensor]
    layout: str
    note: str = ""
    positions: torch.Tensor | None = None     # the global rows of the local output, where the layout has no name


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_()


def _run(fn, inputs, dout, fwd_only: bool) -> torch.Tensor:
    if fwd_only:
        with torch.no_grad():
            return fn(*inputs)
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(dout)
    return out


class _KernelAttn(torch.autograd.Function):
    """The bare local kernel with autograd: the single-device baseline, no ringX machinery."""

    @staticmethod
    def forward(ctx, q, k, v, kernel, causal, scale):
        out, lse = kernel.forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kernel, ctx.causal, ctx.scale = kernel, causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(dout.contiguous(), q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None


class _PlannedAttn(torch.autograd.Function):
    """A planner's calls (ringX.plan) on q (b, sq, h, d) against k/v (b, sk, hk, d), with
    autograd: the masked single-device baseline and the masked all-gather baseline."""

    @staticmethod
    def forward(ctx, q, k, v, run, calls):
        out, lse = calls_forward(run, calls, q, k, v)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.run, ctx.calls = run, calls
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = calls_backward(ctx.run, ctx.calls, dout.contiguous(), q, k, v, out, lse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _planned(q, k, mask: Mask, backend, q_runs, k_runs):
    """(run, calls) of the block q_runs x k_runs on the registry's kernels (window and varlen
    calls on the window kernel, one call for a whole packed sequence where it takes varlen)."""
    from types import SimpleNamespace
    kernel = select_backend(q, k, name=backend)
    band = select_band_backend(q, k, kernel)
    plan = plan_block(q_runs, k_runs, mask, band is kernel, 1 if band.varlen and q.shape[0] == 1 else 0)
    run = SimpleNamespace(kernel=kernel, band_kernel=band, scale=q.shape[-1] ** -0.5,
                          acc_dtype=torch.float32)
    return run, plan, f"kernels {kernel.name}+{band.name}, {len(plan.calls)} calls"


def single_device_masked(full: dict, mask: Mask, backend: str | None) -> Prepared:
    """The whole masked sequence on one device: the planner's calls over one block (for packed
    documents one varlen call on kernels that take cu_seqlens)."""
    q, k, v = (_leaf(full[n]) for n in ("q", "k", "v"))
    s = q.shape[1]
    run, plan, note = _planned(q, k, mask, backend, (Run(0, 1, s),), (Run(0, 1, s),))

    def attn(q_, k_, v_):
        return _PlannedAttn.apply(q_, k_, v_, run, plan.calls)
    return Prepared(lambda fwd_only: _run(attn, (q, k, v), full["dout"], fwd_only), "contiguous", note)


def allgather_masked(full: dict, mask: Mask, group, backend: str | None) -> Prepared:
    """The all-gather approach for masks (PyTorch's flex/varlen context parallel, ring-flash-attn's
    llama3 function): contiguous shards, k/v all-gathered, one planned call of the local queries
    against the whole sequence, dk/dv reduce-scattered."""
    from ..baseline import _GatherSequence
    n, r = dist.get_world_size(group), dist.get_rank(group)
    q, k, v = (_leaf(shard(full[x], "contiguous", r, n)) for x in ("q", "k", "v"))
    dout = shard(full["dout"], "contiguous", r, n)
    s = q.shape[1]
    run, plan, note = _planned(q, k, mask, backend, layout_runs("contiguous", r, n, s),
                               (Run(0, 1, s * n),))

    def attn(q_, k_, v_):
        kk, vv = _GatherSequence.apply(k_, group), _GatherSequence.apply(v_, group)
        return _PlannedAttn.apply(q_, kk, vv, run, plan.calls)
    return Prepared(lambda fwd_only: _run(attn, (q, k, v), dout, fwd_only), "contiguous", note)


def single_device(full: dict, causal: bool, backend: str | None, seqlen: int | None = None) -> Prepared:
    """The local kernel alone on the first ``seqlen`` tokens (default: the whole sequence)."""
    s = seqlen or full["q"].shape[1]
    q, k, v = (_leaf(full[n][:, :s]) for n in ("q", "k", "v"))
    dout = full["dout"][:, :s].contiguous()
    kernel = select_backend(q, k, name=backend)
    scale = q.shape[-1] ** -0.5

    def attn(q_, k_, v_):
        return _KernelAttn.apply(q_, k_, v_, kernel, causal, scale)
    return Prepared(lambda fwd_only: _run(attn, (q, k, v), dout, fwd_only), "contiguous",
                    f"kernel {kernel.name}")


def ringx(name: str, full: dict, causal: bool, group, backend: str | None,
          mask: Mask | None = None) -> Prepared:
    """A ringX function; NAME+copy runs it with RINGX_TRANSPORT=copy (broadcasts through the copy
    engines), set around each call only. With a mask: its window, and packed documents through
    the varlen function (batch 1)."""
    base, _, transport = name.partition("+")
    fn = ATTN_FUNCS[base]
    layout = expected_layout(fn)
    n, r = dist.get_world_size(group), dist.get_rank(group)
    q, k, v = (_leaf(shard(full[x], layout, r, n)) for x in ("q", "k", "v"))
    dout = shard(full["dout"], layout, r, n)
    window = mask.window if mask is not None else (-1, -1)
    docs = mask.docs if mask is not None else None
    if docs is not None:
        if q.shape[0] != 1:
            raise NotImplementedError("packed documents are one sequence: --batch 1")
        cu = torch.tensor(docs, dtype=torch.int32)
        longest = max(b - a for a, b in zip(docs, docs[1:]))
        varlen = VARLEN_FUNCS[base]

        def attn(q_, k_, v_):
            return varlen(q_[0], k_[0], v_[0], cu, longest, causal=causal, window_size=window,
                          group=group, backend=backend).unsqueeze(0)
    else:
        def attn(q_, k_, v_):
            return fn(q_, k_, v_, causal=causal, window_size=window, group=group, backend=backend)

    def step(fwd_only: bool) -> torch.Tensor:
        saved = os.environ.get(TRANSPORT_ENV)
        os.environ[TRANSPORT_ENV] = transport or "collective"
        try:
            return _run(attn, (q, k, v), dout, fwd_only)
        finally:
            os.environ.pop(TRANSPORT_ENV) if saved is None else os.environ.update({TRANSPORT_ENV: saved})
    return Prepared(step, layout, f"transport {transport}" if transport else "")


def _whole_world(group, method: str, per: int) -> int:
    """The world size, for a method that cuts the whole world into groups of ``per`` and more."""
    n = dist.get_world_size(group)
    if n != dist.get_world_size():
        raise NotImplementedError(f"{method} splits the whole world into its groups (run it on the default group)")
    if n % per or n == per:
        raise NotImplementedError(f"{method} needs a world of a multiple of {per} ranks, more than {per}")
    return n


def hybrid(name: str, full: dict, causal: bool, group, backend: str | None) -> Prepared:
    """hybrid{Ni}-ringXk: ringX.hybrid with inner groups of Ni consecutive ranks (one node)."""
    from ..hybrid import groups_2d, hybrid_attn_func, hybrid_positions
    split, fn = name.split("-", 1)
    ni = int(split[len("hybrid"):])
    n = _whole_world(group, name, ni)
    inner, outer = groups_2d(ni)
    pos = hybrid_positions(fn, full["q"].shape[1], dist.get_rank(inner), ni, dist.get_rank(outer), n // ni)
    q, k, v = (_leaf(full[x].index_select(1, pos)) for x in ("q", "k", "v"))
    dout = full["dout"].index_select(1, pos)

    def attn(q_, k_, v_):
        return hybrid_attn_func(q_, k_, v_, fn, inner, outer, causal=causal)
    return Prepared(lambda fwd_only: _run(attn, (q, k, v), dout, fwd_only), "hybrid",
                    f"heads over {ni}, {fn} over {n // ni}", positions=pos.to(full["q"].device))


def hierarchical(name: str, full: dict, causal: bool, group, backend: str | None) -> Prepared:
    """ringX3-nodes{Ni}: ringX3 over ringX.node_groups(world, Ni) (two-level gathers)."""
    from ..comm import node_groups
    ni = int(name[len("ringX3-nodes"):])
    n = _whole_world(group, name, ni)
    ng = node_groups(group, ni)
    fn = ATTN_FUNCS["ringX3"]
    r = dist.get_rank(group)
    q, k, v = (_leaf(shard(full[x], "zigzag", r, n)) for x in ("q", "k", "v"))
    dout = shard(full["dout"], "zigzag", r, n)

    def attn(q_, k_, v_):
        return fn(q_, k_, v_, causal=causal, group=ng, backend=backend)
    return Prepared(lambda fwd_only: _run(attn, (q, k, v), dout, fwd_only), "zigzag",
                    f"k/v gathered within {ni} ranks, then across {n // ni}")


def allgather(full: dict, causal: bool, group, backend: str | None) -> Prepared:
    """ringX.baseline.allgather_attention: all-gather k/v, one SDPA call (bidirectional only)."""
    from ..baseline import allgather_attention
    if causal:
        raise NotImplementedError("the all-gather baseline is bidirectional only")
    if backend is not None:
        raise NotImplementedError("the all-gather baseline runs SDPA's own kernel choice")
    n, r = dist.get_world_size(group), dist.get_rank(group)
    q, k, v = (_leaf(shard(full[x], "contiguous", r, n)) for x in ("q", "k", "v"))
    dout = shard(full["dout"], "contiguous", r, n)

    def attn(q_, k_, v_):
        return allgather_attention(q_, k_, v_, group)
    return Prepared(lambda fwd_only: _run(attn, (q, k, v), dout, fwd_only), "contiguous",
                    "SDPA over all-gathered k/v")


def _native_modules():
    """PyTorch's context-parallel module (its private helpers moved between releases)."""
    for name in ("torch.distributed.tensor.experimental._context_parallel._attention",
                 "torch.distributed.tensor.experimental._attention"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "set_rotate_method"):
            return mod
    raise RuntimeError("this torch has no context_parallel set_rotate_method")


def native(name: str, full: dict, causal: bool, group, backend: str | None) -> Prepared:
    """torch.distributed.tensor.experimental.context_parallel with the all-gather or all-to-all
    rotate method, on the same SDPA kernel. It shards (b, h, S, d) buffers itself (load-balanced
    for causal, plain for full attention, where its balancing is wrong), takes no GQA, so k/v are
    expanded to the query heads here."""
    if full["q"].device.type != "cuda":
        raise RuntimeError("PyTorch native context parallel runs on CUDA devices only")
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    mod = _native_modules()
    unshard = getattr(mod, "context_parallel_unshard", None) or getattr(
        importlib.import_module("torch.distributed.tensor.experimental"), "context_parallel_unshard")
    mod.set_rotate_method(name.split("-")[1])
    if hasattr(mod, "_cp_options"):
        mod._cp_options.enable_load_balance = causal
    mesh = DeviceMesh.from_group(group, "cuda")
    group_size = full["q"].shape[2] // full["k"].shape[2]
    bufs = [full["q"].transpose(1, 2).contiguous(),
            full["k"].repeat_interleave(group_size, 2).transpose(1, 2).contiguous(),
            full["v"].repeat_interleave(group_size, 2).transpose(1, 2).contiguous(),
            full["dout"].transpose(1, 2).contiguous()]
    kernels = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}
    sdpa_backend = kernels.get(backend or "cudnn", SDPBackend.CUDNN_ATTENTION)
    ctx = context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2])
    ctx.__enter__()  # shards bufs in place; closed by the driver after the row
    q, k, v = (b.detach().requires_grad_() for b in bufs[:3])
    dout = bufs[3]

    def attn(q_, k_, v_):
        with sdpa_kernel(sdpa_backend):
            return torch.nn.functional.scaled_dot_product_attention(q_, k_, v_, is_causal=causal)

    def to_full(out: torch.Tensor) -> torch.Tensor:
        """Local (b, h, S/N, d) output -> the whole (b, S, h, d) sequence on every rank."""
        return unshard(mesh, [out.contiguous()], [2])[0].transpose(1, 2)
    prepared = Prepared(lambda fwd_only: _run(attn, (q, k, v), dout, fwd_only), "native",
                        f"{sdpa_backend.name.lower()}, kv expanded")
    prepared.to_full = to_full
    prepared.close = lambda: ctx.__exit__(None, None, None)
    return prepared


def ring_flash(name: str, full: dict, causal: bool, group, backend: str | None) -> Prepared:
    """ring-flash-attn's zigzag ring attention, when that package is installed."""
    try:
        rfa = importlib.import_module("ring_flash_attn")
    except ImportError:
        raise RuntimeError("the ring-flash-attn package is not installed") from None
    n, r = dist.get_world_size(group), dist.get_rank(group)
    q, k, v = (_leaf(shard(full[x], "zigzag", r, n)) for x in ("q", "k", "v"))
    dout = shard(full["dout"], "zigzag", r, n)

    def attn(q_, k_, v_):
        return rfa.zigzag_ring_flash_attn_func(q_, k_, v_, causal=causal, group=group)
    return Prepared(lambda fwd_only: _run(attn, (q, k, v), dout, fwd_only), "zigzag")


def prepare(method: str, full: dict, causal: bool, group, backend: str | None,
            mask: Mask | None = None) -> Prepared:
    if method in ATTN_FUNCS or method in COPY:
        return ringx(method, full, causal, group, backend, mask)
    if method in MASKED_BASELINE:
        if mask is None:
            raise NotImplementedError("allgather-varlen runs with --docs or --window")
        return allgather_masked(full, mask, group, backend)
    if mask is not None:
        raise NotImplementedError(f"{method} takes no documents or windows here")
    if method in NATIVE:
        return native(method, full, causal, group, backend)
    if method in HYBRID:
        return hybrid(method, full, causal, group, backend)
    if method in HIERARCHICAL:
        return hierarchical(method, full, causal, group, backend)
    if method in RING_FLASH:
        return ring_flash(method, full, causal, group, backend)
    if method in BASELINE:
        return allgather(full, causal, group, backend)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(all_methods())}")


def all_methods() -> list[str]:
    return (list(ATTN_FUNCS) + list(COPY) + list(NATIVE) + list(RING_FLASH) + list(BASELINE)
            + list(MASKED_BASELINE) + list(HYBRID) + list(HIERARCHICAL))
