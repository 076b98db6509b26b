"""app/hf/finetune.py against transformers' own training step, on one GPU, on the same model.

    python script/hf_compare.py                           # Qwen2.5-1.5B shapes, 32K tokens
    python script/hf_compare.py --seq_len 8192 --rows hf app

A random model of the Qwen2.5-1.5B shapes (28 layers, dim 1536, 12/2 heads with qkv bias, ffn
8960, vocab 151936, tied embeddings; ``--layers`` cuts the depth) is written once as a Hugging
Face directory; every row trains it ``--steps`` steps on one sequence of ``--seq_len`` random
tokens (bf16 compute, float32 weights and AdamW state, per-layer activation checkpointing,
gradient clipping at 1.0) in its own process and reports the median of steps 2-6: tokens/s,
MFU (6 x matmul parameters x tokens + causal attention, recomputation not counted) and the peak
memory of a step, and the loss of step 0 (every row trains on the same windows). Rows:

- ``hf``: transformers' own step: ``attn_implementation="sdpa"``, autocast, ``labels=input_ids``;
- ``hf-liger``: the same after Liger-Kernel's ``_apply_liger_kernel_to_instance`` (needs liger-kernel);
- ``app``: ``app/hf/finetune.py --attn ringX1 --context_parallel 1 --kernels torch`` (the model's own
  code, RingX attention through transformers' registry, FSDP2 on one rank);
- ``app-liger``: the same with ``--kernels liger`` (fused linear cross-entropy: no logits).

The table goes to stdout and OUT/compare.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "script"))
from app_compare import _error, _median_rows, hf_train_steps, run_app_row  # noqa: E402

ROWS = ("hf", "app", "hf-liger", "app-liger")
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                  rms_norm_eps=1e-6, use_sliding_window=False, hidden_act="silu")


def step_flops(conf, seq_len: int) -> float:
    """Training FLOPs of one sequence: 6 x matmul parameters x tokens + causal attention."""
    d, f, layers = conf["hidden_size"], conf["intermediate_size"], conf["num_hidden_layers"]
    hd = d // conf["num_attention_heads"]
    kv = conf["num_key_value_heads"] * hd
    per_layer = d * d * 2 + 2 * d * kv + 3 * d * f                     # q, o, k, v, gate/up/down
    matmul = layers * per_layer + d * conf["vocab_size"]               # + the output projection
    return 6 * matmul * seq_len + 6 * layers * seq_len ** 2 * d        # attention: 3 x 2 S^2 d (causal)


def make_model(path: Path, conf: dict, max_len: int) -> None:
    """A random model of ``conf`` as a Hugging Face directory (float32 safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    config = Qwen2Config(**conf, max_position_embeddings=max_len)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path, safe_serialization=True)


def hf_row(name: str, args) -> dict:
    """One transformers row, in this process (called through --hf_row in a child)."""
    import torch
    from transformers import AutoModelForCausalLM
    from app.gpt.data import TokenFile
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation="sdpa", dtype=torch.float32)
    paths = "transformers, SDPA, per-layer checkpointing"
    if name == "hf-liger":
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
        _apply_liger_kernel_to_instance(model=model)
        paths += ", Liger (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy)"
    model.to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0,
                            **({"fused": True} if device.type == "cuda" else {}))
    data = TokenFile(args.data, args.seq_len, seed=0)        # the windows the app rows train on
    conf = json.loads(Path(args.model_dir, "config.json").read_text())
    rows = hf_train_steps(model, opt, lambda: data.next_batch(1)[0].to(device), args.steps, device)
    for r in rows:
        r.update(tokens_per_s=args.seq_len / r["seconds"],
                 mfu=step_flops(conf, args.seq_len) / r["seconds"] / 1e12 / args.peak_tflops)
    return {**_median_rows(rows), "loss_step0": rows[0]["loss"], "paths": paths}


def app_row(name: str, args) -> dict:
    out = Path(args.out) / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           str(ROOT / "app/hf/finetune.py"), "--model", args.model_dir, "--data", args.data,
           "--seq_len", str(args.seq_len), "--context_parallel", "1", "--attn", "ringX1", "--dtype", "bfloat16",
           "--steps", str(args.steps), "--warmup", "1", "--out", str(out),
           "--kernels", "liger" if name == "app-liger" else "torch"]
    res = run_app_row(cmd, out)
    if "error" in res:
        return res
    conf = json.loads(Path(args.model_dir, "config.json").read_text())
    rows, kernels = res["rows"], res["kernels"]
    for r in rows:
        r["mfu"] = step_flops(conf, args.seq_len) * r["tokens_per_s"] / args.seq_len / 1e12 / args.peak_tflops
    return {**_median_rows(rows), "loss_step0": rows[0]["loss"], "paths": "app/hf/finetune.py, ringX1, FSDP2, " + kernels}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq_len", type=int, default=32768)
    p.add_argument("--layers", type=int, default=0, help="cut the depth (0: 28)")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--peak_tflops", type=float, default=989.0)
    p.add_argument("--out", default="runs/hf_compare")
    p.add_argument("--model_dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hf_row", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hf_row:
        print("ROW " + json.dumps(hf_row(args.hf_row, args)), flush=True)
        return 0
    import numpy as np
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    conf = dict(QWEN25_15B, **({"num_hidden_layers": args.layers} if args.layers else {}))
    args.model_dir, args.data = str(out / "model"), str(out / "tokens.npy")
    if not Path(args.model_dir, "config.json").exists():
        make_model(Path(args.model_dir), conf, max(32768, args.seq_len))
    np.save(args.data, np.random.default_rng(0).integers(0, conf["vocab_size"], (args.steps + 2) * args.seq_len + 1))
    print(f"Qwen2.5-1.5B shapes ({conf['num_hidden_layers']} layers), {args.seq_len} tokens, median of steps 2-6",
          flush=True)
    print(f"{'row':10} {'tokens/s':>9} {'MFU':>6} {'peak GB':>8} {'loss@0':>8}  paths", flush=True)
    results = {}
    for name in args.rows:
        if name.startswith("app"):
            r = app_row(name, args)
        else:
            cmd = [sys.executable, __file__, "--hf_row", name, "--seq_len", str(args.seq_len), "--steps",
                   str(args.steps), "--peak_tflops", str(args.peak_tflops), "--model_dir", args.model_dir,
                   "--data", args.data]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((l for l in res.stdout.splitlines() if l.startswith("ROW ")), None)
            r = json.loads(line[4:]) if line else {"error": _error(res.stderr + res.stdout, res.returncode)}
        results[name] = r
        if "error" in r:
            print(f"{name:10} {r['error']}", flush=True)
        else:
            print(f"{name:10} {r['tokens_per_s']:9.0f} {r['mfu']:6.3f} {r['max_mem_gb']:8.1f} {r['loss_step0']:8.4f}  "
                  f"{r['paths']}", flush=True)
    for ours, theirs in (("app", "hf"), ("app-liger", "hf"), ("app-liger", "hf-liger")):
        a, b = results.get(ours, {}), results.get(theirs, {})
        if "tokens_per_s" in a and "tokens_per_s" in b:
            print(f"{ours} / {theirs}: {a['tokens_per_s'] / b['tokens_per_s']:.3f}x tokens/s, "
                  f"{a['max_mem_gb']:.1f} vs {b['max_mem_gb']:.1f} GB", flush=True)
    (out / "compare.json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
