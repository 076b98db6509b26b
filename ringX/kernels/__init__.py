"""Local attention backends and the registry that picks one.

``select_backend`` walks ``BACKENDS`` in order and returns the first whose
``not_supported_reasons`` is empty; if none fits it raises an error listing every backend's
reasons. A backend can be forced by name with the ``backend=`` argument of the ringX functions or
the ``RINGX_BACKEND`` environment variable (read at each call, never cached).

Order: FlashAttention-4 (the flash-attn-4 package, when installed: fastest on Hopper), cuDNN
(fastest on Hopper without it), the flash-attn package (ROCm / other GPUs), PyTorch's flash,
PyTorch's memory-efficient kernel (also float32 on GPU), the CPU flash kernel, and the float64
math reference.
"""
from __future__ import annotations

import os

import torch

from .base import Backend, KernelInputs
from .cpu_flash import CpuFlashBackend
from .cudnn import CudnnBackend
from .efficient import EfficientBackend
from .fa4 import FlashAttn4Backend
from .flash import AtenFlashBackend
from .flash_attn_pkg import FlashAttnPackageBackend
from .math import MathBackend

BACKENDS: tuple[Backend, ...] = (
    FlashAttn4Backend(), CudnnBackend(), FlashAttnPackageBackend(), AtenFlashBackend(), EfficientBackend(),
    CpuFlashBackend(), MathBackend(),
)
ENV_VAR = "RINGX_BACKEND"


def backend_names() -> list[str]:
    return [b.name for b in BACKENDS]


def get_backend(name: str) -> Backend:
    for b in BACKENDS:
        if b.name == name:
            return b
    raise ValueError(f"unknown ringX kernel backend {name!r}; valid names: {', '.join(backend_names())}")


def support_table(inp: KernelInputs) -> dict[str, list[str]]:
    """Every backend's reasons for refusing ``inp`` (empty list = supported)."""
    return {b.name: b.not_supported_reasons(inp) for b in BACKENDS}


def select_backend(q: torch.Tensor, k: torch.Tensor, dropout_p: float = 0.0,
                   name: str | None = None) -> Backend:
    """The backend for q (b, s, h, d) and k (b, s, kv_heads, d): ``name``, else $RINGX_BACKEND,
    else the first in ``BACKENDS`` that supports the inputs."""
    inp = KernelInputs.from_tensors(q, k, dropout_p)
    forced = name or os.environ.get(ENV_VAR) or None
    if forced:
        backend = get_backend(forced)
        reasons = backend.not_supported_reasons(inp)
        if reasons:
            raise NotImplementedError(
                f"ringX kernel backend {forced!r} (forced by "
                f"{'argument' if name else ENV_VAR}) cannot take these inputs: {'; '.join(reasons)}")
        return backend
    for b in BACKENDS:                 # the first that takes the inputs; the others are not asked
        if not b.not_supported_reasons(inp):
            return b
    lines = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in support_table(inp).items())
    raise NotImplementedError(f"no ringX kernel backend supports these inputs:\n{lines}")


def explain_choice(q: torch.Tensor, k: torch.Tensor, name: str | None = None) -> str:
    """One line for logs: the backend ``select_backend`` takes for q/k and, before it, each
    backend that would run on this device but whose package is not installed (how to get it)."""
    chosen = select_backend(q, k, name=name)
    if name or os.environ.get(ENV_VAR):
        return f"{chosen.name} (forced)"
    inp = KernelInputs.from_tensors(q, k)
    missing = [f"{b.name}: {r}" for b in BACKENDS[:BACKENDS.index(chosen)]
               for r in b.not_supported_reasons(inp) if "not installed" in r]
    return chosen.name + (f" ({'; '.join(missing)})" if missing else "")


def select_band_backend(q: torch.Tensor, k: torch.Tensor, kernel: Backend) -> Backend:
    """The backend for window and varlen calls of masked blocks: ``kernel`` itself when it takes
    windows, else the first in ``BACKENDS`` that does and supports the inputs (on NVIDIA GPUs
    with cuDNN: PyTorch's flash kernel; the float64 math backend at worst)."""
    if kernel.band:
        return kernel
    inp = KernelInputs.from_tensors(q, k)
    for b in BACKENDS:
        if b.band and not b.not_supported_reasons(inp):
            return b
    lines = "\n".join(f"  {b.name}: {'; '.join(b.not_supported_reasons(inp)) or 'takes no windows'}"
                      for b in BACKENDS)
    raise NotImplementedError(f"no ringX kernel backend takes windows or documents for these inputs:\n{lines}")


__all__ = ["Backend", "KernelInputs", "BACKENDS", "ENV_VAR", "backend_names", "explain_choice", "get_backend",
           "select_backend", "select_band_backend", "support_table"]
