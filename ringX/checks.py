"""Cross-rank input checks: one small all-gather proves that every rank calls with the same shapes,
dtype, device type and flags before any data collective is posted, so a mismatch raises a
ValueError on every rank (naming the ranks and fields) instead of hanging a collective.

A problem that only one rank can see (wrong number of dims, heads not divisible by kv heads, a
sequence the layout cannot split) is encoded in the same all-gather, so every rank raises, not
only the one with the bad input.

``RINGX_CHECK_INPUTS`` chooses how often: ``always`` (check every call; the default for CPU
tensors, where it costs microseconds) or ``once`` (check each new signature once per group; the
default on GPUs, where the check synchronises the host with the device). With ``once``, ranks that
first agree on a signature and later diverge are caught only by the process-group timeout.
"""
from __future__ import annotations

import os
import struct
import zlib

import torch

from .comm import GroupComm
from .peer import TRANSPORTS

FIELDS = ("algorithm", "q.ndim", "k.ndim", "v.ndim", "batch", "seqlen_local", "heads", "kv_heads",
          "headdim", "dtype", "device_type", "causal", "dropout_p", "softmax_scale",
          "window_size[0]", "window_size[1]", "alibi_slopes", "deterministic", "return_attn_probs",
          "needs_grad", "transport", "layout", "documents", "cu_seqlens digest")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
_DEVICES = ("cpu", "cuda", "xpu", "mps", "meta")
_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOCAL_PROBLEMS = {
    1: "q, k and v must be torch.Tensor",
    2: "q, k and v must be 4-D (batch, seqlen, heads, headdim)",
    3: "k and v must have the same shape",
    4: "q and k/v must agree in batch, seqlen and headdim",
    5: "heads must be divisible by kv_heads",
    6: "q, k and v must have the same dtype",
    7: "q, k and v must be on the same device",
    8: "q, k and v must be floating point",
    9: "the local sequence length cannot be split by the function's layout",
    10: "the local sequence length must be > 0",
    11: "cu_seqlens must be global document boundaries 0 = cu[0] < ... < cu[-1] = S",
    12: "window_size must be two ints",
}


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


def local_problem(q, k, v, layout: str) -> tuple[int, str]:
    """(code, message) of the first problem visible on this rank alone; (0, "") if none."""
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return 1, f"{LOCAL_PROBLEMS[1]}, got {[type(t).__name__ for t in (q, k, v)]}"
    if not q.dim() == k.dim() == v.dim() == 4:
        return 2, f"{LOCAL_PROBLEMS[2]}, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k.shape != v.shape:
        return 3, f"{LOCAL_PROBLEMS[3]}, got k {tuple(k.shape)}, v {tuple(v.shape)}"
    if (q.shape[0], q.shape[1], q.shape[3]) != (k.shape[0], k.shape[1], k.shape[3]):
        return 4, f"{LOCAL_PROBLEMS[4]}, got q {tuple(q.shape)}, k {tuple(k.shape)}"
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        return 5, f"{LOCAL_PROBLEMS[5]}, got heads={q.shape[2]}, kv_heads={k.shape[2]}"
    if not q.dtype == k.dtype == v.dtype:
        return 6, f"{LOCAL_PROBLEMS[6]}, got {q.dtype}, {k.dtype}, {v.dtype}"
    if not q.device == k.device == v.device:
        return 7, f"{LOCAL_PROBLEMS[7]}, got {q.device}, {k.device}, {v.device}"
    if q.dtype not in _FLOAT:
        return 8, f"{LOCAL_PROBLEMS[8]} ({', '.join(map(str, _FLOAT))}), got {q.dtype}"
    if q.shape[1] == 0:
        return 10, LOCAL_PROBLEMS[10]
    if layout == "zigzag" and q.shape[1] % 2:
        return 9, (f"the zigzag layout holds two equal chunks per rank, so the local sequence "
                   f"length must be even, got {q.shape[1]} (global length must be a multiple of "
                   "2 x group size)")
    return 0, ""


def documents_problem(cu, seqlen: int, max_seqlen=None) -> tuple[tuple[int, ...] | None, tuple[int, str]]:
    """(boundaries as host ints, (code, message)) of a varlen call's cu_seqlens for a packed
    sequence of ``seqlen`` tokens: a 1-D integer tensor (or sequence) from 0 to seqlen, strictly
    increasing; max_seqlen (if given) at least the longest document."""
    if cu is None:
        return None, (0, "")
    try:
        values = cu.tolist() if isinstance(cu, torch.Tensor) else list(cu)
        if isinstance(cu, torch.Tensor) and (cu.dim() != 1 or cu.dtype.is_floating_point):
            raise TypeError
        values = [int(x) for x in values]
    except (TypeError, ValueError):
        return None, (11, f"{LOCAL_PROBLEMS[11]}: cu_seqlens must be a 1-D integer tensor")
    if len(values) < 2 or values[0] != 0 or values[-1] != seqlen or any(
            b <= a for a, b in zip(values, values[1:])):
        shown = values if len(values) <= 8 else values[:4] + ["..."] + values[-3:]
        return None, (11, f"{LOCAL_PROBLEMS[11]} = {seqlen} (group size x local length), "
                          f"strictly increasing; got {shown}")
    longest = max(b - a for a, b in zip(values, values[1:]))
    if max_seqlen is not None and int(max_seqlen) < longest:
        return None, (11, f"max_seqlen={int(max_seqlen)} is shorter than the longest document "
                          f"({longest} tokens)")
    return tuple(values), (0, "")


