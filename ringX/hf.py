"""Hugging Face transformers models with RingX context parallelism, through transformers' public
attention registry (no private function is patched).

    import ringX.hf
    ringX.hf.register()                                   # "ringX1".."ringX4" in AttentionInterface
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="ringX3")
    batch = ringX.hf.shard_inputs(input_ids, "ringX3", group=cp_group, pad_id=0)   # this rank's part
    logits = model(**batch.model_inputs()).logits                              # (b, S/N, vocab)
    loss, mean = ringX.hf.cp_loss(logits, batch.shift_labels, cp_group)        # exact over the group
    loss.backward()                 # then sum the gradients over the cp group (FSDP over dp x cp)

``shard_inputs`` takes the whole (b, S) batch (the same on every rank of the group; with
``pad_id`` of any length, padded at its end where the layout needs it) and returns
this rank's tokens, positions and already-shifted labels in the layout of the function
(``ringX.expected_layout``), and the document boundaries: position_ids that do not continue
(``pos[i] != pos[i-1] + 1``, e.g. a restart at 0) start a new document (packed sequences),
each attending only to itself, as transformers itself reads packed position_ids. The model's
own ``sliding_window`` (per layer, from ``layer_types``) becomes the window of the ringX call
(``window_size = (sliding_window - 1, 0)``: a token attends itself and the W - 1 before it).
Grouped-query attention runs unexpanded.

What it cannot do exactly it refuses with an error naming the feature: attention logit
softcapping, ALiBi or other position biases, attention dropout > 0 in training, attention masks
(custom 4-D masks or padding: pack sequences with position_ids instead), non-causal attention.

``cp_loss`` returns the mean cross-entropy over every labelled token of the whole sequence, the
number transformers reports for ``labels = input_ids`` (its internal shift is done before
sharding, so no token is lost at a shard edge), not a mean of per-rank means.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .algorithms import ALGORITHMS
from .context import ContextParallel

NAMES = tuple(ALGORITHMS)           # "ringX1".."ringX4": the attn_implementation names


@dataclass(frozen=True)
class CPInputs:
    """This rank's part of a batch for a model running ringX attention (see shard_inputs):
    input_ids, position_ids, shift_labels (b, S/N) int64, and for the attention the group, the
    function and the global document boundaries of each row (None: one document per row)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    shift_labels: torch.Tensor
    group: object
    attn: str
    cu_seqlens: tuple | None = None
    max_seqlen: tuple | None = None

    def model_inputs(self) -> dict:
        """Keyword arguments for ``model(...)``: tokens, positions and the attention's context."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "ringx": self}


def _boundaries(position_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[int]] | None:
    """Per row, the global cu_seqlens (int32) of the documents that position_ids (b, S) mark
    (a new one wherever pos[i] != pos[i-1] + 1), or None when every row is one document."""
    breaks = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not bool(breaks.any()):
        return None
    s = position_ids.shape[1]
    cus, longest = [], []
    for row in breaks:
        starts = (row.nonzero().flatten() + 1).tolist()
        cu = [0] + starts + [s]
        cus.append(torch.tensor(cu, dtype=torch.int32))
        longest.append(max(b - a for a, b in zip(cu, cu[1:])))
    return cus, longest


def shard_inputs(input_ids: torch.Tensor, attn: str, group=None, position_ids: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None, ignore_index: int = -100,
                 pad_id: int | None = None) -> CPInputs:
    """The whole batch (b, S) -> this rank's CPInputs for the ringX function ``attn``. labels
    default to input_ids; they are shifted here (position i is labelled with token i + 1, the
    last with ignore_index), as transformers does inside its loss. S must divide by N (by 2N
    for the zigzag functions ringX3 and ringX4), unless ``pad_id`` is given: then the batch is
    padded at its end with ``pad_id`` tokens up to the next length that splits, their positions
    continuing the last document's and their labels ``ignore_index``. The attention is causal,
    so no real token sees them: the real tokens' logits, loss and gradients are those of the
    unpadded batch, and an unpacked batch stays one document (the dense kernels)."""
    if attn not in ALGORITHMS:
        raise ValueError(f"attn {attn!r}: expected one of {', '.join(NAMES)}")
    cp = ContextParallel(attn, group)
    b, s = input_ids.shape
    if s % cp.parts and pad_id is None:
        raise ValueError(f"sequence length {s} must divide by {cp.parts} for {attn} over {cp.world_size} ranks "
                         f"({cp.layout} layout); pad or cut the batch to a multiple of {cp.parts}, or "
                         f"pass pad_id= to pad it here")
    if position_ids is None:
        position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
    labels = input_ids if labels is None else labels
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    extra = cp.padded_length(s) - s
    if extra:                # after every real token: causal attention never lets one see it
        input_ids, shifted = cp.pad(input_ids, value=pad_id), cp.pad(shifted, value=ignore_index)
        more = torch.arange(1, extra + 1, device=position_ids.device, dtype=position_ids.dtype)
        position_ids = torch.cat([position_ids, position_ids[:, -1:] + more], dim=1)
    docs = _boundaries(position_ids)
    return CPInputs(cp.shard(input_ids), cp.shard(position_ids), cp.shard(shifted), group, attn,
                    None if docs is None else tuple(docs[0]), None if docs is None else tuple(docs[1]))


def cp_loss(logits: torch.Tensor, shift_labels: torch.Tensor, group=None, ignore_index: int = -100):
    """(b, S/N, vocab) logits and this rank's (b, S/N) shifted labels -> (loss to back-propagate
    on this rank: its summed cross-entropy over the global token count; the global mean loss,
    detached, the same on every rank). Summing every rank's gradients gives the gradient of the
    global mean."""
    local = F.cross_entropy(logits.flatten(0, 1).float(), shift_labels.flatten(), reduction="sum",
                            ignore_index=ignore_index)
    if group is None and dist.is_initialized():
        group = dist.group.WORLD
    return mean_over_group(local, shift_labels, group, ignore_index)


def mean_over_group(local_sum: torch.Tensor, labels: torch.Tensor, group, ignore_index: int = -100):
    """This rank's summed loss ``local_sum`` (float scalar) over its ``labels`` -> (local_sum /
    the labelled tokens of every rank of ``group``, the global mean detached); ``group`` None:
    this process alone. One all-reduce of two float64 numbers."""
    counts = torch.stack([(labels != ignore_index).sum().double(), local_sum.detach().double()])
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    total = counts[0].clamp(min=1)
    return local_sum / total.to(local_sum.dtype), (counts[1] / total).float()


def _refuse(feature: str, name: str) -> None:
    raise NotImplementedError(f"attn_implementation={name!r}: {feature} is not supported by ringX "
                              "attention (it would compute a different model); use the model's own attention")


def attention(name: str, default_group, module, query, key, value, attention_mask, dropout: float = 0.0,
              scaling: float | None = None, sliding_window: int | None = None, softcap=None,
              ringx: CPInputs | None = None, **kwargs):
    """The AttentionInterface function registered as ``name``: query (b, h, S/N, d), key/value
    (b, hk, S/N, d) of this rank -> (out (b, S/N, h, d), None)."""
    if softcap is not None:
        _refuse("attention logit softcapping", name)
    if kwargs.get("position_bias") is not None or kwargs.get("alibi") is not None \
            or getattr(getattr(module, "config", None), "alibi", False):
        _refuse("ALiBi / position biases", name)
    if dropout and module.training:
        _refuse(f"attention dropout ({dropout}) in training", name)
    if attention_mask is not None:
        _refuse("an attention mask (custom 4-D masks, padding); pack sequences with position_ids "
                "restarting at 0 instead", name)
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        _refuse("non-causal attention", name)
    group = ringx.group if ringx is not None else default_group
    if ringx is not None and ringx.attn != name:
        raise ValueError(f"inputs were sharded for {ringx.attn} but the model runs {name}: their layouts differ")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))           # (b, s, h, d)
    window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
    from . import ATTN_FUNCS, VARLEN_FUNCS
    if ringx is not None and ringx.cu_seqlens is not None:
        fn = VARLEN_FUNCS[name]
        out = torch.stack([fn(q[i], k[i], v[i], ringx.cu_seqlens[i].to(q.device), ringx.max_seqlen[i],
                              softmax_scale=scaling, causal=True, window_size=window, group=group)
                           for i in range(q.shape[0])])
    else:
        out = ATTN_FUNCS[name](q, k, v, softmax_scale=scaling, causal=True, window_size=window, group=group)
    return out.contiguous(), None


def _no_mask(*args, **kwargs):
    """Mask function for the ringX names: the attention knows its mask (causal, documents,
    window), so transformers builds none."""
    return None


def register(group=None) -> None:
    """Register "ringX1".."ringX4" in transformers' AttentionInterface (and a mask function that
    builds no mask), bound to ``group`` (default: the world) unless the inputs carry their own
    (``shard_inputs(..., group=)``)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    for name in NAMES:
        AttentionInterface.register(name, functools.partial(attention, name, group))
        AttentionMaskInterface.register(name, _no_mask)
