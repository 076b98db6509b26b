"""AdamW that updates FSDP2's sharded parameters through their local shards.

``torch.optim.AdamW`` on DTensor parameters sends each foreach or fused update through DTensor's
dispatch, which works out the sharding of every one of the hundreds of tensors in the call on
the host, every step (several ms a step at 150 parameters, with the GPU waiting). The update is
elementwise, so the local shards carry it: ``LocalShardAdamW`` hands the very same kernels the
local tensors that the DTensors wrap (same storage, updated in place), bit for bit the update of
``torch.optim.AdamW``. The optimizer state stays DTensors, so state dicts and distributed
checkpoints are unchanged; plain tensors pass through as they are.
"""
from __future__ import annotations

import torch


class LocalShardAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (same arguments, same state) whose update runs on local shards."""

    def _init_group(self, group, params_with_grad, grads, *state_lists):
        from torch.distributed.tensor import DTensor
        has_complex = super()._init_group(group, params_with_grad, grads, *state_lists)
        # a DTensor's local shard is the tensor it wraps (its storage, not a copy); to_local()
        # would give the same through an autograd function, at several microseconds a call
        for seq in (params_with_grad, grads, *state_lists):
            if isinstance(seq, list):
                seq[:] = [t._local_tensor if isinstance(t, DTensor) else t for t in seq]
        return has_complex
