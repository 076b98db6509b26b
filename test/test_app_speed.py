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
from launcher import spawn  # noqa: E402


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
    if torch.cuda.is_available() and "note" not in choose_kernels("auto", torch.device("cuda"), False).paths:
        cuda = torch.device("cuda")          # Liger installed: compiled blocks, by checkpointing
        assert choose_kernels("auto", cuda, compiled=True).paths["swiglu"] == "torch.compile"
        assert choose_kernels("auto", cuda, compiled=True, checkpointed=True).paths["swiglu"] == "liger (custom op)"
        assert choose_kernels("liger", cuda, compiled=True).paths["swiglu"] == "liger (custom op)"


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
    table; a row that cannot run (Liger on a CPU) reports why instead of failing the run; where
    Liger runs (a GPU with it installed), its rows run and the app says it took Liger's path."""
    import importlib.util
    liger = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    res = subprocess.run([sys.executable, "script/app_compare.py", "--config", "debug", "--seq_len", "256",
                          "--steps", "3", "--rows", "app-ac", "hf-ckpt", "hf-liger", "--out", str(tmp_path),
                          "--profile_step", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert rows["app-ac"]["tokens_per_s"] > 0
    assert ("swiglu: liger" if liger else "torch fallback") in rows["app-ac"]["paths"], rows["app-ac"]["paths"]
    assert rows["hf-ckpt"]["tokens_per_s"] > 0 and "checkpointing" in rows["hf-ckpt"]["paths"]
    if liger:
        assert rows["hf-liger"]["tokens_per_s"] > 0 and "Liger" in rows["hf-liger"]["paths"], rows["hf-liger"]
    else:
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


def test_clip_grad_norm_equals_float64():
    """The app's clipping (foreach norms and scaling per device and dtype) gives the float64 global
    norm and the gradients scaled by min(1, max_norm / norm), over float32 and bfloat16 gradients
    and an empty one; below max_norm nothing changes."""
    from app.common.sharding import clip_grad_norm
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4).to(torch.bfloat16))
    model.register_parameter("empty", torch.nn.Parameter(torch.zeros(0)))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 3
    want = [p.grad.double().clone() for p in model.parameters()]
    norm = float(torch.sqrt(sum(w.square().sum() for w in want)))
    total = float(clip_grad_norm(model, 1.0, None, None, lambda n: False))
    assert abs(total - norm) <= 1e-6 * norm and norm > 1
    for p, w in zip(model.parameters(), want):
        tol = 1e-6 if p.dtype == torch.float32 else 1e-2
        assert torch.allclose(p.grad.double(), w / (total + 1e-6), rtol=tol, atol=0)
    before = [p.grad.clone() for p in model.parameters()]
    assert float(clip_grad_norm(model, 10.0, None, None, lambda n: False)) <= 1 + 1e-3
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("fused", [False, True])
def test_update_clips_like_clip_grad_norm(fused):
    """guarded_update(..., clip_norm=c) from unclipped gradients gives the parameters and AdamW
    state of clip_grad_norm followed by the update (fused: the clipping inside the kernel, to
    float32 rounding; foreach: bit for bit), over steps clipped and not and a skipped NaN step."""
    from app.common.runtime import guarded_update
    from app.common.sharding import clip_grad_norm, global_grad_norm
    runs = []
    for inside in (False, True):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Linear(10, 3))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=fused, foreach=not fused or None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        skipped = []
        for step, scale in enumerate((100.0, 0.01, float("nan"), 30.0)):
            torch.manual_seed(step)
            loss = m(torch.randn(5, 6)).square().mean() * scale
            loss.backward()
            if inside:
                norm = global_grad_norm(m, None, None, lambda n: False)
                bad, _ = guarded_update(opt, sched, loss.detach(), norm, False, torch.device("cpu"), clip_norm=1.0)
            else:
                norm = clip_grad_norm(m, 1.0, None, None, lambda n: False)
                bad, _ = guarded_update(opt, sched, loss.detach(), norm, False, torch.device("cpu"))
            skipped.append(bad)
            opt.zero_grad(set_to_none=True)
        assert skipped == [False, False, True, False] and not hasattr(opt, "grad_scale")
        runs.append((m, opt))
    (a, opt_a), (b, opt_b) = runs
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb) if not fused else torch.allclose(pa, pb, rtol=1e-6, atol=1e-7)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert float(sa["step"]) == float(sb["step"]) == 3
        assert torch.allclose(sa["exp_avg"], sb["exp_avg"], rtol=1e-5 if fused else 0, atol=0)


