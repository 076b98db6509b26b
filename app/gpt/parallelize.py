"""Context parallelism for the Llama app: shard a batch in the layout of the chosen ringX
function, bind that function to the cp group, and compute the exact mean loss over the whole
sequence.

Gradients: each cp rank back-propagates the loss of its own tokens (divided by the *global*
token count), so the full gradient of a weight is the SUM over cp ranks of their gradients;
``reduce_gradients`` all-reduces them over the group that shares the weights (cp, or dp x cp).
"""
from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringX import ATTN_FUNCS, expected_layout
from ringX.layout import global_positions, shard

ATTN_CHOICES = tuple(ATTN_FUNCS) + ("sdpa",)
# With tensor parallelism the attention heads arriving here are this tp rank's share; the cp
# group is the set of ranks holding the same heads for other parts of the sequence.


def cp_attention(attn: str, cp_group):
    """The attention function for the model: a ringX function bound to ``cp_group`` (causal)."""
    if attn not in ATTN_FUNCS:
        raise ValueError(f"attention {attn!r} is not a ringX function; valid: {', '.join(ATTN_FUNCS)}")
    return functools.partial(ATTN_FUNCS[attn], causal=True, group=cp_group)


def shard_batch(tokens: torch.Tensor, labels: torch.Tensor, attn: str, cp_group):
    """Global (B, S) tokens/labels -> this cp rank's (B, S/N) tokens, labels and (S/N,) global
    positions, in the layout ``attn`` expects."""
    n = dist.get_world_size(cp_group) if cp_group is not None else 1
    r = dist.get_rank(cp_group) if cp_group is not None else 0
    layout = expected_layout(attn) if attn in ATTN_FUNCS else "contiguous"
    pos = global_positions(layout, tokens.shape[1], r, n, device=tokens.device)
    return shard(tokens, layout, r, n), shard(labels, layout, r, n), pos


def cp_loss(logits: torch.Tensor, labels: torch.Tensor, cp_group, ignore_index: int = -100):
    """Mean cross-entropy over every token of the whole sequence (all cp ranks).

    Returns (loss to back-propagate on this rank, global mean loss as a detached tensor)."""
    local_sum = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum",
                                ignore_index=ignore_index)
    counts = torch.stack([(labels != ignore_index).sum().to(torch.float64), local_sum.detach().double()])
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        dist.all_reduce(counts, group=cp_group)
    total_tokens, total_sum = counts[0].clamp(min=1), counts[1]
    return local_sum / total_tokens.to(local_sum.dtype), (total_sum / total_tokens).float()


def reduce_gradients(model: torch.nn.Module, group) -> None:
    """Sum every parameter gradient over ``group`` (the ranks sharing the weights)."""
    if group is None or dist.get_world_size(group) == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
