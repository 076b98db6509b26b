"""Typed configuration of the climate ViT and its named presets (YAML files in app/vit/configs/).

A preset may name a ``base`` preset whose values it overrides. Precedence: command-line flags >
preset file (and its bases) > the dataclass defaults below.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from app.common.presets import load_yaml_preset, preset_names

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class ViTConfig:
    """Architecture, grid and attention of the next-step forecaster."""

    channels: int = 20            # input and output fields
    lat: int = 360                # grid rows (latitude)
    lon: int = 720                # grid columns (longitude)
    patch: int = 2                # patch size p: (lat / p) * (lon / p) tokens
    embed: int = 1024             # token width
    depth: int = 12               # transformer blocks
    heads: int = 8                # attention heads (embed % heads == 0)
    mlp_ratio: float = 4.0        # MLP hidden width / embed
    attn: str = "ringX1"          # ringX1..ringX4 (non-causal) or allgather (the baseline)

    def __post_init__(self):
        if self.lat % self.patch or self.lon % self.patch:
            raise ValueError(f"patch {self.patch} does not divide the {self.lat} x {self.lon} grid")
        if self.embed % self.heads:
            raise ValueError(f"embed {self.embed} is not divisible by heads {self.heads}")

    @property
    def grid_tokens(self) -> tuple[int, int]:
        """(rows, columns) of patches."""
        return self.lat // self.patch, self.lon // self.patch

    @property
    def tokens(self) -> int:
        rows, cols = self.grid_tokens
        return rows * cols

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch * self.patch


def presets() -> list[str]:
    return preset_names(CONFIG_DIR)


def load_preset(name: str, **overrides) -> ViTConfig:
    """ViTConfig from configs/<name>.yaml (after its ``base`` chain), then non-None ``overrides``."""
    return load_yaml_preset(CONFIG_DIR, ViTConfig, name, **overrides)


def to_dict(cfg: ViTConfig) -> dict:
    return asdict(cfg)
