"""YAML presets over a typed, frozen dataclass, for both apps.

A preset file ``<dir>/<name>.yaml`` holds a ``model:`` mapping of dataclass fields and may name a
``base`` preset it overrides. Precedence: keyword overrides (None means "not given") > the preset
file > its base chain > the dataclass defaults.
"""
from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path


def preset_names(config_dir: Path) -> list[str]:
    return sorted(p.stem for p in Path(config_dir).glob("*.yaml"))


def load_yaml_preset(config_dir: Path, cls, name: str, **overrides):
    """An instance of ``cls`` from ``config_dir/<name>.yaml`` (after its ``base`` chain), then
    the non-None ``overrides``. Unknown names and fields raise ValueError naming the valid ones."""
    import yaml
    path = Path(config_dir) / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"no preset {name!r}; available: {', '.join(preset_names(config_dir))}")
    data = yaml.safe_load(path.read_text()) or {}
    cfg = load_yaml_preset(config_dir, cls, data["base"]) if data.get("base") else cls()
    model = dict(data.get("model", {}))
    known = {f.name for f in fields(cls)}
    unknown = set(model) - known
    if unknown:
        raise ValueError(f"{path}: unknown model fields {sorted(unknown)}; valid: {sorted(known)}")
    cfg = replace(cfg, **model)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
