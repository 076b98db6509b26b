"""Exactness checks for the ringX functions: a float64 reference, global error metrics and the
pass rules. Used by the test suite and by ``python -m ringX.selfcheck``.

Pass rules (per output: out, lse, dq, dk, dv; errors are relative L2 norms over the whole
sequence, ||x - ref|| / ||ref||, against float64 attention on the same rounded inputs):

- float32 / float64: out and lse <= 2e-5, gradients <= 1e-4.
- bfloat16 / float16: out and gradients <= 2x the error of single-device PyTorch attention
  (F.scaled_dot_product_attention) in the same dtype on the same inputs, and <= 1.5x the error of
  the same ringX function on a group of one rank; lse <= 2e-5 (the kernels accumulate it in
  float32), or, where the kernel itself is less exact than that, <= 2x the lse error of the same
  function on one rank, which is the kernel on the whole sequence (PyTorch's CPU flash kernel in
  bf16 on AVX2-only processors: 3.9e-5 on a case whose float32 lse is within 4e-8).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import VARLEN_FUNCS, expected_layout
from .comm import GroupComm
from .context import name_of
from .layout import shard

OUTPUTS = ("out", "lse", "dq", "dk", "dv")
FP32_TOL = {"out": 2e-5, "lse": 2e-5, "dq": 1e-4, "dk": 1e-4, "dv": 1e-4}


@dataclass(frozen=True)
class Case:
    """One exactness case; ``seqlen`` is the global sequence length."""

    batch: int
    seqlen: int
    heads: int
    kv_heads: int
    headdim: int
    causal: bool
    dtype: torch.dtype
    seed: int = 0
    window: tuple[int, int] = (-1, -1)
    docs: tuple[int, ...] | None = None      # global cu_seqlens: run through the varlen functions
    layout: str | None = None                # None: the function's own

    def label(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        extra = "" if self.window == (-1, -1) else f" window{self.window}"
        if self.docs is not None:
            extra += f" docs{list(self.docs) if len(self.docs) <= 8 else len(self.docs) - 1}"
        if self.layout:
            extra += f" {self.layout}"
        return (f"b{self.batch} s{self.seqlen} h{self.heads}/{self.kv_heads} d{self.headdim} "
                f"{'causal' if self.causal else 'full'} {dt}{extra}")

    @property
    def masked(self) -> bool:
        return self.window != (-1, -1) or self.docs is not None or self.layout == "stripe"


def global_mask(seqlen: int, causal: bool, window=(-1, -1), docs=None, device=None) -> torch.Tensor:
    """(S, S) bool: key j visible to query i (documents, causal, flash-attn window over global
    positions), straight from the definition."""
    i = torch.arange(seqlen, device=device).unsqueeze(1)
    j = torch.arange(seqlen, device=device).unsqueeze(0)
    vis = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device)
    if docs is not None:
        doc = torch.bucketize(torch.arange(seqlen, device=device),
                              torch.tensor(docs[1:-1], device=device), right=True)
        vis &= doc.unsqueeze(1) == doc.unsqueeze(0)
    if causal:
        vis &= j <= i
    if window[0] >= 0:
        vis &= j >= i - window[0]
    if window[1] >= 0:
        vis &= j <= i + window[1]
    return vis


def make_inputs(case: Case, device: torch.device) -> dict[str, torch.Tensor]:
    """Global q, dout (b, S, h, d) and k, v (b, S, kv_heads, d): random normal, drawn in float64
    on the CPU from ``case.seed`` (identical on every rank), rounded to case.dtype."""
    g = torch.Generator().manual_seed(case.seed)
    shapes = {"q": (case.batch, case.seqlen, case.heads, case.headdim),
              "k": (case.batch, case.seqlen, case.kv_heads, case.headdim),
              "v": (case.batch, case.seqlen, case.kv_heads, case.headdim),
              "dout": (case.batch, case.seqlen, case.heads, case.headdim)}
    return {n: torch.randn(s, generator=g, dtype=torch.float64).to(case.dtype).to(device)
            for n, s in shapes.items()}


def reference_attention(q, k, v, dout, causal: bool, scale: float,
                        visible: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Explicit float64 attention with autograd. q/dout (b, S, h, d), k/v (b, S, hk, d) ->
    out (b, S, h, d), lse (b, h, S), dq, dk, dv, all float64. ``visible`` (S, S) bool: the
    global mask (then ``causal`` is ignored; see global_mask)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    ke, ve = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, ke) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible.to(q.device), float("-inf"))
    elif causal:
        s = q.shape[1]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1),
                                    float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), ve)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.double())
    return {"out": out.detach(), "lse": lse.detach(), "dq": dq, "dk": dk, "dv": dv}


def torch_attention(q, k, v, dout, causal: bool, scale: float,
                    visible: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Single-device PyTorch attention in the inputs' dtype: out, dq, dk, dv (``visible``: the
    global bool mask, as attn_mask)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=None if visible is None else visible.to(q.device),
                                         is_causal=causal and visible is None, scale=scale,
                                         enable_gqa=True).transpose(1, 2)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}


def global_rel_err(x: torch.Tensor, ref: torch.Tensor, group=None) -> float:
    """||x - ref|| / ||ref|| over the union of the shards held by the ranks of ``group``."""
    diff = (x.double() - ref.double()).norm() ** 2
    den = ref.double().norm() ** 2
    sums = torch.stack([diff, den]).reshape(2)
    if group is not None and dist.get_world_size(group) > 1:
        comm = GroupComm(group)
        sums = sums.to(comm.collective_device())
        comm.all_reduce(sums, async_op=False)
    diff, den = sums.tolist()
    if diff != diff:  # NaN anywhere
        return float("nan")
    # an all-zero reference (dq, dk under a (0, 0) window) is compared in absolute terms
    return (diff ** 0.5) / max(den ** 0.5, 0.1)


def run_ringx(fn, case: Case, group, device: torch.device, backend: str | None = None,
              inputs: dict | None = None) -> tuple[dict[str, float], float]:
    """Run ``fn`` forward and backward on ``case`` sharded over ``group`` in the layout it expects.

    Returns ({output: global relative error vs the float64 reference}, seconds for fwd+bwd).
    """
    n = dist.get_world_size(group) if group is not None else 1
    r = dist.get_rank(group) if group is not None else 0
    layout = case.layout or expected_layout(fn)
    full = inputs if inputs is not None else make_inputs(case, device)
    scale = case.headdim ** -0.5
    ref = reference_attention(full["q"], full["k"], full["v"], full["dout"], case.causal, scale,
                              case_mask(case))
    local = {name: shard(t, layout, r, n) for name, t in full.items()}
    q, k, v = (local[x].detach().clone().requires_grad_() for x in ("q", "k", "v"))
    kwargs = dict(causal=case.causal, softmax_scale=scale, return_attn_probs=True, group=group,
                  backend=backend)
    if case.window != (-1, -1):
        kwargs["window_size"] = case.window
    if case.layout:
        kwargs["layout"] = case.layout
    start = time.perf_counter()
    if case.docs is not None:
        if case.batch != 1:
            raise ValueError("varlen cases hold one packed sequence (batch 1)")
        varlen = VARLEN_FUNCS[name_of(fn)]
        cu = torch.tensor(case.docs, dtype=torch.int32)
        longest = max(b - a for a, b in zip(case.docs, case.docs[1:]))
        out, lse, _ = varlen(q[0], k[0], v[0], cu, longest, **kwargs)
        out, lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        out, lse, _ = fn(q, k, v, **kwargs)
    out.backward(local["dout"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ours = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    errs = {}
    for name in OUTPUTS:
        dim = 2 if name == "lse" else 1
        errs[name] = global_rel_err(ours[name], shard(ref[name], layout, r, n, dim=dim), group)
    return errs, seconds


def case_mask(case: Case) -> torch.Tensor | None:
    """The case's global (S, S) mask, or None for plain full / causal attention."""
    if case.window == (-1, -1) and case.docs is None:
        return None
    return global_mask(case.seqlen, case.causal, case.window, case.docs)


