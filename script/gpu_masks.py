"""On one GPU: every kernel path of the mask planner checked in bf16 against float64, and timed.

1. Blocks at the offsets the planner emits for every rank pair of N = 2..8 (contiguous, zigzag,
   stripe; documents, windows, causal and full): each block's calls run on the real backends
   (cuDNN for full and square-causal calls, PyTorch's flash kernel for window and varlen calls),
   forward and backward (given the block's own out and lse), against float64 attention on the
   block's dense mask. A block passes when its error is at most 2x that of PyTorch's own bf16
   attention (SDPA math with the same mask) plus a small floor.
2. World size 1, end to end: the four varlen functions and the windowed dense functions against
   the float64 reference (ringX.testing.check_case).
3. Kernel speed per block type and size: cuDNN full / causal, flash window band, flash varlen
   documents, and the planner's calls for a multi-document diagonal block.

    python script/gpu_masks.py [--quick | --mask-sets K] [--no-speeds]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ringX import ATTN_FUNCS  # noqa: E402
from ringX.execute import calls_backward, calls_forward  # noqa: E402
from ringX.kernels import get_backend, select_backend, select_band_backend  # noqa: E402
from ringX.plan import Mask, dense_mask, layout_runs, plan_block  # noqa: E402
from ringX.testing import Case, check_case  # noqa: E402


def ref_block(q, k, v, dout, vis, scale):
    """float64 masked attention of one block with autograd: out, lse, dq, dk, dv."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    ke, ve = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, ke) * scale
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, ve)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.double())
    return out.detach(), lse.detach(), dq, dk, dv


def torch_bf16_block(q, k, v, dout, vis, scale):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    g = q.shape[2] // k.shape[2]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2),
        v.repeat_interleave(g, 2).transpose(1, 2), attn_mask=vis, scale=scale).transpose(1, 2)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out.detach(), dq, dk, dv


def rel(x, ref, rows=None):
    x, ref = x.double(), ref.double()
    if rows is not None:
        x, ref = x[:, rows], ref[:, rows]
    return float((x - ref).norm() / max(float(ref.norm()), 1e-3))


def check_blocks(device, quick: bool, mask_sets: int = 4) -> bool:
    rng = random.Random(0)
    heads, kv_heads, d = 8, 2, 128
    run = SimpleNamespace(scale=d ** -0.5, acc_dtype=torch.float32)
    ok, n_blocks, kinds = True, 0, {}
    worst = 0.0
    for n in range(2, 9):
        s = 256
        total = n * s
        masks = []
        for _ in range(2 if quick else mask_sets):
            cuts = sorted(rng.sample(range(1, total), rng.randint(1, 12)))
            docs = tuple([0] + cuts + [total])
            masks += [Mask(True, (-1, -1), docs), Mask(True, (rng.choice([0, 63, 300, 700]), -1), None),
                      Mask(False, (rng.choice([5, 200]), rng.choice([0, 40])), docs)]
        for layout in ("contiguous", "zigzag", "stripe"):
            for mask in masks:
                pairs = [(i, j) for i in range(n) for j in range(n)]
                for qr, kr in (pairs if not quick else rng.sample(pairs, min(6, len(pairs)))):
                    q_runs, k_runs = layout_runs(layout, qr, n, s), layout_runs(layout, kr, n, s)
                    g = torch.Generator(device="cpu").manual_seed(n * 1000 + qr * 10 + kr)
                    q = torch.randn(1, s, heads, d, generator=g).to(device, torch.bfloat16)
                    k = torch.randn(1, s, kv_heads, d, generator=g).to(device, torch.bfloat16)
                    v = torch.randn(1, s, kv_heads, d, generator=g).to(device, torch.bfloat16)
                    do = torch.randn(1, s, heads, d, generator=g).to(device, torch.bfloat16)
                    run.kernel = select_backend(q, k)
                    run.band_kernel = select_band_backend(q, k, run.kernel)
                    plan = plan_block(q_runs, k_runs, mask, run.band_kernel is run.kernel,
                                      2 if run.band_kernel.varlen else 0)
                    vis = dense_mask(q_runs, k_runs, mask).to(device)
                    if plan is None:
                        assert not vis.any()
                        continue
                    for c in plan.calls:
                        kinds[c.kind] = kinds.get(c.kind, 0) + 1
                    out, lse = calls_forward(run, plan.calls, q, k, v)
                    out_q = out.to(torch.bfloat16)
                    dq, dk, dv = calls_backward(run, plan.calls, do, q, k, v, out_q, lse)
                    r_out, r_lse, r_dq, r_dk, r_dv = ref_block(q, k, v, do, vis, run.scale)
                    seen = vis.any(1)                                  # rows with a visible key
                    # PyTorch's bf16 on the seen rows (its NaN rows are the unseen ones)
                    t_out, t_dq, t_dk, t_dv = torch_bf16_block(q[:, seen], k, v, do[:, seen], vis[seen], run.scale)
                    errs = {"out": (rel(out, r_out, seen), rel(t_out, r_out[:, seen])),
                            "dq": (rel(dq, r_dq, seen), rel(t_dq, r_dq[:, seen])),
                            "dk": (rel(dk, r_dk), rel(t_dk, r_dk)),
                            "dv": (rel(dv, r_dv), rel(t_dv, r_dv))}
                    lse_err = float((lse[..., seen].double() - r_lse[..., seen]).abs().max())
                    empty_ok = bool((lse[..., ~seen] == float("-inf")).all()) and bool((out[:, ~seen] == 0).all())
                    bad = [f"{k_}: {a:.3g} > 2 x {b:.3g}" for k_, (a, b) in errs.items() if a > 2 * b + 2e-3]
                    if lse_err > 1e-3:
                        bad.append(f"lse max abs err {lse_err:.3g}")
                    if not empty_ok:
                        bad.append("rows that see nothing are not out 0 / lse -inf")
                    worst = max(worst, max(a / max(b, 1e-9) for a, b in errs.values()))
                    n_blocks += 1
                    if bad:
                        ok = False
                        print(f"FAIL N={n} {layout} q{qr} k{kr} {mask}: {'; '.join(bad)} "
                              f"calls {[c.kind for c in plan.calls]}", flush=True)
    print(f"blocks checked: {n_blocks}, calls by kind: {kinds}, worst error / torch bf16 error: "
          f"{worst:.2f}, {'PASS' if ok else 'FAIL'}", flush=True)
    return ok


