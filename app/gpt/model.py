"""Llama3: RMSNorm, RoPE, grouped-query attention, SwiGLU, untied embeddings.

The model knows nothing about parallelism. Attention is an injected function with the ringX
contract, ``attn_fn(q, k, v) -> out`` on (batch, seq, heads, head_dim) tensors (causal, whatever
its sequence layout), and RoPE angles come from the tokens' *global* positions, which the caller
passes in, so a shard of a sequence in any layout computes exactly what the whole sequence would.
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from app.common.weights import copy_parameters

from .config import ModelConfig
from .kernels import Kernels

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Single-device causal attention on (b, s, h, d) tensors (the whole sequence is local)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True, enable_gqa=True).transpose(1, 2)


class RMSNorm(nn.Module):
    """(..., dim) -> (..., dim) through ``kernels.rms_norm`` (float32 statistics, Llama's casting)."""

    def __init__(self, dim: int, eps: float, kernels: Kernels = Kernels()):
        super().__init__()
        self.eps, self.kernel = eps, kernels.rms_norm
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: ModelConfig | None = None,
                  device=None) -> torch.Tensor:
    """(head_dim // 2,) float64 rotation frequencies; with ``scaling.rope_scaling == "llama3"``
    the Llama 3.1 rule: wavelengths longer than original_max_pos / low_freq_factor are divided by
    ``rope_factor``, shorter than original_max_pos / high_freq_factor kept, smooth in between."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim)
    if scaling is None or scaling.rope_scaling == "none":
        return inv_freq
    factor, low, high = scaling.rope_factor, scaling.rope_low_freq_factor, scaling.rope_high_freq_factor
    old = scaling.rope_original_max_pos
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > old / low, inv_freq / factor, torch.where(wavelen < old / high, inv_freq, scaled))


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                scaling: ModelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (s,) or (b, s) int64 -> cos, sin (..., head_dim // 2) float32."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device)
    ang = positions.double()[..., None] * inv_freq
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, s, h, d): rotate pairs (x[2i], x[2i+1]) by the angle of each position (Meta layout);
    cos/sin (s, d/2), or (b, s, d/2) for positions per sequence (packed documents)."""
    xf = x.float().unflatten(-1, (-1, 2))                         # (b, s, h, d/2, 2)
    c, s_ = (cos[None, :, None, :], sin[None, :, None, :]) if cos.dim() == 2 else (
        cos[:, :, None, :], sin[:, :, None, :])
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * c - x1 * s_, x0 * s_ + x1 * c], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def project(self, x, cos, sin):
        """x (B, S, dim) -> q (B, S, nh, hd), k, v (B, S, nkv, hd), q and k rotated."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, attn_fn: AttnFn):
        b, s, _ = x.shape                                           # x: (B, S_local, dim)
        out = attn_fn(*self.project(x, cos, sin))                   # (B, S, nh, hd)
        return self.wo(out.reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU. With ``chunk`` > 0 the sequence goes through in chunks of ``chunk`` tokens, each
    recomputed in backward, so the (B, S, ffn_dim) hidden activations never exist whole
    (blockwise feed-forward); the result is the same."""

    def __init__(self, cfg: ModelConfig, chunk: int = 0, kernels: Kernels = Kernels()):
        super().__init__()
        self.chunk, self.silu_mul = chunk, kernels.silu_mul
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)

    def _mlp(self, x):
        return self.w2(self.silu_mul(self.w1(x), self.w3(x)))

    def forward(self, x):                                          # x: (B, S, dim)
        if not self.chunk or x.shape[1] <= self.chunk:
            return self._mlp(x)
        parts = [checkpoint(self._mlp, part, use_reentrant=False) if torch.is_grad_enabled() else self._mlp(part)
                 for part in x.split(self.chunk, dim=1)]
        return torch.cat(parts, dim=1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp_chunk: int = 0, kernels: Kernels = Kernels()):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, kernels)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, kernels)
        self.feed_forward = FeedForward(cfg, mlp_chunk, kernels)

    def forward(self, x, cos, sin, attn_fn: AttnFn):
        x = x + self.attention(self.attention_norm(x), cos, sin, attn_fn)
        return x + self.feed_forward(self.ffn_norm(x))


def init_std(name: str, n_layers: int) -> float | None:
    """Initial std of a parameter by name (None: a norm weight, set to ones)."""
    if name.endswith("norm.weight"):
        return None
    return 0.02 / (2 * n_layers) ** 0.5 if name.endswith(("wo.weight", "w2.weight")) else 0.02


class Llama(nn.Module):
    """tokens (B, S_local) int64 + global positions (S_local,) (or (B, S_local): packed documents,
    each restarting at 0) -> logits (B, S_local, vocab), or
    with ``labels`` (B, S_local) the summed cross-entropy of the local tokens (float32 scalar).

    Memory options (results unchanged): ``mlp_chunk`` tokens per feed-forward chunk, ``loss_chunk``
    tokens per logits chunk of the torch loss (0: whole). ``kernels``: the implementations of
    RMSNorm, SwiGLU and the linear cross-entropy (app/gpt/kernels.py; plain PyTorch by default)."""

    def __init__(self, cfg: ModelConfig, mlp_chunk: int = 0, loss_chunk: int = 0,
                 kernels: Kernels = Kernels()):
        super().__init__()
        self.cfg, self.loss_chunk, self.kernels = cfg, loss_chunk, kernels
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, mlp_chunk, kernels) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, kernels)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    @staticmethod
    def initial_tensors(cfg: ModelConfig, generator: torch.Generator | None = None
                        ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full float32 tensor) for every parameter, in parameter order, made one at a
        time on the generator's device: Normal(0, 0.02) weights, output projections scaled by
        1/sqrt(2 * n_layers), norm weights one."""
        with torch.device("meta"):
            shapes = [(n, p.shape) for n, p in Llama(cfg).named_parameters()]
        device = generator.device if generator is not None else None
        for name, shape in shapes:
            std = init_std(name, cfg.n_layers)
            yield name, (torch.ones(shape, device=device) if std is None
                         else torch.randn(shape, generator=generator, device=device) * std)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Set every parameter from ``initial_tensors`` (an unsharded model)."""
        copy_parameters(self, self.initial_tensors(self.cfg, generator), "initial weights")

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, attn_fn: AttnFn = sdpa_causal):
        """Final normalised hidden states (B, S_local, dim)."""
        cos, sin = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_fn)
        return self.norm(x)

    def forward(self, tokens, positions, attn_fn: AttnFn = sdpa_causal, labels=None):
        h = self.hidden(tokens, positions, attn_fn)
        if labels is None:
            return self.output(h)
        return self.kernels.linear_cross_entropy(h.flatten(0, 1), self.output.weight, labels.flatten(),
                                                 self.loss_chunk)