def _local_shard_adamw_body(rank, world_size, device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from app.common.optim import LocalShardAdamW
    mesh = init_device_mesh(device.type, (world_size,))
    models, opts = [], []
    how = {"fused": True} if device.type == "cuda" else {"foreach": True}   # as the apps run it
    for kind in (torch.optim.AdamW, LocalShardAdamW):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Linear(10, 3, bias=False)).to(device)
        fully_shard(m, mesh=mesh)
        models.append(m)
        opts.append(kind(m.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **how))
    for step in range(3):
        for m, opt in zip(models, opts):
            torch.manual_seed(step)
            m(torch.randn(5, 6, device=device)).square().sum().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert isinstance(b, DTensor) and torch.equal(a.to_local(), b.to_local())
    states = [list(o.state.values()) for o in opts]
    for sa, sb in zip(*states):
        assert isinstance(sb["exp_avg"], DTensor) and torch.equal(sa["exp_avg"].to_local(), sb["exp_avg"].to_local())
        assert torch.equal(sa["exp_avg_sq"].to_local(), sb["exp_avg_sq"].to_local())
        assert float(sa["step"]) == float(sb["step"]) == 3


def test_local_shard_adamw_equals_adamw_on_fsdp():
    """AdamW over FSDP2's local shards: the parameters and the (DTensor) state of torch's AdamW,
    bit for bit, over three steps on two ranks (fused, on GPUs where there are two)."""
    spawn(2, _local_shard_adamw_body)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused update needs CUDA")
def test_local_shard_adamw_fused_on_one_gpu():
    """The same on one rank on the GPU, with the fused update the apps use there."""
    spawn(1, _local_shard_adamw_body)


def _guarded_update_body(rank, world_size, device):
    from app.common.runtime import guarded_update
    for how in ({"fused": True}, {"foreach": True}):     # skipped on the device / decided on the host
        models, opts, scheds = [], [], []
        for _ in range(2):               # 0: guarded, a NaN at step 1 on the last rank only; 1: step 1 left out
            torch.manual_seed(0)
            models.append(torch.nn.Linear(4, 3).to(device))
            opts.append(torch.optim.AdamW(models[-1].parameters(), lr=1e-2, weight_decay=0.1, **how))
            scheds.append(torch.optim.lr_scheduler.LambdaLR(opts[-1], lambda s: 1.0 / (s + 1)))
        flags = []
        for step in range(4):
            torch.manual_seed(10 + step)
            x = torch.randn(5, 4, device=device)
            for i, (m, opt, sched) in enumerate(zip(models, opts, scheds)):
                if i == 1 and step == 1:
                    continue
                loss = m(x).square().mean()
                loss.backward()
                norm = torch.stack([p.grad.norm() for p in m.parameters()]).norm().double()
                if i == 0:
                    if step == 1 and rank == world_size - 1:
                        loss = loss * float("nan")
                    flags.append(guarded_update(opt, sched, loss.detach(), norm, step == 2 and rank == 0,
                                                device))         # the collective device: CPU for gloo
                else:
                    opt.step()
                    sched.step()
                opt.zero_grad(set_to_none=True)
        assert flags == [(False, False), (True, False), (False, True), (False, False)], (how, flags)
        assert not hasattr(opts[0], "found_inf")
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(a, b), how
        for sa, sb in zip(opts[0].state.values(), opts[1].state.values()):
            assert float(sa["step"]) == float(sb["step"]) == 3
            assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
        assert scheds[0].last_epoch == scheds[1].last_epoch == 3


def test_guarded_update_skips_a_non_finite_step_on_every_rank():
    """The apps' update: a NaN loss on one rank skips the step on both (parameters, AdamW state
    and step counts, learning-rate schedule as if it had not been taken), a stop request on one
    rank reaches both; the fused optimizer's device-side skip and the host's decision agree."""
    spawn(2, _guarded_update_body)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device-side skip on a GPU needs CUDA")
def test_guarded_update_on_one_gpu():
    """The same on one rank on the GPU, the flags kept on the GPU as the app keeps them."""
    spawn(1, _guarded_update_body)