def check_end_to_end(device) -> bool:
    ok = True
    S = 2048
    docs = (0, 1, 300, 301, 1100, 1900, S)
    cases = [Case(1, S, 8, 2, 128, True, torch.bfloat16, seed=1, docs=docs),
             Case(1, S, 8, 2, 128, False, torch.bfloat16, seed=2, docs=docs, window=(100, 30)),
             Case(2, S, 8, 2, 128, True, torch.bfloat16, seed=3, window=(255, 0)),
             Case(1, S, 8, 2, 128, True, torch.bfloat16, seed=4, docs=docs, window=(511, 0)),
             Case(2, S, 8, 2, 128, True, torch.bfloat16, seed=5, layout="stripe")]
    for algo, fn in ATTN_FUNCS.items():
        for case in cases:
            if case.layout == "stripe" and algo in ("ringX1", "ringX2"):
                continue
            res = check_case(fn, algo, case, None, device)
            errs = " ".join(f"{k}={res.errors[k]:.2e}/{res.bounds[k]:.2e}" for k in res.errors)
            print(f"{'PASS' if res.passed else 'FAIL'} world 1 {algo} {case.label()}: {errs}", flush=True)
            ok &= res.passed
    return ok


def bench(fn, *args, iters=10):
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def speeds(device) -> None:
    heads, kv_heads, d = 32, 8, 128
    cudnn, flash = get_backend("cudnn"), get_backend("flash")
    run = SimpleNamespace(scale=d ** -0.5, acc_dtype=torch.float32, kernel=cudnn, band_kernel=flash)
    print("| block | tokens (q x k) | fwd+bwd ms | TF/s |\n|---|---|---|---|")
    for s in (2048, 4096, 8192, 16384):
        q = torch.randn(1, s, heads, d, device=device, dtype=torch.bfloat16)
        k = torch.randn(1, s, kv_heads, d, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        do = torch.randn_like(q)
        whole = layout_runs("contiguous", 0, 1, s)
        rng = random.Random(s)
        cuts, x = [], 0
        while True:                                   # documents, lognormal lengths of mean ~s/4
            x += max(1, int(rng.lognormvariate(0, 0.8) * s / 4 / 1.38))
            if x >= s:
                break
            cuts.append(x)
        docs = tuple([0] + cuts + [s])
        cases = [("cuDNN full", Mask(False)), ("cuDNN causal", Mask(True)),
                 (f"flash window {s // 4} causal", Mask(True, (s // 4 - 1, -1))),
                 (f"flash varlen {len(docs) - 1} docs causal", Mask(True, (-1, -1), docs))]
        # the planner's calls (varlen packing on), then the same documents as one cuDNN call each
        rows = [(f"{name} ({'+'.join(c.kind for c in plan.calls)})", plan)
                for name, mask in cases for plan in [plan_block(whole, whole, mask, False, 2)]]
        per_doc = plan_block(whole, whole, Mask(True, (-1, -1), docs), False, 0)
        rows.append((f"cuDNN one call per document ({len(per_doc.calls)} calls)", per_doc))
        for name, plan in rows:
            def step(calls=plan.calls):
                o, l = calls_forward(run, calls, q, k, v)
                calls_backward(run, calls, do, q, k, v, o.to(q.dtype), l)
            ms = bench(step)
            flops = 4.0 * plan.pairs * heads * d * 3.5
            print(f"| {name} | {s} x {s} | {ms:.3f} | {flops / ms / 1e9:.0f} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of the script itself")
    p.add_argument("--mask-sets", type=int, default=4,
                   help="random mask sets (3 masks each) per N; every rank pair unless --quick")
    p.add_argument("--no-speeds", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(),
          torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu")
    t0 = time.time()
    ok = check_blocks(device, args.quick, args.mask_sets)
    print(f"[blocks {time.time() - t0:.0f} s]", flush=True)
    ok &= check_end_to_end(device)
    print(f"[end to end {time.time() - t0:.0f} s]", flush=True)
    if device.type == "cuda" and not args.no_speeds:
        speeds(device)
    print("ALL PASS" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
