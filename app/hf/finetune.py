"""Fine-tune any local Hugging Face causal LM at long context with RingX context parallelism.

    torchrun --nproc_per_node 4 app/hf/finetune.py --model DIR --data TOKENS.npy --seq_len 32768 \\
        --context_parallel 4 --attn ringX3 --dtype bfloat16 --steps 100 --out runs/ft
    python app/hf/finetune.py --model DIR --data TOKENS.npy --seq_len 4096 --eval_only --out runs/ev
    srun -n8 bash -c "source script/setup_dist_vars.sh; python app/hf/finetune.py ... --context_parallel 4"

The model is loaded with ``attn_implementation="ringXk"`` (ringX.hf: transformers' public
attention registry), so its attention runs over the cp group; everything else is the model's
own code. Ranks form dp x cp (dp = world / cp); FSDP2 shards the float32 weights and AdamW state
over all of them, blocks compute in bf16 with ``--dtype bfloat16``, gradients are summed over cp
and averaged over dp. The loss is transformers' own (labels = input_ids, shifted inside) over
the whole sequence, exact over the group (ringX.hf.cp_loss).

Data: ``--data`` a 1-D token file (.npy or .bin, as app/gpt), windows of ``--seq_len`` tokens;
``--text FILE.jsonl`` (a "text" field per line) is tokenized first with the checkpoint's own
tokenizer into OUT/data.npy (+ its document index); ``--pack_documents`` gives each document
of a window its own positions from 0 (the attention keeps documents apart). Checkpoints every
``--checkpoint_every`` steps under OUT/checkpoints (exact resume with ``--resume``), SIGTERM /
SIGUSR1 write one and exit, OUT/metrics.jsonl has step, loss, tokens/s and memory per step,
``--export DIR`` writes the trained model back as a Hugging Face directory. ``--eval_only``
writes OUT/eval.json with "loss": transformers' loss of the first ``--seq_len`` tokens.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.common import checkpoint  # noqa: E402
from app.common.optim import LocalShardAdamW  # noqa: E402
from app.common.runtime import RunLog, StopRequest, any_rank, run_and_shut_down  # noqa: E402
from app.common.sharding import apply_fsdp, clip_grad_norm, set_fsdp_divide_factor  # noqa: E402
from app.gpt.data import PackedTokenFile, TokenFile  # noqa: E402
import ringX.hf  # noqa: E402
from ringX.comm import GroupComm  # noqa: E402
from ringX.launch import init_distributed, leave  # noqa: E402
from ringX.parallel import ParallelDims  # noqa: E402

DTYPES = ("float32", "bfloat16")
KERNEL_CHOICES = ("auto", "liger", "torch")


def apply_liger(model, request: str, device: torch.device) -> str:
    """Patch ``model`` (a transformers causal LM instance) with Liger-Kernel where ``request``
    ("auto", "liger", "torch") asks for it; returns the path taken, in words. "liger" raises
    when Liger cannot run here; "auto" falls back to the model's own code."""
    if request == "torch":
        return "torch (the model's own code)"
    why = None
    if device.type != "cuda":
        why = f"Liger-Kernel needs a CUDA device (this is {device.type})"
    else:
        try:
            from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
        except Exception as e:               # not installed, or no triton
            why = f"liger_kernel is not importable ({type(e).__name__}: {e})"
        else:
            if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
                why = f"Liger-Kernel has no kernels for model type {model.config.model_type!r}"
    if why:
        if request == "liger":
            raise SystemExit(f"--kernels liger: {why}; install liger-kernel or use --kernels torch")
        return f"torch (the model's own code; {why})"
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    return "liger (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy)"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a local Hugging Face causal LM (config.json + safetensors)")
    p.add_argument("--data", help="1-D token file (.npy or .bin)")
    p.add_argument("--text", help="instead of --data: a .jsonl with a 'text' field, tokenized with the model's tokenizer")
    p.add_argument("--seq_len", type=int, required=True)
    p.add_argument("--context_parallel", type=int, default=1)
    p.add_argument("--attn", choices=ringX.hf.NAMES, default="ringX3")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="runs/hf_finetune")
    p.add_argument("--eval_only", action="store_true")
    p.add_argument("--pack_documents", action="store_true", help="positions restart at each document (needs X.docs.npy)")
    p.add_argument("--batch", type=int, default=1, help="sequences per dp rank per step")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--grad_clip", type=float, default=1.0)
    p.add_argument("--ac", choices=("none", "full"), default="full", help="activation checkpointing of every layer")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                   help="liger: Liger-Kernel's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy (no logits "
                        "in training); torch: the model's own code; auto: liger where it is installed and "
                        "supports the model on a CUDA device, else torch (the run says which)")
    p.add_argument("--checkpoint_every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--export", default=None, help="write the final model here as a Hugging Face directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if (args.data is None) == (args.text is None):
        p.error("give one of --data TOKENS.npy or --text FILE.jsonl")
    if not (Path(args.model) / "config.json").exists():
        p.error(f"--model {args.model}: no config.json there (a local Hugging Face directory is needed)")
    return args


def tokenize_jsonl(model_dir: str, text: str, out: Path) -> Path:
    """Tokenize every line's "text" with the checkpoint's tokenizer (EOS after each document)
    into out (1-D int64 .npy) and its document index (out.docs.npy); returns out."""
    from transformers import AutoTokenizer
    from app.gpt.corpus import docs_path
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids, starts = [], [0]
    with open(text) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                doc = tok(json.loads(line)["text"])["input_ids"] + ([tok.eos_token_id] if tok.eos_token_id is not None else [])
                ids.extend(doc)
                starts.append(len(ids))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, np.asarray(ids, dtype=np.int64))
    np.save(docs_path(out), np.asarray(starts, dtype=np.int64))
    return out


