"""The GPT app against Hugging Face transformers on one GPU, side by side on the same shapes.

    python script/app_compare.py --config llama3-1b --seq_len 32768
    python script/app_compare.py --config llama3-8b --n_layers 8 --rows app-compile

Every row trains ``--steps`` steps of one sequence of ``--seq_len`` tokens (bf16 compute, float32
weights and AdamW state, gradient clipping at 1.0) in its own process and reports the median of
steps 2-6 (tokens/s, MFU with the app's FLOP count, peak memory of a step). Rows:

- ``app``: app/gpt/train.py as a new user first runs it (``--ac none --loss_chunk 8192
  --kernels torch``); ``app-liger``: the same with Liger-Kernel's RMSNorm, SwiGLU and fused
  linear cross-entropy; ``app-compile``: every block through torch.compile (fused norms, RoPE,
  SwiGLU) and Liger's fused linear cross-entropy when installed (``--kernels auto``);
  ``app-compile-ac``: the same with ``--ac attention`` (blocks recomputed in backward except
  the attention, whose out and lse are kept); ``app-ac``: eager, ``--ac attention``;
  ``app-compile-ac-liger``: compiled blocks calling Liger's RMSNorm and SwiGLU (whose backward
  writes its gradients into its saved inputs) with ``--ac attention``; ``app-compile-ar`` / ``app-compile-ac-ar``: those two without FSDP (``--dp_engine
  allreduce``: float32 weights under autocast, float32 gradients written directly);
- ``hf``: transformers' LlamaForCausalLM (SDPA, fused AdamW, autocast); ``hf-ckpt``: with
  per-layer gradient checkpointing; ``hf-liger`` / ``hf-liger-ckpt``: after
  ``apply_liger_kernel_to_llama()`` (needs liger-kernel).

A row that runs out of memory says so. The table goes to stdout and OUT/compare.json. With
``--profile_step N`` every row runs its step N under torch.profiler and writes the device time of
every kernel, by kind, to OUT/ROW.profile.txt (the app rows through their own ``--profile_step``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

APP_ROWS = {
    "app": ["--ac", "none", "--loss_chunk", "8192", "--kernels", "torch"],
    "app-liger": ["--ac", "none", "--kernels", "liger"],
    "app-ac": ["--ac", "attention"],
    "app-compile": ["--ac", "none", "--compile"],
    "app-compile-ac": ["--ac", "attention", "--compile"],
    "app-compile-ac-liger": ["--ac", "attention", "--compile", "--kernels", "liger"],
    "app-compile-ar": ["--ac", "none", "--compile", "--dp_engine", "allreduce"],
    "app-compile-ac-ar": ["--ac", "attention", "--compile", "--dp_engine", "allreduce"],
}
HF_ROWS = ("hf", "hf-ckpt", "hf-liger", "hf-liger-ckpt")
DEFAULT_ROWS = ("app", "app-compile", "app-compile-ac", "hf-liger", "hf-liger-ckpt", "hf")


def _median_rows(rows: list[dict], skip: int = -1) -> dict:
    """The median of steps 2-6 (or of whatever steps after the first two there are), leaving out
    step ``skip`` (the profiled one)."""
    timed = [r for r in rows if 2 <= r["step"] <= 6 and r["step"] != skip] or rows[-1:]
    return {k: statistics.median(r[k] or 0.0 for r in timed) for k in ("tokens_per_s", "mfu", "max_mem_gb")}


def _error(text: str, rc: int) -> str:
    """What a failed row died of: out of memory, or its first error line."""
    if "OutOfMemoryError" in text or "out of memory" in text:
        return "out of memory"
    lines = [l for l in text.splitlines() if "Error:" in l and "ChildFailedError" not in l]
    return (lines[0] if lines else f"exit {rc}")[:200]


def app_row(name: str, args) -> dict:
    out = Path(args.out) / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / "app/gpt/train.py"), "--config", args.config, "--seq_len", str(args.seq_len),
           "--steps", str(args.steps), "--warmup", "1", "--dtype", "bfloat16", "--no_checkpoint",
           "--out", str(out), *APP_ROWS[name]]
    if args.n_layers:
        cmd += ["--n_layers", str(args.n_layers)]
    if args.profile_step >= 0:
        cmd += ["--profile_step", str(args.profile_step)]
    cmd += args.app_flags.split()
    res = run_app_row(cmd, out)
    if args.profile_step >= 0 and (out / f"profile_step{args.profile_step}.txt").exists():
        (out / f"profile_step{args.profile_step}.txt").replace(Path(args.out) / f"{name}.profile.txt")
    return res if "error" in res else {**_median_rows(res["rows"], args.profile_step), "paths": res["kernels"]}


def run_app_row(cmd: list, out: Path) -> dict:
    """Run an app's command (logging to OUT.log) -> {"rows": its metrics.jsonl rows, "kernels":
    the path its "kernels:" line names}, or {"error": what it died of}."""
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    text = log.read_text()
    if rc != 0:
        return {"error": _error(text, rc)}
    kernels = next((l[len("kernels: "):] for l in text.splitlines() if l.startswith("kernels: ")), "")
    return {"rows": [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], "kernels": kernels}


def hf_row(name: str, args) -> dict:
    """One transformers row, in this process (called through --hf_row in a child)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from app.gpt.config import load_preset
    from app.gpt.hf import hf_config
    from app.gpt.train import step_flops
    cfg = load_preset(args.config, seq_len=args.seq_len, **({"n_layers": args.n_layers} if args.n_layers else {}))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = "transformers, SDPA"
    if "liger" in name:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
        apply_liger_kernel_to_llama()                  # before the model is built
        paths += ", Liger (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy)"
    conf = LlamaConfig(**{k: v for k, v in hf_config(cfg).items() if k != "torch_dtype"})
    conf._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(conf)                  # float32 weights
    if name.endswith("ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        paths += ", per-layer checkpointing"
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1,
                            **({"fused": True} if device.type == "cuda" else {}))
    gen = torch.Generator(device).manual_seed(0)
    rows = hf_train_steps(model, opt, lambda: torch.randint(0, cfg.vocab_size, (1, cfg.seq_len), device=device,
                                                            generator=gen), args.steps, device,
                          args.profile_step, Path(args.out) / f"{name}.profile.txt")
    for r in rows:
        r.update(tokens_per_s=cfg.seq_len / r["seconds"],
                 mfu=step_flops(cfg, cfg.seq_len) / r["seconds"] / 1e12 / args.peak_tflops)
    return {**_median_rows(rows, args.profile_step), "paths": paths}


