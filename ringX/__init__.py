"""RingX: exact context-parallel attention for long sequences on HPC systems.

Four interchangeable functions with one signature (see ringX1_attn_func):

    ringX1_attn_func  bidirectional, contiguous layout, broadcast q / reduce out (causal: as ringX2)
    ringX2_attn_func  causal, contiguous layout, paired point-to-point steps (balanced)
    ringX3_attn_func  causal, zigzag layout, all-gather kv / reduce-scatter dkv (balanced)
    ringX4_attn_func  causal, zigzag layout, broadcast kv / reduce dkv (balanced)

Each has a varlen twin, ``ringX{1..4}_attn_varlen_func``, for packed documents (global
``cu_seqlens``); all eight take ``window_size`` (ringX.varlen).

``expected_layout(fn)`` names the sequence layout a function expects; ``ringX.layout`` shards,
unshards and gives global positions for it. ``ContextParallel(fn, group)`` binds a function to
its group with its layout: shard, positions, attention and unshard in one object.
"""
from __future__ import annotations

from .algorithms import (ALGORITHMS, ringX1_attn_func, ringX1_attn_varlen_func, ringX2_attn_func,
                         ringX2_attn_varlen_func, ringX3_attn_func, ringX3_attn_varlen_func,
                         ringX4_attn_func, ringX4_attn_varlen_func)
from .comm import NodeGroups, node_groups
from .context import ContextParallel, name_of
from .version import __version__

ATTN_FUNCS = {
    "ringX1": ringX1_attn_func,
    "ringX2": ringX2_attn_func,
    "ringX3": ringX3_attn_func,
    "ringX4": ringX4_attn_func,
}
VARLEN_FUNCS = {
    "ringX1": ringX1_attn_varlen_func,
    "ringX2": ringX2_attn_varlen_func,
    "ringX3": ringX3_attn_varlen_func,
    "ringX4": ringX4_attn_varlen_func,
}


def expected_layout(fn) -> str:
    """The sequence layout a ringX function (or its name, e.g. "ringX3") expects:
    "contiguous" or "zigzag"."""
    return ALGORITHMS[name_of(fn)].layout


__all__ = ["ringX1_attn_func", "ringX2_attn_func", "ringX3_attn_func", "ringX4_attn_func",
           "ringX1_attn_varlen_func", "ringX2_attn_varlen_func", "ringX3_attn_varlen_func",
           "ringX4_attn_varlen_func", "ATTN_FUNCS", "VARLEN_FUNCS", "expected_layout", "ContextParallel", "NodeGroups",
           "node_groups", "__version__"]