class Run:
    """One fine-tuning or evaluation run on this rank."""

    def __init__(self, args):
        from transformers import AutoModelForCausalLM
        from torch.distributed.device_mesh import DeviceMesh
        self.args = args
        self.info = info = init_distributed()
        self.dims = dims = ParallelDims(dp=-1, cp=args.context_parallel, tp=1, order="cp-tp-dp",
                                        world_size=info.world_size)
        self.groups = dims.build(names=("cp", "dp", "dp_cp"))
        self.device, self.is_root = info.device, info.rank == 0
        self.flag_device = GroupComm(dist.group.WORLD).collective_device()
        self.out = Path(args.out)
        data = args.data
        if args.text:
            data = self.out / "data.npy"
            if self.is_root:
                tokenize_jsonl(args.model, args.text, data)
            dist.barrier()
        self.dp_rank = dims.coords(info.rank)["dp"]
        cls = PackedTokenFile if args.pack_documents else TokenFile
        self.data = cls(data, args.seq_len, seed=args.seed + self.dp_rank)
        ringX.hf.register()
        model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation=args.attn, dtype=torch.float32)
        self.config = model.config
        self.kernels = apply_liger(model, args.kernels, self.device)
        self.fused_loss = self.kernels.startswith("liger")
        self.say(f"kernels: {self.kernels}")
        if args.ac == "full" and not args.eval_only:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.to(self.device)
        tied = getattr(model.config, "tie_word_embeddings", False)
        units = () if tied else ((model.get_input_embeddings(), True),
                                 ([model.model.norm, model.get_output_embeddings()], False))
        apply_fsdp(model, model.model.layers, DeviceMesh.from_group(self.groups["dp_cp"], self.device.type),
                   args.dtype == "bfloat16", units=units)
        set_fsdp_divide_factor(model, dims.dp, self.groups["dp_cp"])
        self.model = model
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.opt = LocalShardAdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, **fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))

    def say(self, msg: str) -> None:
        if self.is_root:
            print(msg, flush=True)

    def loss(self, tokens, positions=None):
        """(loss to back-propagate on this rank, the global mean loss detached) of (b, S) tokens."""
        batch = ringX.hf.shard_inputs(tokens.to(self.device), self.args.attn, self.groups.cp,
                                      None if positions is None else positions.to(self.device), pad_id=0)
        if self.fused_loss and self.model.training:
            return self.fused_cp_loss(batch)
        logits = self.model(**batch.model_inputs()).logits
        return ringX.hf.cp_loss(logits, batch.shift_labels, self.groups.cp)

    def fused_cp_loss(self, batch):
        """Liger's fused linear cross-entropy (no logits): the model sums its rank's token losses
        and divides by the labelled tokens of the whole cp group (``num_items_in_batch``), the
        term cp_loss back-propagates; their sum over the group is the global mean."""
        count = (batch.shift_labels != -100).sum().double()
        cp = self.groups.cp
        if dist.get_world_size(cp) > 1:
            dist.all_reduce(count, group=cp)
        loss = self.model(**batch.model_inputs(), shift_labels=batch.shift_labels,
                          num_items_in_batch=count.clamp(min=1).float(), accum_dtype=torch.float32).loss
        mean = loss.detach().clone()
        if dist.get_world_size(cp) > 1:
            dist.all_reduce(mean, group=cp)
        return loss, mean

    def next_batch(self):
        if self.args.pack_documents:
            tokens, _, positions, _ = self.data.next_packed(self.args.batch)
            return tokens, positions
        return self.data.next_batch(self.args.batch)[0], None

    def evaluate(self) -> dict:
        self.model.eval()
        tokens = torch.from_numpy(np.array(self.data.tokens[:self.args.seq_len], dtype=np.int64))[None]
        with torch.no_grad():
            _, mean = self.loss(tokens)
        result = {"loss": float(mean), "tokens": self.args.seq_len, "model": self.args.model}
        if self.is_root:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "eval.json").write_text(json.dumps(result) + "\n")
        self.say(json.dumps(result))
        return result

    def step(self, step: int) -> dict:
        dev = self.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        tokens, positions = self.next_batch()
        loss, mean = self.loss(tokens, positions)
        loss.backward()
        norm = clip_grad_norm(self.model, self.args.grad_clip, None, self.groups["dp_cp"], lambda n: False)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.dims.dp > 1:
            dist.all_reduce(mean, group=self.groups.dp)
            mean /= self.dims.dp
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
        return {"step": step, "loss": float(mean), "grad_norm": float(norm), "lr": self.sched.get_last_lr()[0],
                "tokens_per_s": self.args.seq_len * self.args.batch * self.dims.dp / seconds,
                "max_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None}

    def save(self, done: int) -> Path:
        return checkpoint.save(self.out / "checkpoints", done, self.model, self.opt,
                               {"data": self.data.state(), "sched": self.sched.state_dict()},
                               group=self.groups["dp_cp"])

    def restore(self) -> int:
        path = checkpoint.latest(self.out / "checkpoints", log=self.say)
        if path is None:
            self.say("--resume: no checkpoint yet, starting at step 0")
            return 0
        local = checkpoint.load(path, self.model, self.opt, group=self.groups["dp_cp"])
        self.data.load_state(local["data"])
        self.sched.load_state_dict(local["sched"])
        step = json.loads((path / checkpoint.MANIFEST).read_text())["step"]
        self.say(f"resumed from {path} at step {step}")
        return step

    def export(self, path: str) -> None:
        """Gather the full float32 weights and write them as a Hugging Face directory (with the
        source directory's tokenizer files)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from transformers import AutoModelForCausalLM
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_root:
            plain = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
            plain.load_state_dict(full)
            plain.config._attn_implementation = "sdpa"
            plain.save_pretrained(path, safe_serialization=True)
            for f in Path(self.args.model).glob("*token*"):
                shutil.copy(f, Path(path) / f.name)
            self.say(f"exported to {path}")
        dist.barrier()

    def train(self) -> list[dict]:
        args = self.args
        stop = StopRequest()
        first = self.restore() if args.resume else 0
        self.model.train()
        with RunLog(self.out, args.steps - first, self.is_root, args.resume) as log:
            for step in range(first, args.steps):
                log.record(self.step(step))
                stop_now = any_rank([stop.signum != 0], self.flag_device)[0]
                done = step + 1
                if stop_now or (args.checkpoint_every and done % args.checkpoint_every == 0):
                    path = self.save(done)
                    if stop_now:
                        self.say(f"stop requested by signal: checkpoint {path} written after step {step}; exiting")
                        log.preempted(done)
                        return log.rows
        if args.export:
            self.export(args.export)
        return log.rows


def run(args) -> None:
    r = Run(args)
    r.evaluate() if args.eval_only else r.train()


def main(argv=None) -> int:
    return run_and_shut_down(run, parse(argv))


if __name__ == "__main__":
    leave(main())  # skips torch's exit-time teardown, which can abort a finished rank