def test_swiglu_op_exact_and_in_place_when_compiled():
    """The SwiGLU custom op (eager and compiled) against float64 autograd of silu(a) * b, and the
    compiled backward calls the in-place op on the forward's own buffers: no clone into a new
    buffer (Inductor's copy of each saved input onto itself before the op remains: swiglu_op)."""
    from torch._inductor.utils import run_and_get_code
    from app.gpt.swiglu_op import silu_mul_inplace_backward
    torch.manual_seed(0)
    x = torch.randn(48, 16, dtype=torch.float64)
    w1, w3, t = torch.randn(40, 16, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64), torch.randn(48, 40)

    def loss(fn, x, w1, w3):
        return (fn(x @ w1.T, x @ w3.T) * t.to(x.dtype)).sum()

    leaves = [p.clone().requires_grad_() for p in (x, w1, w3)]
    loss(lambda a, b: F.silu(a) * b, *leaves).backward()
    want = [p.grad for p in leaves]
    for compiled in (False, True):
        fn = torch.compile(loss, fullgraph=True) if compiled else loss
        ins = [p.float().requires_grad_() for p in (x, w1, w3)]

        def step():
            fn(silu_mul_inplace_backward, *ins).backward()
        _, codes = run_and_get_code(step) if compiled else (step(), [])
        for got, ref in zip((p.grad for p in ins), want):
            assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())
        if compiled:
            backward = [c for c in codes if "swiglu_backward_" in c]
            assert len(backward) == 1 and "clone" not in backward[0] and ".copy_(" not in backward[0]
    with pytest.raises(ValueError, match="not leaves"):          # a leaf would be overwritten
        silu_mul_inplace_backward(torch.randn(3, requires_grad=True), torch.randn(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels need CUDA")
def test_swiglu_op_on_cuda_is_ligers_bit_for_bit():
    """On CUDA the custom op runs Liger's kernels: output and gradients (eager and compiled) equal
    Liger's own autograd function's bit for bit, in bfloat16 (a and b are intermediates, as in a
    block: the backward overwrites them)."""
    liger = pytest.importorskip("liger_kernel.transformers.functional")
    from app.gpt.swiglu_op import silu_mul_inplace_backward
    torch.manual_seed(0)
    a0, b0 = (torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dc = torch.randn_like(a0)

    def run(fn):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        out = fn(a * 1, b * 1)
        out.backward(dc)
        return out, a.grad, b.grad
    want = run(liger.liger_swiglu)
    for fn in (silu_mul_inplace_backward, torch.compile(silu_mul_inplace_backward, fullgraph=True)):
        assert all(torch.equal(g, w) for g, w in zip(run(fn), want))


def _cast_for_compute_body(rank, world_size, device):
    """One rank: the plain model through CastForCompute against FSDP2's one-rank bf16 mixed
    precision (the path it replaces), both against the float64 model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from app.common.precision import CastForCompute
    from app.gpt.config import load_preset
    from app.gpt.model import Llama
    from app.gpt.parallelize import apply_fsdp, materialize
    cfg = load_preset("debug")
    tensors = list(Llama.initial_tensors(cfg, torch.Generator().manual_seed(0)))
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(cfg.vocab_size, (1, 64), generator=gen).to(device)
    labels = torch.randint(cfg.vocab_size, (1, 64), generator=gen).to(device)
    pos = torch.arange(64, device=device)

    def run(call, model):
        call(tokens, pos, labels=labels).backward()
        if isinstance(call, CastForCompute):
            call.grads_to_masters()
        full = {n.replace("inner.", ""): (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad)
                for n, p in model.named_parameters()}
        return {n: g.double() for n, g in full.items()}

    ref = Llama(cfg).double().to(device)
    ref.load_state_dict({n: t.double() for n, t in tensors})
    want = run(ref, ref)
    with torch.device("meta"):
        sharded = Llama(cfg)
    apply_fsdp(sharded, init_device_mesh(device.type, (1,)), bf16=True)
    fsdp = run(sharded, materialize(sharded, tensors, device, None))
    plain = Llama(cfg).to(device)
    plain.load_state_dict(dict(tensors))
    cast = CastForCompute(plain, torch.bfloat16)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for block in plain.layers:                     # compiled blocks see the cast weights
            block.compile(fullgraph=True, backend="aot_eager")
        got = run(cast, plain)
        again = run(cast, plain)                       # a second call: no recompilation, and
    for name, g in again.items():                      # its gradients add to the first's
        assert torch.allclose(g, 2 * got[name], rtol=1e-6, atol=0), name
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 and p.is_leaf for p in plain.parameters())
    assert {c.dtype for c in cast.copies} == {torch.bfloat16}      # the model ran on bf16 copies
    assert set(plain.state_dict()) == set(ref.state_dict())
    for name, w in want.items():
        err_cast = float((got[name] - w).norm() / w.norm())
        err_fsdp = float((fsdp[name] - w).norm() / w.norm())
        assert err_cast <= 1.1 * err_fsdp + 1e-4 and err_cast < 2e-2, (name, err_cast, err_fsdp)
        assert err_cast > 0.5 * err_fsdp, (name, err_cast, err_fsdp)  # bf16's rounding, not float32's


def test_cast_for_compute_matches_fsdp_one_rank_mixed_precision():
    """The one-rank path of the GPT app (no FSDP2; float32 weights copied to bf16 once a call,
    gradients copied back into float32 .grad): its gradients are no further from the float64
    model's than those of FSDP2's one-rank bf16 mixed precision, through torch.compile'd blocks
    without recompiling; a second backward adds to .grad; parameters, names and state dict stay
    the plain model's."""
    spawn(1, _cast_for_compute_body)