def torch_errors(case: Case, device: torch.device, inputs: dict | None = None) -> dict[str, float]:
    """Errors of single-device PyTorch attention (same dtype) on the full case."""
    full = inputs if inputs is not None else make_inputs(case, device)
    scale = case.headdim ** -0.5
    vis = case_mask(case)
    ref = reference_attention(full["q"], full["k"], full["v"], full["dout"], case.causal, scale, vis)
    got = torch_attention(full["q"], full["k"], full["v"], full["dout"], case.causal, scale, vis)
    return {n: global_rel_err(got[n], ref[n]) for n in got}


def bounds(case: Case, torch_errs: dict[str, float] | None,
           solo_errs: dict[str, float] | None) -> dict[str, float]:
    """The largest error each output may have under the pass rules above."""
    if case.dtype in (torch.float32, torch.float64):
        return dict(FP32_TOL)
    if torch_errs is None:
        raise ValueError("low-precision cases need the single-device PyTorch errors")
    out = {"lse": FP32_TOL["lse"] if solo_errs is None else max(FP32_TOL["lse"], 2.0 * solo_errs["lse"])}
    for name in ("out", "dq", "dk", "dv"):
        bound = 2.0 * torch_errs[name]
        if solo_errs is not None:
            bound = min(bound, 1.5 * solo_errs[name])
        out[name] = bound
    return out