def documents_digest(docs: tuple[int, ...] | None) -> tuple[int, int]:
    """(number of documents, CRC32 of the boundaries) for the cross-rank signature."""
    if docs is None:
        return -1, 0
    return len(docs) - 1, zlib.crc32(struct.pack(f"<{len(docs)}q", *docs))


def signature(algo_code: int, q, k, v, causal, dropout_p, scale, window_size, alibi_slopes,
              deterministic, return_attn_probs, transport: int = 0, layout_code: int = 0,
              docs: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The integers every rank must agree on, in the order of FIELDS (-1 where unknowable)."""
    def dims(t):
        return t.dim() if isinstance(t, torch.Tensor) else -1
    shape_ok = isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() == k.dim() == 4
    b, s, h, d = tuple(q.shape) if shape_ok else (-1,) * 4
    hk = k.shape[2] if shape_ok else -1
    dt = _DTYPES.index(q.dtype) + 1 if isinstance(q, torch.Tensor) and q.dtype in _DTYPES else 0
    dev = (_DEVICES.index(q.device.type) + 1 if isinstance(q, torch.Tensor)
           and q.device.type in _DEVICES else 0)
    try:
        ws = tuple(int(w) for w in window_size)
        ws = ws if len(ws) == 2 else (-2, -2)
    except (TypeError, ValueError):
        ws = (-2, -2)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v))
    return (algo_code, dims(q), dims(k), dims(v), b, s, h, hk, d, dt, dev, int(bool(causal)),
            _float_bits(dropout_p), _float_bits(-1.0 if scale is None else scale),
            int(ws[0]), int(ws[1]), int(alibi_slopes is not None), int(bool(deterministic)),
            int(bool(return_attn_probs)), int(needs_grad), int(transport), int(layout_code),
            *documents_digest(docs))


def _show(field: str, value: int) -> str:
    if field in ("dropout_p", "softmax_scale"):
        f = _bits_float(value)
        return "None" if field == "softmax_scale" and f == -1.0 else repr(f)
    if field == "dtype":
        return str(_DTYPES[value - 1]) if value > 0 else "?"
    if field == "device_type":
        return _DEVICES[value - 1] if value > 0 else "?"
    if field == "transport":
        return repr(TRANSPORTS[value]) if value >= 0 else "invalid"
    return str(value)


def check_across_ranks(fn_name: str, comm: GroupComm, checked: set, sig: tuple[int, ...],
                       problem: tuple[int, str], device: torch.device | None) -> None:
    """Raise ValueError on every rank if any rank has a local problem or a differing signature."""
    code, message = problem
    mode = os.environ.get("RINGX_CHECK_INPUTS") or ("once" if device is not None and device.type == "cuda" else "always")
    if mode not in ("always", "once"):
        raise ValueError(f"RINGX_CHECK_INPUTS must be 'always' or 'once', got {mode!r}")
    if mode == "once" and code == 0 and sig in checked:
        return
    table = comm.all_gather_small(torch.tensor(list(sig) + [code], dtype=torch.int64)).tolist()

    def who(r: int) -> str:
        return f"rank {r}" + ("" if comm.global_ranks[r] == r else f" (global rank {comm.global_ranks[r]})")

    bad = [(r, row[-1]) for r, row in enumerate(table) if row[-1] != 0]
    if bad:
        lines = [f"{who(r)}: {message if r == comm.rank else LOCAL_PROBLEMS.get(c, f'problem {c}')}"
                 for r, c in bad]
        raise ValueError(f"{fn_name}: invalid input on {len(bad)} of {comm.size} ranks:\n  "
                         + "\n  ".join(lines))
    diffs = []
    for i, name in enumerate(FIELDS):
        values = [row[i] for row in table]
        if len(set(values)) > 1:
            per_rank = ", ".join(f"{who(r)}={_show(name, x)}" for r, x in enumerate(values))
            diffs.append(f"{name}: {per_rank}")
    if diffs:
        raise ValueError(f"{fn_name}: ranks of the group disagree on their inputs (all ranks must "
                         "call with the same shapes, dtype, device type and flags):\n  "
                         + "\n  ".join(diffs))
    checked.add(sig)
