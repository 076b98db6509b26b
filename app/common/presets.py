"""YAML presets over a typed, frozen dataclass, for both apps.

A preset file ``<dir>/<name>.yaml`` (names may have folders: ``xforge/llama3-8b-1m``) holds a
``model:`` mapping of dataclass fields and may name a ``base`` preset it overrides. Precedence:
keyword overrides (None means "not given") > the preset file > its base chain > the dataclass
defaults. A run preset also holds a ``run:`` mapping of the training script's flags (parallel
layout, attention, checkpointing, chunking...), which become that script's defaults: flags given
on the command line still win. ``--override K=V,...`` sets model fields from the command line
(a run preset's parallel and memory settings at a debug size, for example).
"""
from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path


def preset_names(config_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(config_dir).with_suffix("")) for p in Path(config_dir).rglob("*.yaml"))


def _read(config_dir: Path, name: str) -> tuple[Path, dict]:
    import yaml
    path = Path(config_dir) / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"no preset {name!r}; available: {', '.join(preset_names(config_dir))}")
    return path, yaml.safe_load(path.read_text()) or {}


def run_settings(config_dir: Path, name: str) -> dict:
    """The ``run:`` flags of preset ``name`` over those of its base chain (flag name -> value)."""
    _, data = _read(config_dir, name)
    settings = run_settings(config_dir, data["base"]) if data.get("base") else {}
    settings.update(data.get("run") or {})
    return settings


def parse_overrides(text: str | None, cls) -> dict:
    """``"dim=64,n_layers=2"`` -> {"dim": 64, "n_layers": 2}, each value converted to the type of
    the dataclass field it sets; unknown fields raise ValueError naming the valid ones."""
    if not text:
        return {}
    types = {f.name: f.type for f in fields(cls)}
    out = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in types:
            raise ValueError(f"--override {item!r}: expected FIELD=VALUE with FIELD one of {sorted(types)}")
        kind = types[key] if isinstance(types[key], str) else types[key].__name__
        out[key] = {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes")}.get(
            kind, str)(value)
    return out


def apply_run_settings(parser, config_dir: Path, argv=None, config_flag: str = "--config",
                       default_config: str | None = None) -> dict:
    """Make the ``run:`` flags of the preset named on the command line ``parser``'s defaults, so
    that explicit flags still override them. Returns the settings applied."""
    import argparse
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument(config_flag, default=default_config)
    known, _ = pre.parse_known_args(argv)
    name = getattr(known, config_flag.lstrip("-").replace("-", "_"))
    if not name:
        return {}
    try:
        settings = run_settings(config_dir, name)
    except ValueError:
        return {}                                       # the script reports the unknown preset
    dests = {a.dest for a in parser._actions}
    unknown = sorted(set(settings) - dests)
    if unknown:
        raise ValueError(f"preset {name!r}: unknown run settings {unknown}; valid: {sorted(dests - {'help'})}")
    parser.set_defaults(**settings)
    return settings


def load_yaml_preset(config_dir: Path, cls, name: str, **overrides):
    """An instance of ``cls`` from ``config_dir/<name>.yaml`` (after its ``base`` chain), then
    the non-None ``overrides``. Unknown names and fields raise ValueError naming the valid ones."""
    path, data = _read(config_dir, name)
    cfg = load_yaml_preset(config_dir, cls, data["base"]) if data.get("base") else cls()
    model = dict(data.get("model", {}))
    known = {f.name for f in fields(cls)}
    unknown = set(model) - known
    if unknown:
        raise ValueError(f"{path}: unknown model fields {sorted(unknown)}; valid: {sorted(known)}")
    cfg = replace(cfg, **model)
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
