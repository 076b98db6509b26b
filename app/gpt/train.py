"""Train Llama3 with RingX context parallelism.

    python app/gpt/train.py --config debug --steps 30                                  # 1 process
    torchrun --nproc_per_node 4 app/gpt/train.py --config debug --context_parallel 4 --attn ringX3
    srun -n8 bash -c "source script/setup_dist_vars.sh; python app/gpt/train.py --config llama3-8b-128k --context_parallel 8"

Ranks are laid out by ringX.parallel.ParallelDims (dp is the rest); each cp group splits every
sequence in the layout of --attn; gradients of the weights are summed over dp x cp and averaged
over dp. Without --data the embedded passkey-retrieval task is used (byte tokens, the key in the
first quarter, the question at the end); --data takes a .npy / .bin token file.

Metrics go to OUT/metrics.jsonl, one object per step: step, loss, tokens_per_s (whole job),
tflops_per_gpu and mfu (FLOPs per step = 6 * non-embedding params * tokens + 6 * layers * dim *
seq_len * tokens for causal attention, over --peak_tflops), max_mem_gb; every --eval_every steps
also passkey_acc (all five digits right, greedy) on held-out prompts.

Checkpoints (torch.distributed.checkpoint, atomic, see app/gpt/checkpoint.py) are written every
--checkpoint_every steps and at the end under OUT/checkpoints; --resume continues from the newest
complete one exactly (same data order, random state, optimizer and schedule).

--tensor_parallel T splits attention heads, kv heads and the MLP over tp groups (see
app/gpt/tensor_parallel.py); checkpoints are not written with T > 1 yet (said on rank 0).

--hf_checkpoint DIR starts from a local Hugging Face Llama checkpoint (its config.json sets the
architecture; see app/gpt/hf.py); --export_hf DIR writes the trained weights back in that format.

Not implemented yet (each refuses with an error instead of being ignored): --eval_only,
--checkpoint_every / --resume with --tensor_parallel > 1, --export_hf with --tensor_parallel > 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.gpt import checkpoint  # noqa: E402
from app.gpt.config import load_preset, presets  # noqa: E402
from app.gpt.hf import config_from_hf, export_hf, load_hf  # noqa: E402
from app.gpt.data import BYTE_VOCAB, TokenFile, passkey_batch  # noqa: E402
from app.gpt.model import Llama, sdpa_causal  # noqa: E402
from app.gpt.parallelize import ATTN_CHOICES, cp_attention, cp_loss, reduce_gradients, shard_batch  # noqa: E402
from app.gpt.tensor_parallel import apply_tensor_parallel  # noqa: E402
from ringX.launch import init_distributed  # noqa: E402
from ringX.parallel import ParallelDims  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="debug", help=f"preset: {', '.join(presets())}")
    p.add_argument("--context_parallel", type=int, default=1)
    p.add_argument("--tensor_parallel", type=int, default=1)
    p.add_argument("--parallel_order", default="tp-cp-dp")
    p.add_argument("--attn", choices=ATTN_CHOICES, default="ringX3")
    p.add_argument("--seq_len", type=int, default=None, help="override the preset's seq_len")
    p.add_argument("--batch", type=int, default=1, help="sequences per dp rank per step")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--data", default=None, help=".npy/.bin token file (default: passkey task)")
    p.add_argument("--hf_checkpoint", default=None, help="local Hugging Face Llama checkpoint to start from")
    p.add_argument("--export_hf", default=None, help="write the final weights as a Hugging Face checkpoint")
    p.add_argument("--eval_only", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--checkpoint_every", type=int, default=0, help="0: only at the end")
    p.add_argument("--eval_every", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="per-GPU peak for MFU (H100/H200 bf16 dense)")
    p.add_argument("--out", default="runs/gpt")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _refuse_unimplemented(args) -> None:
    tp_ckpt = args.tensor_parallel > 1 and (args.resume or args.checkpoint_every)
    for flag, on in (("--checkpoint_every / --resume with --tensor_parallel > 1", tp_ckpt),
                     ("--export_hf with --tensor_parallel > 1", args.export_hf and args.tensor_parallel > 1),
                     ("--eval_only", args.eval_only)):
        if on:
            raise NotImplementedError(f"{flag} is not implemented in app/gpt yet")


def step_flops(model: Llama, tokens: int) -> float:
    cfg = model.cfg
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    return 6.0 * non_embedding * tokens + 6.0 * cfg.n_layers * cfg.dim * cfg.seq_len * tokens


@torch.no_grad()
def passkey_accuracy(model, attn_fn, cp_group, attn, device, seq_len, n=8, seed=12345) -> float:
    """Fraction of held-out prompts whose five answer digits are all predicted right."""
    tokens, labels, mask = passkey_batch(n, seq_len, torch.Generator().manual_seed(seed))
    tokens, labels, mask = tokens.to(device), labels.to(device), mask.to(device)
    tok, lab, pos = shard_batch(tokens, labels, attn, cp_group)
    _, msk, _ = shard_batch(tokens, mask.long(), attn, cp_group)
    pred = model(tok, pos, attn_fn).argmax(-1)
    wrong = ((pred != lab) & msk.bool()).sum(1).double()
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        dist.all_reduce(wrong, group=cp_group)
    return (wrong == 0).double().mean().item()


def train(args) -> list[dict]:
    _refuse_unimplemented(args)
    info = init_distributed()
    dims = ParallelDims(dp=-1, cp=args.context_parallel, tp=args.tensor_parallel,
                        order=args.parallel_order, world_size=info.world_size)
    groups = dims.build(names=("cp", "tp", "dp", "dp_cp"))
    if args.attn == "sdpa" and dims.cp > 1:
        raise ValueError("--attn sdpa computes on the local tokens only: use a ringX function with --context_parallel > 1")
    cfg = load_preset(args.config, seq_len=args.seq_len)
    if args.hf_checkpoint:
        cfg = config_from_hf(args.hf_checkpoint, base=cfg)
    if args.data is None and cfg.vocab_size < BYTE_VOCAB:
        raise ValueError(f"the passkey task needs vocab_size >= {BYTE_VOCAB}, preset has {cfg.vocab_size}")
    device, dp_rank = info.device, dims.coords(info.rank)["dp"]
    torch.manual_seed(args.seed)
    model = Llama(cfg)
    model.init_weights(torch.Generator().manual_seed(args.seed))
    if args.hf_checkpoint:
        load_hf(model, args.hf_checkpoint)
    model.to(device)
    apply_tensor_parallel(model, groups.tp)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))
    attn_fn = sdpa_causal if args.attn == "sdpa" else cp_attention(args.attn, groups.cp)
    data = TokenFile(args.data, cfg.seq_len, seed=args.seed + dp_rank) if args.data else None
    gen = torch.Generator().manual_seed(args.seed * 1000 + dp_rank)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    out_dir = Path(args.out)
    ckpt_root = out_dir / "checkpoints"
    first_step = 0
    if args.resume:
        path = checkpoint.latest(ckpt_root, log=lambda m: info.rank == 0 and print(m, flush=True))
        if path is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {ckpt_root}")
        local = checkpoint.load(path, model, opt)
        sched.load_state_dict(local["sched"])
        gen.set_state(local["generator"])
        torch.set_rng_state(local["torch_rng"])
        if data is not None:
            data.load_state(local["data"])
        first_step = local["step"]
        if info.rank == 0:
            print(f"resumed from {path} at step {first_step}", flush=True)
    metrics, log = [], None
    if info.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        log = open(out_dir / "metrics.jsonl", "a" if args.resume else "w")
    flops = step_flops(model, cfg.seq_len * args.batch * dims.dp) * dims.tp  # model holds 1/tp of the blocks
    bar = _progress(args.steps - first_step, info.rank == 0)

    def save(done: int) -> None:
        checkpoint.save(ckpt_root, done, model, opt, {
            "step": done, "sched": sched.state_dict(), "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "data": data.state() if data is not None else None})
    for step in range(first_step, args.steps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        if data is not None:
            tokens, labels = data.next_batch(args.batch)
        else:
            tokens, _, _ = passkey_batch(args.batch, cfg.seq_len + 1, gen)
            tokens, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        tok, lab, pos = shard_batch(tokens.to(device), labels.to(device), args.attn, groups.cp)
        with autocast:
            logits = model(tok, pos, attn_fn)
        loss, global_loss = cp_loss(logits, lab, groups.cp)
        loss.backward()
        reduce_gradients(model, groups["dp_cp"])
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(dims.dp)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        mean_loss = global_loss.clone()
        if dims.dp > 1:
            dist.all_reduce(mean_loss, group=groups.dp)
            mean_loss /= dims.dp
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        row = {"step": step, "loss": mean_loss.item(), "tokens_per_s": cfg.seq_len * args.batch * dims.dp / seconds,
               "tflops_per_gpu": flops / seconds / info.world_size / 1e12,
               "max_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
        row["mfu"] = row["tflops_per_gpu"] / args.peak_tflops
        if data is None and args.eval_every and (step + 1) % args.eval_every == 0:
            with autocast:
                row["passkey_acc"] = passkey_accuracy(model, attn_fn, groups.cp, args.attn, device, cfg.seq_len)
        metrics.append(row)
        if log is not None:
            log.write(json.dumps(row) + "\n")
            log.flush()
        bar(row)
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < args.steps:
            save(step + 1)
    if first_step < args.steps and dims.tp == 1:
        save(args.steps)
    elif dims.tp > 1 and info.rank == 0:
        print("no checkpoint written: checkpoints with --tensor_parallel > 1 are not implemented yet", flush=True)
    if args.export_hf and info.rank == 0:
        export_hf(model, args.export_hf)
    if log is not None:
        log.close()
    return metrics


def _progress(total: int, enabled: bool):
    """A progress bar on rank 0 (tqdm when installed, else a line every 10 steps)."""
    if not enabled:
        return lambda row: None
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="train", dynamic_ncols=True)

        def update(row):
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if bar.n >= total:
                bar.close()
        return update
    except ImportError:
        return lambda row: (row["step"] % 10 == 0 or row["step"] + 1 == total) and print(
            f"step {row['step']:5d}  loss {row['loss']:.4f}  tokens/s {row['tokens_per_s']:.0f}", flush=True)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
