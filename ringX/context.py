"""One ringX function bound to its context-parallel group.

A ringX function expects its inputs in one sequence layout (``expected_layout``), and everything
that feeds it (the token shards, the positions for RoPE, the gathering of outputs) must use that
same layout over that same group. ``ContextParallel`` holds the four together, so they cannot
drift apart::

    cp = ContextParallel("ringX4", cp_group)
    q, k, v = (cp.shard(t) for t in (q_global, k_global, v_global))   # (b, S/N, h, d)
    pos = cp.positions(S, device=q.device)                              # (S/N,) for RoPE
    out = cp.attention(q, k, v, causal=True)                            # (b, S/N, h, d)
    out_global = cp.unshard(out)                                        # (b, S, h, d), every rank

A sequence whose length the layout cannot split (S % N, or S % 2N for zigzag) is padded at its
end (``pad``; for full attention and packed documents the padding becomes its own document,
``pad_documents``), so that no real token's result changes.

Two-level groups (``inner=(inner_group, outer_group)``, ringX.hybrid: heads over the inner
group, the function over the outer group) take the hybrid layout; ``group`` is then the whole cp
group (inner x outer ranks), used by ``unshard`` only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .algorithms import ALGORITHMS
from .layout import global_positions, unshard


def name_of(fn) -> str:
    """"ringX3" for "ringX3", "ringX3_attn_func", ringX3_attn_func or ringX3_attn_varlen_func
    (ValueError for anything else)."""
    from . import ATTN_FUNCS, VARLEN_FUNCS
    name = fn if isinstance(fn, str) else next(
        (n for table in (ATTN_FUNCS, VARLEN_FUNCS) for n, f in table.items() if f is fn), None)
    for suffix in ("_attn_varlen_func", "_attn_func"):
        name = name[: -len(suffix)] if name and name.endswith(suffix) else name
    if name not in ALGORITHMS:
        raise ValueError(f"not a ringX attention function: {fn!r}; valid: {', '.join(ALGORITHMS)}")
    return name


def _size_rank(group) -> tuple[int, int]:
    """(size, rank) of ``group`` (None: the default group, or one process without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class ContextParallel:
    """``fn`` ("ringX1".."ringX4" or one of the functions) over ``group`` (any process group;
    None: the default group, or one process).

    Args:
        fn: the ringX function.
        group: the cp group. With ``inner``: the whole two-level group (for ``unshard``).
        layout: None for the function's own layout; "stripe" for ringX3/ringX4 (striped attention).
        inner: (inner group, outer group) of a two-level cp group (ringX.hybrid).

    Attributes: ``name``, ``layout`` ("contiguous", "zigzag", "stripe" or "hybrid"), ``rank`` and
    ``world_size`` (of the whole cp group).
    """

    def __init__(self, fn, group=None, *, layout: str | None = None, inner=None):
        self.name = name_of(fn)
        algo = ALGORITHMS[self.name]
        own = algo.layout
        if inner is not None and layout is not None:
            raise ValueError("a two-level group (inner=...) has its own layout (ringX.hybrid); leave layout out")
        if layout == own:
            layout = None
        if layout is not None and layout not in algo.other_layouts:
            takers = [n for n, a in ALGORITHMS.items() if layout in a.other_layouts]
            raise ValueError(f"{self.name} takes the {own} layout" + "".join(
                f" or layout={x!r}" for x in algo.other_layouts) + f", not {layout!r}" +
                (f" (layout={layout!r} is taken by {' and '.join(takers)})" if takers else ""))
        if inner is not None:
            if len(inner) != 2:
                raise ValueError("inner must be (inner group, outer group)")
            (self._ni, self._ri), (self._no, self._ro) = _size_rank(inner[0]), _size_rank(inner[1])
        self.group, self.inner = group, inner
        self.layout = "hybrid" if inner is not None else (layout or own)
        self.world_size, self.rank = _size_rank(group)
        if inner is not None and self._ni * self._no != self.world_size:
            raise ValueError(f"the cp group has {self.world_size} ranks but inner x outer is "
                             f"{self._ni} x {self._no}")

    def __repr__(self) -> str:
        return f"ContextParallel({self.name!r}, layout={self.layout!r}, rank={self.rank}, world_size={self.world_size})"

    @property
    def parts(self) -> int:
        """How many equal parts a sequence is cut into: 2N for the zigzag layout (and a two-level
        group over a zigzag function), else N. A sequence length must divide by it."""
        zigzag = ALGORITHMS[self.name].layout == "zigzag" and self.layout in ("zigzag", "hybrid")
        return (2 if zigzag else 1) * self.world_size

    def padded_length(self, seqlen: int) -> int:
        """The smallest length >= ``seqlen`` that this group's layout can split."""
        if seqlen < 1:
            raise ValueError(f"sequence length must be positive, got {seqlen}")
        return -(-seqlen // self.parts) * self.parts

    def pad(self, x: torch.Tensor, dim: int = 1, value=0) -> torch.Tensor:
        """``x`` (..., S, ...) with ``value`` appended along ``dim`` up to ``padded_length(S)``
        (``x`` itself when S already splits). Padding at the end is exact for causal attention
        (no real token sees a later one); for full attention give the padding its own document
        (``pad_documents``) and run the varlen function. Pad labels with the loss's ignore_index."""
        extra = self.padded_length(x.shape[dim]) - x.shape[dim]
        if extra == 0:
            return x
        shape = list(x.shape)
        shape[dim] = extra
        return torch.cat([x, x.new_full(shape, value)], dim=dim)

    def pad_documents(self, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Global document boundaries (D + 1,) of a packed sequence of cu_seqlens[-1] tokens ->
        those of the ``pad``-ded sequence: the padding is one more document, so no real token
        attends it or is attended by it (unchanged when nothing is padded)."""
        total = int(cu_seqlens[-1])
        padded = self.padded_length(total)
        if padded == total:
            return cu_seqlens
        return torch.cat([cu_seqlens, cu_seqlens.new_tensor([padded])])

    def positions(self, seqlen: int, device=None) -> torch.Tensor:
        """Global positions (seqlen // world_size,) int64 of the tokens this rank holds of a
        sequence of ``seqlen`` tokens (for RoPE / position embeddings)."""
        if self.inner is not None:
            from .hybrid import hybrid_positions
            return hybrid_positions(self.name, seqlen, self._ri, self._ni, self._ro, self._no, device=device)
        return global_positions(self.layout, seqlen, self.rank, self.world_size, device=device)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part (a new contiguous tensor) of the whole-sequence tensor ``x``, whose
        sequence runs along ``dim``: (..., S, ...) -> (..., S / world_size, ...)."""
        return x.index_select(dim, self.positions(x.shape[dim], device=x.device)).contiguous()

    def unshard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole-sequence tensor from every rank's part ``x`` (..., S/N, ...) along ``dim``:
        (..., S, ...) on every rank. Collective over ``group``; not differentiable."""
        if self.world_size == 1:
            return x.contiguous()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        if self.inner is None:
            return unshard(parts, self.layout, dim)
        mine = self.positions(self.world_size * x.shape[dim], device=x.device)
        where = [torch.empty_like(mine) for _ in parts]      # where each rank's tokens sit: ask them
        dist.all_gather(where, mine, group=self.group)
        whole = torch.cat(parts, dim=dim)
        return torch.empty_like(whole).index_copy_(dim, torch.cat(where), whole)

    def attention(self, q, k, v, *, causal: bool = False, softmax_scale=None, window_size=(-1, -1),
                  return_attn_probs: bool = False, backend=None, as_op: bool = False):
        """The bound function on this rank's shards: q (b, S/N, h, d), k/v (b, S/N, hk, d) ->
        out like q (with ``return_attn_probs``: (out, lse (b, h, S/N) float32, None)).
        ``as_op``: through the custom op ``ringx::attention`` in eager mode too (ringX.ops), so
        that a selective checkpointing policy can keep its outputs (not with return_attn_probs
        or a two-level group)."""
        return self._attend(q, k, v, None, None, causal, softmax_scale, window_size, return_attn_probs,
                            backend, as_op)

    def varlen_attention(self, q, k, v, cu_seqlens, max_seqlen: int, *, causal: bool = False,
                         softmax_scale=None, window_size=(-1, -1), return_attn_probs: bool = False,
                         backend=None, as_op: bool = False):
        """The bound varlen function on this rank's (S/N, h, d) shards of one packed sequence
        whose global document boundaries are ``cu_seqlens`` (ringX.varlen) -> out like q (with
        ``return_attn_probs``: (out, lse (h, S/N), None)). ``as_op`` as in ``attention``."""
        res = self._attend(q[None], k[None], v[None], cu_seqlens, max_seqlen, causal, softmax_scale,
                           window_size, return_attn_probs, backend, as_op)
        return (res[0][0], res[1][0], None) if return_attn_probs else res[0]

    def _attend(self, q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window_size,
                return_attn_probs, backend, as_op):
        """(b, s, h, d) shards through the hybrid, the custom op or the function itself (its
        varlen twin on a batch of one when ``cu_seqlens`` is given) -> out, or (out, lse, None)."""
        kw = dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size)
        if self.inner is not None:
            if as_op or backend is not None:
                raise ValueError("a two-level group runs ringX.hybrid: as_op and backend are not taken")
            from .hybrid import hybrid_attn_func
            return hybrid_attn_func(q, k, v, self.name, self.inner[0], self.inner[1], **kw,
                                    return_attn_probs=return_attn_probs, cu_seqlens=cu_seqlens,
                                    max_seqlen=max_seqlen)
        if self.layout != ALGORITHMS[self.name].layout:      # another layout it takes (ringX1/2 take no argument)
            kw["layout"] = self.layout
        kw.update(group=self.group, backend=backend)
        if as_op:
            if return_attn_probs:
                raise ValueError("as_op returns out only; leave return_attn_probs out")
            from .ops import attention_through_op
            return attention_through_op(self.name, q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **kw)
        from . import ATTN_FUNCS, VARLEN_FUNCS
        if cu_seqlens is None:
            return ATTN_FUNCS[self.name](q, k, v, return_attn_probs=return_attn_probs, **kw)
        res = VARLEN_FUNCS[self.name](q[0], k[0], v[0], cu_seqlens, max_seqlen,
                                      return_attn_probs=return_attn_probs, **kw)
        return (res[0][None], res[1][None], None) if return_attn_probs else res[None]
