"""Sequence layouts: which global tokens each rank of a context-parallel group holds.

A global sequence of length S is split over N ranks, each holding S/N tokens:

- ``contiguous``: rank r holds tokens [r*S/N, (r+1)*S/N). Used by ringX1 and ringX2.
- ``zigzag``: S is cut into 2N equal chunks; rank r holds chunk r followed by chunk 2N-1-r, so
  every rank gets the same amount of causal work. Used by ringX3 and ringX4.
- ``stripe``: rank r holds tokens r, r+N, r+2N, ... (striped attention). Provided for users'
  data pipelines; no ringX function expects it.

All helpers act on dimension ``dim`` (1 for (batch, seqlen, heads, headdim) tensors).

Block plans
-----------
``block_plan`` (through ringX.plan) says which part of a rank's local queries attends which part
of another rank's local keys/values, and whether that sub-block needs a causal mask. Kernels
only ever see full blocks or square diagonal blocks, so the different causal alignments of
backends never matter::

    zigzag, N=2, S=8 chunks c0..c3: rank0 = [c0, c3], rank1 = [c1, c2]
    q rank 1 vs kv rank 0:  [c1, c2] x [c0, c3] -> whole q attends first half (c0)
    q rank 0 vs kv rank 1:  [c0, c3] x [c1, c2] -> second half of q (c3) attends all of it
    q rank r vs kv rank r:  causal on the local order (positions increase along the shard)
"""
from __future__ import annotations

import torch

from .plan import Block, Mask, block_of, layout_runs

LAYOUTS = ("contiguous", "zigzag", "stripe")


def _check(layout: str, seqlen: int, world_size: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid layouts: {', '.join(LAYOUTS)}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    parts = 2 * world_size if layout == "zigzag" else world_size
    if seqlen % parts != 0:
        raise ValueError(
            f"the {layout} layout splits the sequence into {parts} equal parts "
            f"({'2 x ' if layout == 'zigzag' else ''}{world_size} ranks), but the global sequence "
            f"length {seqlen} is not divisible by {parts}; pad it to a multiple of {parts}")


def global_positions(layout: str, seqlen: int, rank: int, world_size: int,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Global token positions held by ``rank``: int64 tensor of shape (seqlen // world_size,)."""
    _check(layout, seqlen, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    local = seqlen // world_size
    if layout == "contiguous":
        return torch.arange(rank * local, (rank + 1) * local, device=device)
    if layout == "stripe":
        return torch.arange(rank, seqlen, world_size, device=device)
    chunk = local // 2
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    last_id = 2 * world_size - 1 - rank
    second = torch.arange(last_id * chunk, (last_id + 1) * chunk, device=device)
    return torch.cat([first, second])


def shard(x: torch.Tensor, layout: str, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """The part of the global tensor ``x`` that ``rank`` holds (a new contiguous tensor).

    x: (..., seqlen, ...) with the sequence on ``dim``; returns (..., seqlen // world_size, ...).
    """
    pos = global_positions(layout, x.shape[dim], rank, world_size, device=x.device)
    return x.index_select(dim, pos).contiguous()


def unshard(parts: list[torch.Tensor], layout: str, dim: int = 1) -> torch.Tensor:
    """Reassemble the global tensor from every rank's part (``parts[r]`` from rank r)."""
    world_size = len(parts)
    if world_size == 0:
        raise ValueError("unshard needs at least one part")
    local = parts[0].shape[dim]
    if any(p.shape != parts[0].shape for p in parts):
        raise ValueError(f"unshard needs equal parts, got shapes {[tuple(p.shape) for p in parts]}")
    seqlen = local * world_size
    cat = torch.cat(parts, dim=dim)
    order = torch.cat([global_positions(layout, seqlen, r, world_size) for r in range(world_size)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seqlen)
    return cat.index_select(dim, inverse.to(cat.device))


def block_plan(layout: str, causal: bool, q_rank: int, kv_rank: int, seqlen_local: int,
               world_size: int | None = None) -> list[Block]:
    """The blocks in which rank ``q_rank``'s queries attend rank ``kv_rank``'s keys, full or plain
    causal attention (ringX.plan's planner; for other masks see RunContext.blocks).

    Returns [] when every query is masked from every key of ``kv_rank``. Plain causal blocks are
    one kernel call each: unmasked, or square causal on the diagonal. Their shape depends only on
    the order of the two ranks, so ``world_size`` may be left out."""
    n = world_size or max(q_rank, kv_rank) + 1
    blk = block_of(layout_runs(layout, q_rank, n, seqlen_local), layout_runs(layout, kv_rank, n, seqlen_local),
                   Mask(bool(causal)))
    return [] if blk is None else [blk]
