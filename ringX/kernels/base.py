"""What every local attention backend provides, and small helpers they share.

A backend computes attention of one block on one device. Tensors are in the public layout:

    q:    (batch, seqlen_q, heads, headdim)
    k, v: (batch, seqlen_k, kv_heads, headdim), heads % kv_heads == 0
    out:  (batch, seqlen_q, heads, headdim), dtype of q
    lse:  (batch, heads, seqlen_q) float32 (float64 for float64 inputs), natural log

``causal=True`` is only ever asked for square blocks (seqlen_q == seqlen_k), so the top-left and
bottom-right causal alignments of different kernels agree.

``backward`` receives the *merged* out and lse of the whole sequence, not this block's: with
P = exp(S - lse) and delta = rowsum(dout * out), the gradients it returns for this block are then
exactly this block's contribution to the global gradients.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelInputs:
    """The properties of a call that decide which backends can take it."""

    device_type: str
    is_hip: bool
    capability: tuple[int, int] | None
    dtype: torch.dtype
    headdim: int
    heads: int
    kv_heads: int
    dropout_p: float
    rows: int = 0          # query rows of a call (q.shape[1]); 0: not known
    keys: int = 0          # keys of a call (k.shape[1]); 0: not known

    @classmethod
    def from_tensors(cls, q: torch.Tensor, k: torch.Tensor, dropout_p: float = 0.0) -> "KernelInputs":
        cap = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else None
        return cls(device_type=q.device.type, is_hip=torch.version.hip is not None,
                   capability=cap, dtype=q.dtype, headdim=q.shape[-1], heads=q.shape[2],
                   kv_heads=k.shape[2], dropout_p=float(dropout_p), rows=q.shape[1], keys=k.shape[1])


class Backend:
    """Base class: subclasses set ``name`` and implement the three methods.

    Masked blocks (ringX.plan) also need, where ``band`` is True, flash-attn's bottom-right window
    ``forward_band`` / ``backward_band`` (query a of sq sees keys b with
    a + (sk - sq) - left <= b <= a + (sk - sq) + right, -1 = unbounded; the planner only asks for
    calls where every row sees a key), and where ``varlen`` is True, ``forward_varlen`` /
    ``backward_varlen``: batch 1, the rows cut by ``cu`` (int32, on the device) into square
    pieces, each attending itself with the same window.
    """

    name = "base"
    band = False
    varlen = False

    def not_supported_reasons(self, inp: KernelInputs) -> list[str]:
        """Why this backend cannot take ``inp``; an empty list means it can."""
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Block attention -> (out (b, sq, h, d) dtype of q, lse (b, h, sq) float32)."""
        raise NotImplementedError

    def backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, causal: bool,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block gradients (dq, dk, dv) shaped like (q, k, v), given the merged out and lse."""
        raise NotImplementedError

    def takes_shape(self, rows: int, keys: int) -> bool:
        """Whether forward/backward take a block of this many query rows and keys (a masked
        block's call that a kernel refuses runs on the window kernel instead)."""
        return True

    def forward_band(self, q, k, v, left: int, right: int, scale: float):
        raise NotImplementedError(f"{self.name} takes no windows")

    def backward_band(self, dout, q, k, v, out, lse, left: int, right: int, scale: float):
        raise NotImplementedError(f"{self.name} takes no windows")

    def forward_varlen(self, q, k, v, cu: torch.Tensor, max_len: int, left: int, right: int, scale: float):
        raise NotImplementedError(f"{self.name} takes no cu_seqlens")

    def backward_varlen(self, dout, q, k, v, out, lse, cu: torch.Tensor, max_len: int, left: int,
                        right: int, scale: float):
        raise NotImplementedError(f"{self.name} takes no cu_seqlens")

    def __repr__(self) -> str:
        return f"<ringX kernel backend {self.name}>"


@functools.lru_cache(maxsize=None)
def optional_module(name: str):
    """The module ``name`` of an optional kernel package, or None when it does not import (not
    installed, or built for another CUDA / torch). Looked for once a process: a failed import
    searches the whole path again each time, and the registry asks every backend at every call."""
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def gpu_reasons(inp: KernelInputs, dtypes: tuple, max_headdim: int, min_capability: tuple | None = None,
                nvidia_only: bool = False) -> list[str]:
    """The checks the GPU kernels share: device (and vendor / compute capability), dtype, head dim
    (a multiple of 8, at most ``max_headdim``) and dropout (never replayable block by block)."""
    reasons = []
    if inp.device_type != "cuda" or (nvidia_only and inp.is_hip):
        reasons.append("needs an NVIDIA CUDA device" if nvidia_only else
                       f"needs a CUDA/ROCm device (inputs are on {inp.device_type})")
    elif min_capability and not inp.is_hip and (inp.capability is None or inp.capability < min_capability):
        reasons.append(f"needs compute capability >= {min_capability[0]}.{min_capability[1]} "
                       f"(device has {inp.capability})")
    if inp.dtype not in dtypes:
        reasons.append(f"dtype {inp.dtype} not in {dtypes}")
    if inp.headdim > max_headdim or inp.headdim % 8:
        reasons.append(f"head dim {inp.headdim} must be a multiple of 8 and <= {max_headdim}")
    if inp.dropout_p > 0:
        reasons.append("dropout masks cannot be replayed block by block")
    return reasons


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, s, kv_heads, d) -> (b, s, heads, d), each kv head repeated for its query group."""
    group = heads // x.shape[2]
    return x if group == 1 else x.repeat_interleave(group, dim=2)


def fold_kv_grad(dx: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(b, s, heads, d) gradient of an expanded k or v -> (b, s, kv_heads, d), summed per group."""
    b, s, h, d = dx.shape
    if h == kv_heads:
        return dx
    return dx.view(b, s, kv_heads, h // kv_heads, d).sum(dim=3)


def bhsd(x: torch.Tensor) -> torch.Tensor:
    """(b, s, h, d) -> (b, h, s, d) view (no copy; the kernels take these strides)."""
    return x.transpose(1, 2)


def bshd(x: torch.Tensor) -> torch.Tensor:
    """(b, h, s, d) -> (b, s, h, d) view."""
    return x.transpose(1, 2)


def dense_bshd(x: torch.Tensor) -> torch.Tensor:
    """Make the innermost two dims of a (b, s, h, d) tensor dense, as the CUDA kernels require."""
    return x if x.stride(-1) == 1 and x.stride(2) == x.shape[3] and x.stride(1) == x.shape[2] * x.shape[3] \
        else x.contiguous()


def band_mask(sq: int, sk: int, left: int, right: int, device) -> torch.Tensor:
    """(sq, sk) bool: key b visible to row a under flash-attn's bottom-right window (left, right),
    -1 = unbounded (without its clamps: the planner never relies on them)."""
    a = torch.arange(sq, device=device).unsqueeze(1) + (sk - sq)
    b = torch.arange(sk, device=device).unsqueeze(0)
    vis = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        vis &= b >= a - left
    if right >= 0:
        vis &= b <= a + right
    return vis


def varlen_mask(cu: list[int], left: int, right: int, device) -> torch.Tensor:
    """(T, T) bool of square pieces cu[i]..cu[i+1], each with the window (left, right)."""
    total = cu[-1]
    vis = torch.zeros(total, total, dtype=torch.bool, device=device)
    for a, b in zip(cu[:-1], cu[1:]):
        vis[a:b, a:b] = band_mask(b - a, b - a, left, right, device)
    return vis
