"""Typed model configuration and named presets (YAML files in app/gpt/configs/).

Precedence: command-line flags > preset file > the dataclass defaults below.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from app.common.presets import load_yaml_preset, preset_names

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class ModelConfig:
    """Llama3 architecture hyper-parameters."""

    dim: int = 4096               # model width
    n_layers: int = 32            # transformer blocks
    n_heads: int = 32             # query heads
    n_kv_heads: int = 8           # key/value heads (GQA); n_heads % n_kv_heads == 0
    vocab_size: int = 128256      # embedding rows (untied from the output head)
    ffn_dim: int = 14336          # SwiGLU hidden width
    norm_eps: float = 1e-5        # RMSNorm epsilon
    rope_theta: float = 500000.0  # RoPE base
    seq_len: int = 8192           # training sequence length (global, before context parallelism)
    rope_scaling: str = "none"    # "none" or "llama3" (Llama 3.1 long-context frequency scaling)
    rope_factor: float = 8.0              # llama3 scaling: low frequencies divided by this
    rope_low_freq_factor: float = 1.0     # llama3 scaling: wavelengths > original / low are scaled
    rope_high_freq_factor: float = 4.0    # llama3 scaling: wavelengths < original / high are kept
    rope_original_max_pos: int = 8192     # llama3 scaling: the pre-training context length

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.rope_scaling not in ("none", "llama3"):
            raise ValueError(f"rope_scaling {self.rope_scaling!r}: expected 'none' or 'llama3'")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def presets() -> list[str]:
    return preset_names(CONFIG_DIR)


def load_preset(name: str, **overrides) -> ModelConfig:
    """ModelConfig from configs/<name>.yaml (after its ``base`` chain), then non-None ``overrides``."""
    return load_yaml_preset(CONFIG_DIR, ModelConfig, name, **overrides)


def to_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)