def hf_train_steps(model, opt, next_tokens, steps: int, device, profile_step: int = -1,
                   profile_table=None) -> list[dict]:
    """``steps`` training steps of a transformers causal LM as its users write them (autocast to
    bf16, ``labels=input_ids``, clipping at 1.0): per step its index, loss, seconds and peak GB.
    ``next_tokens()`` gives each step's (1, S) tokens on ``device``. Step ``profile_step`` runs
    under torch.profiler, its kernels written to ``profile_table``."""
    import torch
    from app.common.profiling import device_time_summary, profiler
    rows = []
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with profiler(step == profile_step) as prof:
            tok = next_tokens()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(input_ids=tok, labels=tok).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start          # the step, not the profiler's shutdown
        if prof is not None:
            device_time_summary(prof, seconds, table=profile_table)
        rows.append({"step": step, "loss": float(loss), "seconds": seconds,
                     "max_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0})
    return rows


def run_hf_row(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--hf_row", name, "--config", args.config, "--seq_len", str(args.seq_len),
           "--steps", str(args.steps), "--n_layers", str(args.n_layers), "--peak_tflops", str(args.peak_tflops),
           "--profile_step", str(args.profile_step), "--out", args.out]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((l for l in res.stdout.splitlines() if l.startswith("ROW ")), None)
    if line is None:
        return {"error": _error(res.stderr + res.stdout, res.returncode)}
    return json.loads(line[4:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="llama3-1b")
    p.add_argument("--seq_len", type=int, default=32768)
    p.add_argument("--n_layers", type=int, default=0, help="cut the depth (0: the preset's)")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=list(APP_ROWS) + list(HF_ROWS))
    p.add_argument("--peak_tflops", type=float, default=989.0)
    p.add_argument("--app_flags", default="", help="more app/gpt/train.py flags for the app rows")
    p.add_argument("--profile_step", type=int, default=-1,
                   help="profile this step of every row: OUT/ROW.profile.txt (its kernels by kind)")
    p.add_argument("--out", default="runs/app_compare")
    p.add_argument("--hf_row", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hf_row:
        print("ROW " + json.dumps(hf_row(args.hf_row, args)), flush=True)
        return 0
    os.makedirs(args.out, exist_ok=True)
    results = {}
    print(f"{args.config}{f' ({args.n_layers} layers)' if args.n_layers else ''}, {args.seq_len} tokens, "
          f"median of steps 2-6", flush=True)
    print(f"{'row':16} {'tokens/s':>9} {'MFU':>6} {'peak GB':>8}  paths", flush=True)
    for name in args.rows:
        r = app_row(name, args) if name in APP_ROWS else run_hf_row(name, args)
        results[name] = r
        if "error" in r:
            print(f"{name:16} {r['error']}", flush=True)
        else:
            print(f"{name:16} {r['tokens_per_s']:9.0f} {r['mfu']:6.3f} {r['max_mem_gb']:8.1f}  {r['paths']}", flush=True)
    for ours, theirs in (("app-compile", "hf-liger"), ("app-compile-ac", "hf-liger-ckpt")):
        a, b = results.get(ours, {}), results.get(theirs, {})
        if "tokens_per_s" in a and "tokens_per_s" in b:
            print(f"{ours} / {theirs}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
                  f"{a['max_mem_gb']:.1f} vs {b['max_mem_gb']:.1f} GB", flush=True)
    Path(args.out, "compare.json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
