"""Each local kernel backend against the float64 reference on the devices this machine has
(CUDA backends skip cleanly on CPU-only machines), and the registry's choices and errors."""
import dataclasses

import pytest
import torch

import launcher  # noqa: F401  (puts the checkout on sys.path when ringX is not installed)
from ringX.kernels import BACKENDS, KernelInputs, explain_choice, get_backend, select_backend, support_table
from ringX.testing import global_rel_err, reference_attention


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _params():
    for device in _devices():
        for b in BACKENDS:
            for dtype in (torch.float32, torch.bfloat16):
                yield pytest.param(b.name, device, dtype, id=f"{b.name}-{device}-{str(dtype)[6:]}")


@pytest.mark.parametrize("name,device,dtype", list(_params()))
@pytest.mark.parametrize("causal", [False, True])
def test_backend_matches_reference(name, device, dtype, causal):
    backend = get_backend(name)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 64, 8, 64, generator=g, dtype=torch.float64).to(dtype).to(device)
    k = torch.randn(2, 64, 2, 64, generator=g, dtype=torch.float64).to(dtype).to(device)
    v = torch.randn(2, 64, 2, 64, generator=g, dtype=torch.float64).to(dtype).to(device)
    dout = torch.randn(2, 64, 8, 64, generator=g, dtype=torch.float64).to(dtype).to(device)
    # whether the kernel takes these inputs at all; the registry's size rule is tested below
    reasons = backend.not_supported_reasons(dataclasses.replace(KernelInputs.from_tensors(q, k), rows=0, keys=0))
    if reasons:
        pytest.skip(f"{name} on {device}/{dtype}: {'; '.join(reasons)}")
    scale = 64 ** -0.5
    ref = reference_attention(q, k, v, dout, causal, scale)
    out, lse = backend.forward(q, k, v, causal, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (2, 8, 64) and lse.dtype == torch.float32
    # backward is given the reference's merged out/lse, as the ring schedules do
    dq, dk, dv = backend.backward(dout, q, k, v, ref["out"].to(dtype), ref["lse"].float(), causal, scale)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    tol = {"out": 2e-5, "lse": 2e-5, "grad": 1e-4} if dtype == torch.float32 else \
          {"out": 1e-2, "lse": 1e-4, "grad": 2e-2}
    assert global_rel_err(out, ref["out"]) <= tol["out"]
    assert global_rel_err(lse, ref["lse"]) <= tol["lse"]
    for mine, name_ in ((dq, "dq"), (dk, "dk"), (dv, "dv")):
        assert global_rel_err(mine, ref[name_]) <= tol["grad"], name_


def test_registry_picks_first_supported_and_reports_reasons(monkeypatch):
    monkeypatch.delenv("RINGX_BACKEND", raising=False)
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    assert select_backend(q, k).name == "cpu_flash"
    table = support_table(KernelInputs.from_tensors(q, k))
    assert table["cpu_flash"] == [] and table["math"] == []
    assert any("CUDA" in r for r in table["cudnn"])
    # forcing by argument and by environment variable
    assert select_backend(q, k, name="math").name == "math"
    monkeypatch.setenv("RINGX_BACKEND", "math")
    assert select_backend(q, k).name == "math"
    with pytest.raises(NotImplementedError, match="cudnn.*RINGX_BACKEND"):
        monkeypatch.setenv("RINGX_BACKEND", "cudnn")
        select_backend(q, k)
    with pytest.raises(ValueError, match="valid names"):
        select_backend(q, k, name="nope")


def test_registry_error_lists_every_backend_when_none_fits(monkeypatch):
    monkeypatch.delenv("RINGX_BACKEND", raising=False)
    q = torch.randn(1, 8, 4, 16)
    with pytest.raises(NotImplementedError) as err:
        select_backend(q, q, dropout_p=0.1)
    for b in BACKENDS:
        assert f"  {b.name}:" in str(err.value)


@pytest.mark.parametrize("rows,keys", [(1, 160), (96, 160), (160, 96)])
def test_gpu_backends_take_rectangular_blocks(rows, keys):
    """Full-attention blocks of unequal rows and keys (ring blocks of ringX1/2, decode steps),
    bf16 on the GPU, every backend that takes them, against the float64 reference."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, rows, 8, 64, generator=g, dtype=torch.float64).to("cuda", torch.bfloat16)
    k, v = (torch.randn(2, keys, 2, 64, generator=g, dtype=torch.float64).to("cuda", torch.bfloat16)
            for _ in range(2))
    dout = torch.randn_like(q)
    ref = reference_attention(q, k, v, dout, False, 0.125)
    ran = []
    for backend in BACKENDS:
        inp = dataclasses.replace(KernelInputs.from_tensors(q, k), rows=0, keys=0)
        if backend.not_supported_reasons(inp) or not backend.takes_shape(rows, keys):
            continue
        out, lse = backend.forward(q, k, v, False, 0.125)
        dq, dk, dv = backend.backward(dout, q, k, v, ref["out"].to(q.dtype), ref["lse"].float(), False, 0.125)
        assert global_rel_err(out, ref["out"]) <= 1e-2 and global_rel_err(lse, ref["lse"]) <= 1e-4, backend.name
        for mine, name in ((dq, "dq"), (dk, "dk"), (dv, "dv")):
            assert global_rel_err(mine, ref[name]) <= 2e-2, (backend.name, name)
        ran.append(backend.name)
    assert ran


def test_fa4_reasons_name_the_device_and_the_package(monkeypatch):
    """FlashAttention-4 is refused off NVIDIA Hopper/Blackwell GPUs, and where the package is
    missing the reason says how to install it (the registry then falls through to cuDNN)."""
    from ringX.kernels import fa4
    backend = get_backend("fa4")
    cpu = KernelInputs("cpu", False, None, torch.bfloat16, 64, 8, 2, 0.0)
    assert any("NVIDIA CUDA" in r for r in backend.not_supported_reasons(cpu))
    hopper = dataclasses.replace(cpu, device_type="cuda", capability=(9, 0))
    ampere = dataclasses.replace(hopper, capability=(8, 0))
    assert any("9.0" in r for r in backend.not_supported_reasons(ampere))
    assert any("Hopper and Blackwell" in r for r in
               backend.not_supported_reasons(dataclasses.replace(hopper, capability=(12, 0))))
    assert any("float32" in r for r in
               backend.not_supported_reasons(dataclasses.replace(hopper, dtype=torch.float32)))
    monkeypatch.setattr(fa4, "_interface", lambda: None)
    assert backend.not_supported_reasons(hopper) == [
        "the flash-attn-4 package (flash_attn.cute) is not installed (pip install ringX[fa4])"]
    # installed: taken for calls of MIN_TOKENS rows and keys or more (or of unknown size)
    monkeypatch.setattr(fa4, "_interface", lambda: object())
    big = dataclasses.replace(hopper, rows=fa4.MIN_TOKENS, keys=2 * fa4.MIN_TOKENS)
    assert backend.not_supported_reasons(big) == [] and backend.not_supported_reasons(hopper) == []
    for rows, keys in ((1, big.keys), (fa4.MIN_TOKENS - 1, big.keys), (big.rows, 2048)):
        assert any("faster on cuDNN" in r for r in
                   backend.not_supported_reasons(dataclasses.replace(big, rows=rows, keys=keys)))


def test_explain_choice_names_the_kernel_and_what_is_missing(monkeypatch):
    monkeypatch.delenv("RINGX_BACKEND", raising=False)
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    assert explain_choice(q, k) == "cpu_flash"          # the GPU kernels are off this device, not missing
    assert explain_choice(q, k, name="math") == "math (forced)"
    monkeypatch.setattr(get_backend("cpu_flash"), "not_supported_reasons",
                        lambda inp: ["the x package is not installed (pip install x)"])
    assert explain_choice(q, k) == "math (cpu_flash: the x package is not installed (pip install x))"
