"""Atomic, resumable checkpoints with torch.distributed.checkpoint, for both apps.

Layout under OUT/checkpoints/::

    step_00000010/            complete: renamed from step_00000010.tmp/ only after every rank
        tp00/.metadata, tp00/__*.distcp   wrote and rank 0 wrote manifest.json (file names and
        tp01/...                          sizes); one DCP checkpoint per tensor-parallel rank,
                                          written by that rank's dp x cp group
        rank00000.pt ...      per-rank state: scheduler, data position, random generators
        manifest.json
    step_00000020.tmp/        incomplete (a crash mid-write): ignored

Parameter and optimizer-state names are stored without wrapper levels (activation checkpointing,
tensor-parallel wrappers), so a run may resume with a different --ac mode; FSDP shards are
resharded by DCP, but the per-rank state needs the same world size and tp degree.

``latest`` walks complete checkpoints newest first and skips (and reports) any whose manifest is
missing or whose files do not match it, so a partial or corrupted checkpoint falls back to the
previous one. Rank 0 decides and broadcasts the choice, so every rank loads the same one.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .weights import canonical_name


MANIFEST = "manifest.json"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _renamed(model_sd: dict, optim_sd: dict, fn) -> tuple[dict, dict]:
    """State dicts with every parameter name passed through ``fn``."""
    optim = dict(optim_sd)
    if "state" in optim:
        optim["state"] = {fn(k): v for k, v in optim["state"].items()}
    if "param_groups" in optim:
        optim["param_groups"] = [{**g, "params": [fn(n) for n in g["params"]]} for g in optim["param_groups"]]
    return {fn(k): v for k, v in model_sd.items()}, optim


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


@dataclass(frozen=True)
class EngineFiles:
    """An engine that writes and reads model and optimizer in its own files, instead of DCP:
    ``write(directory)`` / ``read(directory)``; ``fmt`` names the format in the manifest."""
    fmt: str
    write: Callable[[Path], object]
    read: Callable[[Path], object]


def _format(engine_files: EngineFiles | None) -> str:
    return engine_files.fmt if engine_files is not None else "dcp"


def save(root: Path, step: int, model, optimizer, local_state: dict, keep: int = 2,
         tp_rank: int = 0, tp: int = 1, group=None, engine_files: EngineFiles | None = None) -> Path:
    """Write checkpoint ``step`` (a collective over all ranks). ``local_state`` is this rank's
    own picklable state; ``group`` the ranks holding the same tensor-parallel slice (dp x cp)."""
    final = Path(root) / f"step_{step:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if engine_files is not None:
        engine_files.write(tmp)
    else:
        model_sd, optim_sd = _renamed(*get_state_dict(model, optimizer), canonical_name)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / f"tp{tp_rank:02d}"),
                 process_group=group)
    torch.save(local_state, tmp / f"rank{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        with open(tmp / MANIFEST, "w") as f:
            json.dump({"step": step, "world_size": _world(), "tp": tp, "format": _format(engine_files), "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        for old in sorted(p for p in Path(root).glob("step_*") if p.suffix != ".tmp")[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _problem(path: Path) -> str | None:
    manifest = path / MANIFEST
    if not manifest.exists():
        return "no manifest.json (incomplete write)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest: {exc}"
    for name, size in files.items():
        f = path / name
        if not f.exists():
            return f"missing {name}"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, manifest says {size}"
    return None


def latest(root: Path, log=print) -> Path | None:
    """The newest complete checkpoint under ``root`` (same answer on every rank), or None."""
    choice = None
    if _rank() == 0:
        for path in sorted((p for p in Path(root).glob("step_*") if p.suffix != ".tmp"), reverse=True):
            problem = _problem(path)
            if problem is None:
                choice = str(path)
                break
            log(f"skipping checkpoint {path}: {problem}")
    if dist.is_initialized():
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    return Path(choice) if choice else None


def load(path: Path, model, optimizer, tp_rank: int = 0, tp: int = 1, group=None,
         engine_files: EngineFiles | None = None) -> dict:
    """Load model and optimizer in place (a collective); returns this rank's local state."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    if (manifest["world_size"], manifest.get("tp", 1)) != (_world(), tp):
        raise ValueError(f"{path} was written by {manifest['world_size']} ranks with tensor parallel "
                         f"{manifest.get('tp', 1)}; this run has {_world()} ranks and {tp}: resume with the same layout")
    if manifest.get("format", "dcp") != _format(engine_files):
        raise ValueError(f"{path} is a {manifest.get('format', 'dcp')} checkpoint; this run writes "
                         f"{_format(engine_files)}: resume with the engine that wrote it")
    if engine_files is not None:
        engine_files.read(path)
        return torch.load(Path(path) / f"rank{_rank():05d}.pt", weights_only=False)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    wrapped = {canonical_name(k): k for k in model_sd}
    model_sd, optim_sd = _renamed(model_sd, optim_sd, canonical_name)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(path) / f"tp{tp_rank:02d}"), process_group=group)
    model_sd, optim_sd = _renamed(state["model"], state["optim"], lambda n: wrapped.get(n, n))
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return torch.load(Path(path) / f"rank{_rank():05d}.pt", weights_only=False)


def load_model(path: Path, model, tp_rank: int = 0, group=None) -> int:
    """Load only the model weights of checkpoint ``path`` (a collective; any world size, since
    DCP reshards); returns the checkpoint's step."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    model_sd = get_model_state_dict(model)
    wrapped = {canonical_name(k): k for k in model_sd}
    state = {"model": {canonical_name(k): v for k, v in model_sd.items()}}
    dcp.load(state, checkpoint_id=str(Path(path) / f"tp{tp_rank:02d}"), process_group=group)
    set_model_state_dict(model, {wrapped.get(k, k): v for k, v in state["model"].items()})
    return json.loads((Path(path) / MANIFEST).read_text())["step"]
