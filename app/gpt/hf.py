"""Load and export Hugging Face Llama checkpoints (config.json + *.safetensors, local files).

Names map one to one (q_proj -> wq, gate_proj -> w1, up_proj -> w3, down_proj -> w2, ...). The
only real conversion is RoPE's layout: this model rotates interleaved pairs (x[2i], x[2i+1]) as
Meta's reference does, while Hugging Face rotates halves (x[i], x[i + d/2]), so q_proj and k_proj
rows are permuted within each head on the way in and back on the way out. Rope scaling: the
default and Llama 3.1's "llama3" type are supported; other types raise NotImplementedError.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Iterator

import torch

from app.common.weights import copy_parameters

from .config import ModelConfig

_LAYER_MAP = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def config_from_hf(path: str | Path, base: ModelConfig | None = None) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json (seq_len kept from ``base``)."""
    hf = json.loads((Path(path) / "config.json").read_text())
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in ("default", "llama3"):
        raise NotImplementedError(f"{path}: rope scaling type {rope_type!r} is not implemented "
                                  "(supported: default, llama3)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {}
    if rope_type == "llama3":
        scaling = dict(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                       rope_low_freq_factor=float(rope["low_freq_factor"]),
                       rope_high_freq_factor=float(rope["high_freq_factor"]),
                       rope_original_max_pos=int(rope["original_max_position_embeddings"]))
    return replace(base or ModelConfig(), dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                   n_heads=hf["num_attention_heads"],
                   n_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
                   vocab_size=hf["vocab_size"], ffn_dim=hf["intermediate_size"],
                   norm_eps=hf.get("rms_norm_eps", 1e-5), rope_theta=float(theta), **scaling)


def _hf_to_meta_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of q_proj/k_proj (heads * head_dim, dim): halves layout -> interleaved pairs."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def _meta_to_hf_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _name_to_meta(name: str) -> str | None:
    if name == "model.embed_tokens.weight":
        return "tok_embeddings.weight"
    if name == "model.norm.weight":
        return "norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    if name.startswith("model.layers."):
        _, _, idx, rest = name.split(".", 3)
        module, _, leaf = rest.rpartition(".")
        if module in _LAYER_MAP:
            return f"layers.{idx}.{_LAYER_MAP[module]}.{leaf}"
    return None


def hf_tensors(path: str | Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(this model's parameter name, full tensor) for every weight of a Hugging Face Llama
    checkpoint, converted to this model's layout, one file at a time; a tied checkpoint (no
    lm_head) yields its embedding again as output.weight."""
    from safetensors.torch import load_file
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors files")
    embedding, seen_output = None, False
    for f in files:
        for name, tensor in load_file(str(f)).items():
            target = _name_to_meta(name)
            if target is None:
                if "rotary_emb" in name:
                    continue
                raise ValueError(f"{f.name}: unexpected tensor {name}")
            if target.endswith("attention.wq.weight"):
                tensor = _hf_to_meta_rows(tensor, cfg.n_heads)
            elif target.endswith("attention.wk.weight"):
                tensor = _hf_to_meta_rows(tensor, cfg.n_kv_heads)
            embedding = tensor if target == "tok_embeddings.weight" else embedding
            seen_output = seen_output or target == "output.weight"
            yield target, tensor
    if not seen_output and embedding is not None:
        yield "output.weight", embedding


def load_hf(model, path: str | Path) -> None:
    """Copy a Hugging Face Llama checkpoint's weights into an unsharded ``model``."""
    copy_parameters(model, hf_tensors(path, model.cfg), str(path))


def export_hf(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], path: str | Path) -> None:
    """Write (plain-model name, full tensor) pairs, e.g. ``model.named_parameters()`` of an
    unsharded model, as a Hugging Face Llama checkpoint (config.json + model.safetensors)."""
    from safetensors.torch import save_file
    inverse = {v: k for k, v in _LAYER_MAP.items()}
    out = {}
    for name, p in tensors:
        t = p.detach().cpu().contiguous()
        if name == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "norm.weight":
            out["model.norm.weight"] = t
        elif name == "output.weight":
            out["lm_head.weight"] = t
        else:
            _, idx, rest = name.split(".", 2)
            module, _, leaf = rest.rpartition(".")
            if module.endswith("attention.wq"):
                t = _meta_to_hf_rows(t, cfg.n_heads).contiguous()
            elif module.endswith("attention.wk"):
                t = _meta_to_hf_rows(t, cfg.n_kv_heads).contiguous()
            out[f"model.layers.{idx}.{inverse[module]}.{leaf}"] = t
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf_config(cfg), indent=1))


def hf_config(cfg: ModelConfig) -> dict:
    """The Hugging Face config.json of a LlamaForCausalLM with ``cfg``'s shapes."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
              "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
              "num_key_value_heads": cfg.n_kv_heads, "vocab_size": cfg.vocab_size,
              "intermediate_size": cfg.ffn_dim, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
              "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
              "mlp_bias": False, "max_position_embeddings": cfg.seq_len, "torch_dtype": "float32"}
    if cfg.rope_scaling == "llama3":
        config["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_factor,
                                  "low_freq_factor": cfg.rope_low_freq_factor,
                                  "high_freq_factor": cfg.rope_high_freq_factor,
                                  "original_max_position_embeddings": cfg.rope_original_max_pos}
    return config
