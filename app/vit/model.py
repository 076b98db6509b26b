"""Next-step forecaster: a ViT over p x p patches of a (channels, lat, lon) field.

The model knows nothing about parallelism. It takes the patches of any set of tokens with their
global token indices (which select the rows of the learned position embedding), and attention is
an injected function with the ringX contract, ``attn_fn(q, k, v) -> out`` on (batch, tokens,
heads, head_dim) tensors, bidirectional; so a shard of the tokens computes exactly what the whole
grid would.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from app.common.weights import copy_parameters
from ringX.baseline import sdpa_bshd as sdpa_full     # single-device, (b, s, h, d), bidirectional

from .config import ViTConfig

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.embed // cfg.heads
        self.wq = nn.Linear(cfg.embed, cfg.embed)
        self.wk = nn.Linear(cfg.embed, cfg.embed)
        self.wv = nn.Linear(cfg.embed, cfg.embed)
        self.wo = nn.Linear(cfg.embed, cfg.embed)

    def forward(self, x, attn_fn: AttnFn):
        b, s, _ = x.shape                                             # x: (B, S_local, embed)
        q = self.wq(x).view(b, s, -1, self.head_dim)                  # (B, S, heads, head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        return self.wo(attn_fn(q, k, v).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        hidden = int(cfg.embed * cfg.mlp_ratio)
        self.w1 = nn.Linear(cfg.embed, hidden)
        self.w2 = nn.Linear(hidden, cfg.embed)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(cfg.embed)
        self.attention = Attention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.embed)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_fn: AttnFn):
        x = x + self.attention(self.attention_norm(x), attn_fn)
        return x + self.mlp(self.mlp_norm(x))


class ClimateViT(nn.Module):
    """patches (B, S_local, channels * p * p) + global token indices (S_local,) -> predicted
    patches of the next step, same shape (the input plus a learned increment)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_dim, cfg.embed)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.tokens, cfg.embed))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed)
        self.head = nn.Linear(cfg.embed, cfg.patch_dim)

    @staticmethod
    def initial_tensors(cfg: ViTConfig, generator: torch.Generator | None = None
                        ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full float32 tensor) for every parameter in order: weights Normal(0, 0.02)
        (output projections and the head scaled by 1/sqrt(2 * depth)), biases 0, norms 1."""
        with torch.device("meta"):
            shapes = [(n, p.shape) for n, p in ClimateViT(cfg).named_parameters()]
        device = generator.device if generator is not None else None
        for name, shape in shapes:
            if name.endswith("bias"):
                yield name, torch.zeros(shape, device=device)
            elif "norm" in name:
                yield name, torch.ones(shape, device=device)
            else:
                std = 0.02 / (2 * cfg.depth) ** 0.5 if name.endswith(("wo.weight", "w2.weight", "head.weight")) else 0.02
                yield name, torch.randn(shape, generator=generator, device=device) * std

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Set every parameter from ``initial_tensors`` (an unsharded model)."""
        copy_parameters(self, self.initial_tensors(self.cfg, generator), "initial weights")

    def forward(self, patches: torch.Tensor, positions: torch.Tensor, attn_fn: AttnFn = sdpa_full):
        x = self.patch_embed(patches) + self.pos_embed[positions]
        for block in self.blocks:
            x = block(x, attn_fn)
        return patches + self.head(self.norm(x))
