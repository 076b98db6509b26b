"""Model-wrapping steps shared by the apps, applied from outside the models: activation
checkpointing of blocks, FSDP2 over the ranks that share the weights (dp x cp), and gradient-norm
clipping that is global across tensor-parallel slices and FSDP shards."""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .weights import canonical_name


class Checkpointed(nn.Module):
    """Runs ``inner`` under non-reentrant activation checkpointing (recomputed in backward);
    ``context_fn`` as torch.utils.checkpoint's (a selective policy, e.g. keep_attention_context).
    Checkpoint names drop the ``inner`` level, so runs resume across checkpointing modes."""

    def __init__(self, inner: nn.Module, context_fn: Callable | None = None):
        super().__init__()
        self.inner, self.context_fn = inner, context_fn

    def forward(self, *args):
        if self.context_fn is None:      # torch.compile traces checkpoint only without a context_fn
            return checkpoint(self.inner, *args, use_reentrant=False)
        return checkpoint(self.inner, *args, use_reentrant=False, context_fn=self.context_fn)


def _attention_ops() -> set:
    """The attention ops whose outputs a selective checkpoint keeps: ringX's custom op and the
    scaled-dot-product kernels of every backend."""
    import ringX.ops  # noqa: F401  (registers torch.ops.ringx)
    aten = torch.ops.aten
    names = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_flash_attention_forward", "_efficient_attention_forward")
    return {torch.ops.ringx.attention.default} | {getattr(aten, n).default for n in names if hasattr(aten, n)}


def keep_attention_policy(ops: set, ctx, func, *args, **kwargs):
    """Selective checkpointing policy: keep the outputs of the ops in ``ops`` (attention out and
    lse), recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy
    return CheckpointPolicy.MUST_SAVE if func in ops else CheckpointPolicy.PREFER_RECOMPUTE


def keep_attention_context():
    """context_fn for torch.utils.checkpoint: the attention's outputs are kept, the rest of the
    block is recomputed in backward."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return create_selective_checkpoint_contexts(functools.partial(keep_attention_policy, _attention_ops()))


def checkpoint_blocks(blocks: nn.ModuleList) -> None:
    """Full activation checkpointing: only each block's input is kept for backward."""
    for i, block in enumerate(blocks):
        blocks[i] = Checkpointed(block)


def apply_fsdp(model: nn.Module, blocks: nn.ModuleList, mesh, bf16: bool, units: tuple = ()) -> nn.Module:
    """FSDP2 over ``mesh`` (the dp x cp ranks): each block, each of ``units`` ((a module or a list
    of modules sharded together, reshard after forward?) pairs) and the root are sharded units.
    Parameters and optimizer state stay float32 (sharded); with ``bf16`` blocks compute in bfloat16 and gradients are reduced
    in float32. A unit's gathered parameters live from its forward to its backward only (the
    root's would live through the whole step), so the input embedding and the output head are
    best ``units`` of their own. Set the divide factor with ``set_fsdp_divide_factor`` (dp:
    gradients summed over cp, averaged over dp)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # One rank reduces nothing: its gradients go to the float32 shard as they are (the same
    # values as through a float32 reduction, without its staging copies).
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else torch.float32,
                              reduce_dtype=torch.float32 if mesh.size() > 1 else None)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
    # the root and the other units take the model's own inputs (token ids, float positions),
    # which keep their dtype
    uncast = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype,
                                  cast_forward_inputs=False)
    for unit, reshard in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard, mp_policy=uncast)
    fully_shard(model, mesh=mesh, mp_policy=uncast, reshard_after_forward=False)
    return model


def set_fsdp_divide_factor(model: nn.Module, factor: float, group) -> None:
    """Gradients reduced by FSDP over ``group`` (the model's FSDP ranks) are divided by
    ``factor``; on gloo, which has no pre-scaled reductions, they are summed, then divided. On
    one rank nothing is reduced and nothing is set: FSDP would otherwise divide every gradient
    by the factor (one pass over all of them, even by 1)."""
    from torch.distributed.fsdp import FSDPModule
    if dist.get_world_size(group) == 1:
        return
    sum_only = dist.get_backend(group) == "gloo"
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(float(factor))
            if sum_only:
                m.set_force_sum_reduction_for_comms(True)


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` in lists of one device and dtype each (what one foreach call takes)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def clip_grad_norm(model: nn.Module, max_norm: float, tp_group, shard_group,
                   is_tp_sharded: Callable[[str], bool]) -> torch.Tensor:
    """Clip all gradients by their global 2-norm (returned, float64; see global_grad_norm): every
    gradient is scaled by clip_coefficient(norm, max_norm), the same factor on every rank."""
    total = global_grad_norm(model, tp_group, shard_group, is_tp_sharded)
    scale_grads_([p.grad for p in model.parameters() if p.grad is not None], clip_coefficient(total, max_norm))
    return total


def clip_coefficient(total: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (total + 1e-6)): the factor that clips gradients of global norm
    ``total`` (0-dim tensor) to ``max_norm``."""
    return (max_norm / (total + 1e-6)).clamp(max=1.0)


def scale_grads_(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    """Multiply ``grads`` (tensors or DTensors) in place by the 0-dim tensor ``coef`` (one
    foreach call per device and dtype)."""
    from torch.distributed.tensor import DTensor
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    for same in _by_device_and_dtype(local):
        torch._foreach_mul_(same, coef.to(same[0].device, same[0].dtype))


def global_grad_norm(model: nn.Module, tp_group, shard_group,
                     is_tp_sharded: Callable[[str], bool]) -> torch.Tensor:
    """The global 2-norm (0-dim float64) of all gradients over every parameter of the whole
    model: FSDP shards summed over ``shard_group``, tensor-parallel slices (plain-model names for
    which ``is_tp_sharded`` holds) over ``tp_group``, replicated parameters counted once, so
    every rank gets the same norm."""
    from torch.distributed.tensor import DTensor
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    grads = [(canonical_name(n), p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    sharded = any(isinstance(g, DTensor) for _, g in grads)
    locals_ = [(n, g.to_local() if isinstance(g, DTensor) else g) for n, g in grads]
    device = locals_[0][1].device
    sq = torch.zeros(2, dtype=torch.float64, device=device)
    for slot, tp_sharded in ((0, True), (1, False)):  # sq[0]: tp slices, sq[1]: replicated
        mine = [g for n, g in locals_ if (tp > 1 and is_tp_sharded(n)) == tp_sharded]
        for same in _by_device_and_dtype(mine):       # one foreach norm per device and dtype
            norms = torch._foreach_norm(same, 2, dtype=torch.float32)
            sq[slot] += torch.stack(norms).to(device, torch.float64).square().sum()
    if sharded and dist.get_world_size(shard_group) > 1:
        dist.all_reduce(sq, group=shard_group)
    if tp > 1:
        dist.all_reduce(sq, group=tp_group)
        sq[1] /= tp                                   # replicated: the same on every tp rank
    return sq.sum().sqrt()
