"""Typed configuration of the climate ViT and its named presets (YAML files in app/vit/configs/).

A preset may name a ``base`` preset whose values it overrides. Precedence: command-line flags >
preset file (and its bases) > the dataclass defaults below.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

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
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_preset(name: str, **overrides) -> ViTConfig:
    """ViTConfig from configs/<name>.yaml (after its ``base`` chain), then non-None ``overrides``."""
    import yaml
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"no preset {name!r}; available: {', '.join(presets())}")
    data = yaml.safe_load(path.read_text()) or {}
    cfg = load_preset(data["base"]) if data.get("base") else ViTConfig()
    model = dict(data.get("model", {}))
    known = {f.name for f in fields(ViTConfig)}
    unknown = set(model) - known
    if unknown:
        raise ValueError(f"{path}: unknown fields {sorted(unknown)}; valid: {sorted(known)}")
    cfg = replace(cfg, **model)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def to_dict(cfg: ViTConfig) -> dict:
    return asdict(cfg)
