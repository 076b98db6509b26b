"""The GPT app's speed paths on CPU: kernel choice and its messages, the torch linear
cross-entropy against plain PyTorch, and the side-by-side and per-block scripts end to end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.gpt.kernels import choose_kernels, linear_cross_entropy_torch  # noqa: E402


def test_kernel_choice_says_which_path_it_took():
    cpu = torch.device("cpu")
    assert choose_kernels("torch", cpu, compiled=False).paths["loss"].startswith("torch")
    assert choose_kernels("torch", cpu, compiled=True).paths["rms_norm"] == "torch.compile"
    auto = choose_kernels("auto", cpu, compiled=False)
    assert auto.paths["rms_norm"] == "torch" and "needs a CUDA device" in auto.paths["note"]
    with pytest.raises(RuntimeError, match="--kernels liger: Liger-Kernel needs a CUDA device"):
        choose_kernels("liger", cpu, compiled=False)
    with pytest.raises(ValueError, match="expected one of auto, liger, torch"):
        choose_kernels("fast", cpu, compiled=False)


@pytest.mark.parametrize("chunk", [0, 7])
def test_linear_cross_entropy_equals_plain(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(30, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (30,), generator=g)
    labels[3] = -100
    got = linear_cross_entropy_torch(h, w, labels, chunk)
    gh, gw = torch.autograd.grad(got, (h, w))
    want = F.cross_entropy(h @ w.T, labels, reduction="sum", ignore_index=-100)
    wh, ww = torch.autograd.grad(want, (h, w))
    assert torch.allclose(got, want, rtol=1e-12) and torch.allclose(gh, wh) and torch.allclose(gw, ww)


def test_app_compare_and_block_overhead_run(tmp_path):
    """script/app_compare.py runs an app row and a transformers row side by side and writes its
    table; a row that cannot run (Liger on a CPU) reports why instead of failing the run."""
    res = subprocess.run([sys.executable, "script/app_compare.py", "--config", "debug", "--seq_len", "256",
                          "--steps", "3", "--rows", "app-ac", "hf-ckpt", "hf-liger", "--out", str(tmp_path),
                          "--profile_step", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert rows["app-ac"]["tokens_per_s"] > 0 and "torch fallback" in rows["app-ac"]["paths"]
    assert rows["hf-ckpt"]["tokens_per_s"] > 0 and "checkpointing" in rows["hf-ckpt"]["paths"]
    assert "liger_kernel" in rows["hf-liger"]["error"]
    for row in ("app-ac", "hf-ckpt"):            # the profiled step's table (no device kernels on a CPU)
        assert (tmp_path / f"{row}.profile.txt").read_text().startswith("profile:")
    res = subprocess.run([sys.executable, "script/block_overhead.py", "--sizes", "64", "--heads", "4",
                          "--kv-heads", "2", "--headdim", "16", "--repeats", "2", "--warmup", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [l.split() for l in res.stdout.splitlines() if l.strip().startswith("64")]
    assert [l[2] for l in lines] == ["full", "causal"] and all(float(l[3]) > 0 for l in lines)


def test_idle_gaps_by_neighbours():
    """The profile's idle report: gaps between kernels (overlapping kernels close none), summed by
    the kernels around them, with the innermost host call under way in the largest one."""
    from app.common.profiling import idle_gaps
    kernels = [(0, 100, "gemm"), (50, 120, "norm"), (200, 300, "gemm"), (310, 400, "norm"),
               (1400, 1500, "gemm")]
    host = [(0, 2000, "step"), (500, 1300, "aten::item"), (120, 200, "launch")]
    lines = idle_gaps(kernels, host, min_us=20)
    assert lines[0].startswith("  idle between kernels: 1.1 ms in 2 gaps") and "1.5 ms" in lines[0]
    assert "after norm | before gemm | host in: aten::item" in lines[1] and "x2" in lines[1]
    assert idle_gaps([]) == []