@dataclass(frozen=True)
class Result:
    """One checked case: errors, their bounds and the fwd+bwd time."""

    algo: str
    world_size: int
    case: Case
    errors: dict
    bounds: dict
    seconds: float

    @property
    def failures(self) -> list[str]:
        return [f"{n}: {self.errors[n]:.3g} > {self.bounds[n]:.3g}" for n in OUTPUTS
                if not self.errors[n] <= self.bounds[n]]

    @property
    def passed(self) -> bool:
        return not self.failures


def check_case(fn, algo: str, case: Case, group, device: torch.device, solo_group=None,
               backend: str | None = None) -> Result:
    """Check ``fn`` on ``case`` over ``group``. For low-precision dtypes also runs single-device
    PyTorch and, if ``solo_group`` (a group of this rank alone) is given, ``fn`` on one rank."""
    full = make_inputs(case, device)
    errs, seconds = run_ringx(fn, case, group, device, backend, full)
    torch_errs = solo_errs = None
    if case.dtype not in (torch.float32, torch.float64):
        torch_errs = torch_errors(case, device, full)
        if solo_group is not None:
            solo_errs, _ = run_ringx(fn, case, solo_group, device, backend, full)
    n = dist.get_world_size(group) if group is not None else 1
    return Result(algo, n, case, errs, bounds(case, torch_errs, solo_errs), seconds)


def standard_cases(world_size: int, seqlen_local: int = 8, seed: int = 0) -> list[Case]:
    """The CI matrix: causal and full, float32 and bfloat16, MHA 4/4 and GQA 6/2, batch 2."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            for heads, kv_heads in ((4, 4), (6, 2)):
                cases.append(Case(batch=2, seqlen=seqlen_local * world_size, heads=heads,
                                  kv_heads=kv_heads, headdim=16, causal=causal, dtype=dtype,
                                  seed=seed + len(cases)))
    return cases


def solo_group(world_size: int):
    """A process group holding only this rank (a collective: every rank creates every group)."""
    if world_size == 1:
        return dist.group.WORLD
    return [dist.new_group([r]) for r in range(world_size)][dist.get_rank()]


def with_seqlen(case: Case, seqlen: int) -> Case:
    return replace(case, seqlen=seqlen)
