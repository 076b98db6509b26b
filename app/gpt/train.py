"""Train Llama3 with RingX context parallelism.

    python app/gpt/train.py --config debug --steps 30                                  # 1 process
    torchrun --nproc_per_node 4 app/gpt/train.py --config debug --context_parallel 4 --attn ringX3
    srun -n8 bash -c "source script/setup_dist_vars.sh; python app/gpt/train.py --config llama3-8b-128k --context_parallel 8"

Ranks are laid out by ringX.parallel.ParallelDims (dp is the rest); each cp group splits every
sequence in the layout of --attn. Weights are sharded with FSDP2 over the dp x cp ranks
(--dp_engine fsdp, the default; float32 master weights and optimizer state, bf16 compute with
--dtype bfloat16; one such rank without activation checkpointing has nothing to shard or free
and copies its weights into bf16 once a step instead: app/common/precision.py), replicated with
summed gradients (--dp_engine allreduce, autocast for bf16), or DeepSpeed ZeRO stage 1/2 over
the whole job when deepspeed is installed (--dp_engine deepspeed --zero_stage N; not with tp;
app/gpt/deepspeed_engine.py); in every case gradients are summed over cp and averaged over dp.
--tensor_parallel T splits heads,
kv heads and the MLP over tp groups (app/gpt/tensor_parallel.py). The model is built on the meta
device and each rank fills only its own shards (from --hf_checkpoint or the seeded init).

Memory at long context: --ac {none,selective,full} activation checkpointing (selective recomputes
the feed-forward only), --loss_chunk N (the loss never makes more than N tokens of logits),
--mlp_chunk N (blockwise feed-forward), --offload_activations (saved activations in pinned CPU
memory).

Without --data the embedded passkey-retrieval task is used (byte tokens, the key in the first
quarter, the question at the end); --data takes a .npy / .bin token file. --pack_documents trains
on a packed corpus (python -m app.gpt.corpus, e.g. the Python standard library's own files): each
document attends only to itself through the ringX varlen functions, its RoPE positions restart at
0, no label crosses into the next document; metrics add docs_per_seq and padding (0: documents
are cut at window edges).

OUT/args.json records the settings of the run (a run preset's included). Metrics go to
OUT/metrics.jsonl, one object per step: step, loss, tokens_per_s (whole job),
tflops_per_gpu and mfu (model FLOPs per step = 6 * non-embedding params * tokens + 6 * layers *
dim * seq_len * tokens for causal attention, recomputation not counted, over --peak_tflops),
max_mem_gb, skipped (steps skipped so far for a non-finite loss or gradient); every --eval_every
steps and at the last step also passkey_acc (all five digits right, greedy) on held-out prompts.

Checkpoints (torch.distributed.checkpoint, atomic, see app/common/checkpoint.py) are written every
--checkpoint_every steps and at the end under OUT/checkpoints; --resume continues from the newest
complete one exactly (same data order, random state, optimizer and schedule).

Preemption: SIGTERM or SIGUSR1 (Slurm's --signal) lets the current step finish, writes a
checkpoint, writes OUT/preempted and exits 0; app/gpt/job.sb requeues the job, which resumes.
A non-finite loss or gradient norm is handled by --nan_policy: skip (the update is dropped and
counted; more than --max_nan_steps in a row stop the run) or stop (exit with an error at once,
no checkpoint written, the last good one kept).

--eval_only evaluates without training: the weights of --hf_checkpoint, or else the newest
checkpoint under OUT; writes OUT/eval.json (mean loss over --eval_batches batches, and passkey
accuracy on the passkey task).

--hf_checkpoint DIR starts from a local Hugging Face Llama checkpoint (its config.json sets the
architecture; see app/gpt/hf.py); --export_hf DIR writes the trained weights back in that format
(tensor-parallel slices and FSDP shards gathered).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.common import checkpoint  # noqa: E402
from app.common.optim import LocalShardAdamW  # noqa: E402
from app.common.precision import CastForCompute  # noqa: E402
from app.common.sharding import set_fsdp_divide_factor  # noqa: E402
from app.common.runtime import (NonFiniteSteps, RunLog, StopRequest, any_rank, every_and_last,  # noqa: E402
                                guarded_update, resume_lr, run_and_shut_down)
from app.common.presets import apply_run_settings, parse_overrides  # noqa: E402
from app.gpt.config import CONFIG_DIR, ModelConfig, load_preset, presets  # noqa: E402
from app.gpt.data import BYTE_VOCAB, PackedTokenFile, TokenFile, passkey_batch  # noqa: E402
from app.gpt.hf import config_from_hf, export_hf, hf_tensors  # noqa: E402
from app.common.profiling import device_time_summary, profiler  # noqa: E402
from app.gpt.kernels import KERNEL_CHOICES, Kernels, choose_kernels  # noqa: E402
from app.gpt.model import Llama, sdpa_causal  # noqa: E402
from app.gpt.parallelize import (AC_MODES, ATTN_CHOICES, DP_ENGINES, apply_activation_checkpointing,  # noqa: E402
                                 apply_fsdp, global_grad_norm, cp_attention, cp_loss, full_tensors,
                                 draw_positions, materialize, packed_attention, shard_batch,
                                 shard_positions)
from app.gpt import deepspeed_engine  # noqa: E402
from app.gpt.tensor_parallel import apply_tensor_parallel  # noqa: E402
from ringX.comm import GroupComm  # noqa: E402
from ringX.launch import init_distributed, leave  # noqa: E402
from ringX import expected_layout  # noqa: E402
from ringX.kernels import explain_choice, select_backend, select_band_backend  # noqa: E402
from ringX.parallel import ParallelDims, reduce_gradients  # noqa: E402


def _depth(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI fractions, got {text!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI <= 1, got {text!r}")
    return lo, hi


def extend_rope(cfg: ModelConfig, trained_len: int) -> ModelConfig:
    """``cfg`` with RoPE frequencies scaled from ``trained_len`` to ``cfg.seq_len`` tokens (Llama 3.1
    rule: wavelengths above trained_len divided by the factor, below trained_len / 4 kept)."""
    if not 0 < trained_len < cfg.seq_len:
        raise ValueError(f"--rope_scale_from {trained_len} must be positive and below seq_len {cfg.seq_len}")
    if cfg.rope_scaling != "none":
        raise ValueError(f"--rope_scale_from: the preset already scales RoPE ({cfg.rope_scaling})")
    return dataclasses.replace(cfg, rope_scaling="llama3", rope_factor=cfg.seq_len / trained_len,
                               rope_original_max_pos=trained_len, rope_low_freq_factor=1.0,
                               rope_high_freq_factor=4.0)


def model_config(args) -> ModelConfig:
    """The preset with its overrides, then the architecture of --hf_checkpoint, then the RoPE
    extension of --rope_scale_from (last, so that a checkpoint's own RoPE is what gets extended)."""
    cfg = load_preset(args.config, **{**parse_overrides(args.override, ModelConfig),
                                      **{k: v for k, v in (("seq_len", args.seq_len), ("n_layers", args.n_layers))
                                         if v is not None}})
    if args.hf_checkpoint:
        cfg = config_from_hf(args.hf_checkpoint, base=cfg)
    return extend_rope(cfg, args.rope_scale_from) if args.rope_scale_from else cfg


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="debug", help=f"preset: {', '.join(presets())}")
    p.add_argument("--context_parallel", type=int, default=1)
    p.add_argument("--context_parallel_inner", type=int, default=1,
                   help="two-level cp (ringX.hybrid): heads split by all-to-all over groups of this many "
                        "consecutive cp ranks (one node), --attn over the rest; must divide --context_parallel")
    p.add_argument("--tensor_parallel", type=int, default=1)
    p.add_argument("--parallel_order", default="tp-cp-dp")
    p.add_argument("--attn", choices=ATTN_CHOICES, default="ringX3")
    p.add_argument("--override", default=None, metavar="FIELD=VALUE,...",
                   help="set model fields of the preset (e.g. dim=64,n_layers=2: a run preset's parallel "
                        "and memory settings at a debug size)")
    p.add_argument("--seq_len", type=int, default=None, help="override the preset's seq_len")
    p.add_argument("--n_layers", type=int, default=None,
                   help="override the preset's depth (memory and time probes of a long sequence)")
    p.add_argument("--batch", type=int, default=1, help="sequences per dp rank per step")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--warmup_start", type=int, default=0, metavar="STEP",
                   help="the linear warm-up of --warmup steps begins at STEP (a curriculum stage resumed "
                        "from a checkpoint warms its rate up again; steps before STEP run at the full rate)")
    p.add_argument("--data", default=None, help=".npy/.bin token file (default: passkey task)")
    p.add_argument("--pack_documents", action="store_true",
                   help="--data is a packed corpus with its document index (python -m app.gpt.corpus): "
                        "each document attends only to itself (the ringX varlen functions), its "
                        "positions restart at 0, and no label crosses into the next document")
    p.add_argument("--hf_checkpoint", default=None, help="local Hugging Face Llama checkpoint to start from")
    p.add_argument("--export_hf", default=None, help="write the final weights as a Hugging Face checkpoint")
    p.add_argument("--eval_only", action="store_true", help="evaluate and exit (see above)")
    p.add_argument("--passkey_loss", choices=["all", "answer"], default="all",
                   help="passkey task: train on every next token, or on the answer digits only")
    p.add_argument("--passkey_depth", type=_depth, default=(0.0, 0.25), metavar="LO,HI",
                   help="passkey task: training key depth range as fractions of the context (held-out "
                        "accuracy always uses 0,0.25); a wide range such as 0,1 makes a position "
                        "shortcut useless, so retrieval learnt at one length carries to longer ones")
    p.add_argument("--random_positions", type=int, default=0, metavar="N",
                   help="training batches take S sorted distinct positions drawn from [0, N) instead of "
                        "0..S-1 (randomized positions: relative distances up to N seen at length S; "
                        "evaluation keeps the true positions)")
    p.add_argument("--rope_scale_from", type=int, default=0, metavar="N",
                   help="context extension: the model was trained at N tokens; scale its RoPE frequencies "
                        "for --seq_len by the Llama 3.1 rule (factor seq_len / N)")
    p.add_argument("--eval_batches", type=int, default=4)
    p.add_argument("--eval_prompts", type=int, default=16, help="held-out passkey prompts per evaluation")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--checkpoint_every", type=int, default=0, help="0: only at the end")
    p.add_argument("--no_checkpoint", action="store_true", help="write no checkpoints (benchmark runs)")
    p.add_argument("--eval_every", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--dp_engine", choices=DP_ENGINES + ("deepspeed",), default="fsdp")
    p.add_argument("--zero_stage", type=int, choices=deepspeed_engine.ZERO_STAGES, default=2,
                   help="--dp_engine deepspeed: ZeRO stage")
    p.add_argument("--ac", choices=AC_MODES, default="none", help="activation checkpointing")
    p.add_argument("--ac_layers", type=int, default=None,
                   help="checkpoint only the first N blocks (default: all): the others keep their activations "
                        "(faster, more memory at the start of the backward)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every transformer block (fullgraph: the ringX functions are custom ops)")
    p.add_argument("--compile_backend", default="inductor", help="torch.compile backend for --compile")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto",
                   help="RMSNorm, SwiGLU and linear cross-entropy: Liger-Kernel (liger), plain PyTorch (torch) or "
                        "auto (Liger where installed on CUDA; the path taken is printed)")
    p.add_argument("--loss_chunk", type=int, default=0, help="tokens per logits chunk in the torch loss (0: all)")
    p.add_argument("--mlp_chunk", type=int, default=0, help="tokens per feed-forward chunk (0: all)")
    p.add_argument("--offload_activations", action="store_true", help="keep saved activations in CPU memory")
    p.add_argument("--nan_policy", choices=["skip", "stop"], default="skip")
    p.add_argument("--max_nan_steps", type=int, default=10, help="skip policy: stop after this many in a row")
    p.add_argument("--inject_nan_at", type=int, default=-1, help="fault injection for testing: NaN loss at this step")
    p.add_argument("--profile_step", type=int, default=-1,
                   help="run this step under torch.profiler and print its device time by kind of kernel")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="per-GPU peak for MFU (H100/H200 bf16 dense)")
    p.add_argument("--out", default="runs/gpt")
    p.add_argument("--seed", type=int, default=0)
    apply_run_settings(p, CONFIG_DIR, argv)      # a run preset's flags, overridden by the command line
    return p.parse_args(argv)


def param_count(cfg: ModelConfig, embedding: bool = False) -> int:
    """Parameters of the whole (unsharded) model, without the input embedding unless asked."""
    hd = cfg.head_dim
    block = (2 * cfg.dim * cfg.n_heads * hd + 2 * cfg.dim * cfg.n_kv_heads * hd
             + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim)
    return cfg.n_layers * block + cfg.dim + cfg.vocab_size * cfg.dim * (2 if embedding else 1)


def step_flops(cfg: ModelConfig, tokens: int, doc_sq: float | None = None) -> float:
    """Model FLOPs of one training step over ``tokens`` tokens (causal attention counted half;
    with packed documents, ``doc_sq`` = the mean over sequences of the sum of squared document
    lengths: attention within documents only)."""
    attn_sq = cfg.seq_len * tokens if doc_sq is None else doc_sq * tokens / cfg.seq_len
    return 6.0 * param_count(cfg) * tokens + 6.0 * cfg.n_layers * cfg.dim * attn_sq


def build_model(args, cfg: ModelConfig, dims: ParallelDims, groups, device, kernels: Kernels) -> Llama:
    """The model for this rank: built on the meta device, split by TP, wrapped for activation
    checkpointing, sharded by FSDP2 (not on one unsharded rank: unsharded_one_rank), then filled
    with its own shards only."""
    with torch.device("meta"):
        model = Llama(cfg, mlp_chunk=args.mlp_chunk, loss_chunk=args.loss_chunk, kernels=kernels)
    apply_tensor_parallel(model, groups.tp)
    apply_activation_checkpointing(model, args.ac, args.ac_layers)
    if args.compile:                      # each block on its own (the attention is a custom op)
        for block in model.layers:        # in place: parameter names stay the plain model's
            block.compile(fullgraph=True, backend=args.compile_backend)
    if args.dp_engine == "fsdp" and not unsharded_one_rank(args, dims):
        from torch.distributed.device_mesh import DeviceMesh
        apply_fsdp(model, DeviceMesh.from_group(groups["dp_cp"], device.type), args.dtype == "bfloat16")
        set_fsdp_divide_factor(model, dims.dp, groups["dp_cp"])
    if args.hf_checkpoint:
        tensors = hf_tensors(args.hf_checkpoint, cfg)
    else:
        tensors = Llama.initial_tensors(cfg, torch.Generator(device).manual_seed(args.seed))
    return materialize(model, tensors, device, groups.tp)


def unsharded_one_rank(args, dims: ParallelDims) -> bool:
    """--dp_engine fsdp with one rank in the dp x cp group and no activation checkpointing: FSDP2
    would shard nothing and free nothing, only stage copies, so the model stays unwrapped and
    computes through app.common.precision.CastForCompute (float32 master weights, bf16 compute
    with --dtype bfloat16). Checkpointed runs keep FSDP2: it frees each block's bf16 weights
    between forward and backward."""
    return args.dp_engine == "fsdp" and dims.dp * dims.cp == 1 and args.ac == "none"


def check_two_level(args, cfg: ModelConfig, dims: ParallelDims) -> None:
    """What --context_parallel_inner > 1 (ringX.hybrid) needs, checked before anything is built."""
    ni, heads, kv = dims.cp_inner, cfg.n_heads // dims.tp, cfg.n_kv_heads // dims.tp
    if args.attn == "sdpa":
        raise ValueError("--context_parallel_inner splits a ringX function's heads; --attn sdpa has none to split")
    if heads % ni or (kv % ni and ni % kv):
        raise ValueError(f"--context_parallel_inner {ni}: the query heads per tp rank ({heads}) must divide by it "
                         f"and the kv heads ({kv}) must divide it or by it")
    if cfg.seq_len % ((2 if expected_layout(args.attn) == "zigzag" else 1) * dims.cp):
        raise ValueError(f"--seq_len {cfg.seq_len} must divide by {dims.cp} (by {2 * dims.cp} for {args.attn})")
    for flag, why in (("compile", "the hybrid's all-to-alls are not custom ops"),
                      ("pack_documents", "packed rows are not split by the two-level layout")):
        if getattr(args, flag, False):
            raise ValueError(f"--{flag} with --context_parallel_inner > 1: {why}; use one or the other")
    if args.ac == "attention":
        raise ValueError("--ac attention keeps the outputs of the ringx::attention op, which the hybrid does not "
                         "call; use --ac full or selective with --context_parallel_inner > 1")


@torch.no_grad()
def passkey_accuracy(model, attn_fn, cp_group, attn, device, seq_len, n=16, seed=12345, cp_inner=1) -> float:
    """Fraction of held-out prompts whose five answer digits are all predicted right."""
    tokens, labels, mask = passkey_batch(n, seq_len, torch.Generator().manual_seed(seed))
    tokens, labels, mask = tokens.to(device), labels.to(device), mask.to(device)
    tok, lab, pos = shard_batch(tokens, labels, attn, cp_group, cp_inner)
    _, msk, _ = shard_batch(tokens, mask.long(), attn, cp_group, cp_inner)
    wrong = torch.zeros(n, dtype=torch.float64, device=device)
    for i in range(n):                      # one prompt at a time: logits of one sequence only
        pred = model(tok[i:i + 1], pos, attn_fn).argmax(-1)
        wrong[i] = ((pred != lab[i:i + 1]) & msk[i:i + 1].bool()).sum()
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        dist.all_reduce(wrong, group=cp_group)
    return (wrong == 0).double().mean().item()


class Trainer:
    """One run: model, optimizer, data and bookkeeping for this rank."""

    def __init__(self, args):
        self.args = args
        self.info = info = init_distributed()
        self.dims = dims = ParallelDims(dp=-1, cp=args.context_parallel, tp=args.tensor_parallel,
                                        order=args.parallel_order, world_size=info.world_size,
                                        cp_inner=args.context_parallel_inner)
        self.groups = groups = dims.build(names=("cp", "tp", "dp", "dp_cp"))
        if args.attn == "sdpa" and dims.cp > 1:
            raise ValueError("--attn sdpa computes on the local tokens only: use a ringX function with --context_parallel > 1")
        cfg = model_config(args)
        if dims.cp_inner > 1:
            check_two_level(args, cfg, dims)
        if args.data is None and cfg.vocab_size < BYTE_VOCAB:
            raise ValueError(f"the passkey task needs vocab_size >= {BYTE_VOCAB}, preset has {cfg.vocab_size}")
        if args.compile and args.pack_documents:
            raise ValueError("--compile with --pack_documents would recompile every step (the document "
                             "boundaries change with each batch); use one or the other")
        if args.pack_documents and (args.data is None or args.attn == "sdpa" or args.random_positions):
            raise ValueError("--pack_documents needs --data (a corpus with its document index), a ringX "
                             "--attn and no --random_positions")
        if args.random_positions and args.random_positions < cfg.seq_len:
            raise ValueError(f"--random_positions {args.random_positions} is shorter than seq_len {cfg.seq_len}")
        self.cfg, self.device = cfg, info.device
        coords = dims.coords(info.rank)
        self.dp_rank, self.tp_rank = coords["dp"], coords["tp"]
        torch.manual_seed(args.seed)
        self.kernels = choose_kernels(args.kernels, self.device, args.compile, checkpointed=args.ac != "none")
        self.model = build_model(args, cfg, dims, groups, self.device, self.kernels)
        # what forward passes call: the model, or on an unsharded rank the model on bf16 copies
        bf16_cast = args.dtype == "bfloat16" and unsharded_one_rank(args, dims)
        self.compute = CastForCompute(self.model, torch.bfloat16) if bf16_cast else self.model
        fused = {"fused": True} if self.device.type == "cuda" else {}     # one kernel for the whole update
        # DeepSpeed checks the optimizer's class; FSDP's DTensor parameters update through their shards
        adamw = torch.optim.AdamW if args.dp_engine == "deepspeed" else LocalShardAdamW
        self.opt = adamw(self.model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, **fused)

        def schedule(s: int) -> float:           # linear warm-up from --warmup_start, then constant
            return 1.0 if s < args.warmup_start else min(1.0, (s - args.warmup_start + 1) / max(1, args.warmup))

        self.engine = None                        # DeepSpeed: runs forward, backward and the update
        if args.dp_engine == "deepspeed":
            self.engine, self.opt, self.sched = deepspeed_engine.initialize(self.model, self.opt, schedule, args)
        else:
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.attn_fn = sdpa_causal if args.attn == "sdpa" else cp_attention(
            args.attn, groups.cp, as_op=args.ac == "attention", inner=groups.cp_levels)
        self.data_cls = PackedTokenFile if args.pack_documents else TokenFile
        self.data = self.data_cls(args.data, cfg.seq_len, seed=args.seed + self.dp_rank) if args.data else None
        self.batch_attn = None                    # packed documents: this batch's attention
        self.docs_per_seq = self.doc_sq = None
        self.gen = torch.Generator().manual_seed(args.seed * 1000 + self.dp_rank)
        bf16_autocast = args.dtype == "bfloat16" and args.dp_engine == "allreduce"
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16_autocast else nullcontext()
        self.out = Path(args.out)
        self.ckpt_root = self.out / "checkpoints"
        self.flag_device = GroupComm(dist.group.WORLD).collective_device()
        self.is_root = info.rank == 0
        if self.is_root:                          # the settings this run used (run presets included)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "args.json").write_text(json.dumps(vars(args), indent=1, default=str) + "\n")

    def say(self, msg: str) -> None:
        if self.is_root:
            print(msg, flush=True)

    def _ckpt_kw(self) -> dict:
        files = deepspeed_engine.checkpoint_files(self.engine) if self.engine is not None else None
        return dict(tp_rank=self.tp_rank, tp=self.dims.tp, group=self.groups["dp_cp"], engine_files=files)

    def save(self, done: int) -> Path:
        return checkpoint.save(self.ckpt_root, done, self.model, self.opt, {
            "step": done, "sched": self.sched.state_dict(), "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(), "data": self.data.state() if self.data is not None else None,
        }, **self._ckpt_kw())

    def restore(self) -> int:
        path = checkpoint.latest(self.ckpt_root, log=self.say)
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.ckpt_root}")
        local = checkpoint.load(path, self.model, self.opt, **self._ckpt_kw())
        self.sched.load_state_dict(local["sched"])
        resume_lr(self.sched, self.opt, self.args.lr, self.say)
        torch.set_rng_state(local["torch_rng"])
        gen_state, data_state = self._shared_data_state(local["generator"], local["data"])
        self.gen.set_state(gen_state)
        if self.data is not None:
            self.data.load_state(data_state)
        self.say(f"resumed from {path} at step {local['step']}")
        return local["step"]

    def _shared_data_state(self, gen_state: torch.Tensor, data_state):
        """The data position this rank resumes from: that of the first rank of its cp group, then
        of its tp group. The ranks that split one sequence must draw the same batch; each rank's
        own saved state only agrees with theirs when the checkpoint was written under the same
        dp x cp x tp layout (a 512-token stage on dp=4 resumed as cp=4 would otherwise glue the
        shards of four different sequences into one)."""
        state = [gen_state, data_state]
        for name in ("cp", "tp"):
            group = self.groups[name]
            if dist.get_world_size(group) > 1:
                dist.broadcast_object_list(state, group=group, group_src=0)
        return state[0], state[1]

    def batch(self, gen=None, data=None):
        """This rank's (tokens, labels, positions) of the next global batch."""
        data = self.data if data is None else data
        if self.args.pack_documents:
            tokens, labels, positions, cus = data.next_packed(self.args.batch)
            tok, lab, _ = shard_batch(tokens.to(self.device), labels.to(self.device), self.args.attn, self.groups.cp)
            self.batch_attn = packed_attention(self.args.attn, self.groups.cp, cus, as_op=self.args.ac == "attention")
            self.docs_per_seq = sum(len(cu) - 1 for cu in cus) / len(cus)
            self.doc_sq = sum(sum((b - a) ** 2 for a, b in zip(cu, cu[1:])) for cu in cus) / len(cus)
            return tok, lab, shard_positions(positions.to(self.device), self.args.attn, self.groups.cp)
        if data is not None:
            tokens, labels = data.next_batch(self.args.batch)
        elif self.args.passkey_loss == "answer":
            tokens, labels, _ = passkey_batch(self.args.batch, self.cfg.seq_len, gen or self.gen,
                                              depth=self.args.passkey_depth)
        else:
            tokens, _, _ = passkey_batch(self.args.batch, self.cfg.seq_len + 1, gen or self.gen,
                                         depth=self.args.passkey_depth)
            tokens, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        tok, lab, pos = shard_batch(tokens.to(self.device), labels.to(self.device), self.args.attn, self.groups.cp,
                                    self.args.context_parallel_inner)
        if self.args.random_positions and gen is None:                # training batches only
            pos = self._random_positions(pos.device)
        return tok, lab, pos

    def _random_positions(self, device) -> torch.Tensor:
        """This rank's share of a draw of --random_positions positions (see parallelize)."""
        drawn = draw_positions(self.cfg.seq_len, self.args.random_positions, self.gen)
        return shard_positions(drawn, self.args.attn, self.groups.cp, self.args.context_parallel_inner).to(device)

    def forward_loss(self, tok, lab, pos):
        offload = (torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
                   if self.args.offload_activations and torch.is_grad_enabled() else nullcontext())
        with self.autocast, offload:
            local_sum = (self.engine or self.compute)(tok, pos, self.batch_attn or self.attn_fn, labels=lab)
        return cp_loss(local_sum, lab, self.groups.cp)

    def step(self, step: int, stop: StopRequest) -> tuple[dict, bool, bool]:
        """One optimizer step -> (metrics row, update skipped, stop requested)."""
        args, dims = self.args, self.dims
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        tok, lab, pos = self.batch()
        loss, global_loss = self.forward_loss(tok, lab, pos)
        if step == args.inject_nan_at:
            loss, global_loss = loss * float("nan"), global_loss * float("nan")
        mean_loss = global_loss.clone()
        if dims.dp > 1:
            dist.all_reduce(mean_loss, group=self.groups.dp)
            mean_loss /= dims.dp
        lr = self.opt.param_groups[0]["lr"]
        if self.engine is not None:
            loss_value = mean_loss.item()
            bad, norm_value, stop_now = self._deepspeed_update(loss, loss_value, stop)
        else:
            loss.backward()
            if self.compute is not self.model:        # CastForCompute: bf16 gradients into float32
                self.compute.grads_to_masters()
            if args.dp_engine == "allreduce":
                reduce_gradients(self.model, self.groups["dp_cp"], divide_by=dims.dp)
            norm = global_grad_norm(self.model, self.groups.tp, self.groups["dp_cp"])
            bad, stop_now = guarded_update(self.opt, self.sched, mean_loss, norm, stop.signum != 0, self.flag_device,
                                           clip_norm=1.0)      # clipped inside the fused update
            loss_value, norm_value = mean_loss.item(), norm.item()
            self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        tokens = self.cfg.seq_len * args.batch * dims.dp
        row = {"step": step, "loss": loss_value, "grad_norm": norm_value, "lr": lr,
               "tokens_per_s": tokens / seconds,
               "tflops_per_gpu": step_flops(self.cfg, tokens, self.doc_sq if args.pack_documents else None)
               / seconds / self.info.world_size / 1e12,
               "max_mem_gb": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None}
        row["mfu"] = row["tflops_per_gpu"] / args.peak_tflops
        if args.pack_documents:          # documents are cut at window edges: no padding tokens
            row.update(docs_per_seq=self.docs_per_seq, padding=0.0)
        return row, bad, stop_now

    def _deepspeed_update(self, loss, loss_value: float, stop: StopRequest) -> tuple[bool, float, bool]:
        """Backward and update through DeepSpeed -> (skipped, gradient norm, stop requested). A
        non-finite loss on any rank skips the whole step (DeepSpeed's update cannot be undone)."""
        bad, stop_now = any_rank([NonFiniteSteps.bad(loss_value, 0.0), stop.signum != 0], self.flag_device)
        if bad:
            return True, float("nan"), stop_now
        self.engine.backward(loss * self.dims.cp)      # DeepSpeed averages over dp x cp
        self.engine.step()
        return False, float(self.engine.get_global_grad_norm()), stop_now

    def evaluate(self) -> dict:
        """Mean loss over --eval_batches held-out batches (and passkey accuracy) -> OUT/eval.json."""
        args = self.args
        if not args.hf_checkpoint:
            self.restore()
        held_out = self.data_cls(args.data, self.cfg.seq_len, seed=args.seed + 10**6 + self.dp_rank) if args.data else None
        gen = torch.Generator().manual_seed(args.seed + 10**6 + self.dp_rank)
        self.model.eval()
        losses = []
        with torch.no_grad():
            for _ in range(args.eval_batches):
                _, global_loss = self.forward_loss(*self.batch(gen=gen, data=held_out))
                losses.append(global_loss)
        loss = torch.stack(losses).mean()
        if self.dims.dp > 1:
            dist.all_reduce(loss, group=self.groups.dp)
            loss /= self.dims.dp
        result = {"loss": loss.item(), "batches": args.eval_batches * self.dims.dp, "seq_len": self.cfg.seq_len}
        if args.data is None:
            with self.autocast:
                result["passkey_acc"] = passkey_accuracy(self.compute, self.attn_fn, self.groups.cp, args.attn,
                                                         self.device, self.cfg.seq_len, args.eval_prompts,
                                                         cp_inner=args.context_parallel_inner)
                result["passkey_prompts"] = args.eval_prompts
        if self.is_root:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "eval.json").write_text(json.dumps(result) + "\n")
        self.say(json.dumps(result))
        return result

    def weights_path(self) -> str:
        """How this rank holds its weights and computes with them (one line for the log)."""
        args, n = self.args, self.dims.dp * self.dims.cp
        if args.dp_engine != "fsdp":
            return f"{args.dp_engine} over {n} rank(s)"
        if unsharded_one_rank(args, self.dims):
            how = "bfloat16 copies made once a step" if self.compute is not self.model else "float32 compute"
            return f"unsharded on one rank without activation checkpointing (float32 masters, {how})"
        return f"FSDP2 over {n} rank(s) (float32 masters, {args.dtype} compute)"

    def train(self) -> list[dict]:
        args = self.args
        stop = StopRequest()
        first_step = self.restore() if args.resume else 0
        self.say(f"kernels: {self.kernels.describe()}")
        self.say(f"weights: {self.weights_path()}")
        if args.attn != "sdpa":          # the kernel for this rank's q/k shard (views, no memory)
            cfg, tp = self.cfg, self.dims.tp
            one = torch.empty(1, 1, cfg.n_heads // tp, cfg.head_dim, device=self.device, dtype=getattr(torch, args.dtype))
            q = one.expand(args.batch, cfg.seq_len // self.dims.cp, -1, -1)
            k = q[:, :, :max(1, cfg.n_kv_heads // tp)]
            line = f"attention kernel: {explain_choice(q, k)}"
            if args.pack_documents:      # the calls within documents run on the window kernel
                line += f"; document blocks: {select_band_backend(q, k, select_backend(q, k)).name}"
            self.say(line)
        nonfinite = NonFiniteSteps(args.nan_policy, args.max_nan_steps, self.ckpt_root, self.say)
        with RunLog(self.out, args.steps - first_step, self.is_root, args.resume) as log:
            for step in range(first_step, args.steps):
                with profiler(step == args.profile_step) as prof:
                    row, bad, stop_now = self.step(step, stop)
                if prof is not None:
                    table = self.out / f"profile_step{step}.txt" if self.is_root else None   # rank 0's kernels
                    self.say(device_time_summary(prof, self.cfg.seq_len * args.batch * self.dims.dp / row["tokens_per_s"],
                                                 table=table))
                nonfinite.count(bad, row)
                if self.data is None and every_and_last(step, args.eval_every, args.steps):
                    with self.autocast:
                        row["passkey_acc"] = passkey_accuracy(self.compute, self.attn_fn, self.groups.cp, args.attn,
                                                              self.device, self.cfg.seq_len, args.eval_prompts,
                                                              cp_inner=args.context_parallel_inner)
                log.record(row)
                nonfinite.enforce(step, bad, row)
                if stop_now:
                    path = self.save(step + 1)
                    log.preempted(step + 1)
                    self.say(f"stop requested by signal: checkpoint {path} written after step {step}; exiting")
                    return log.rows
                if (args.checkpoint_every and not args.no_checkpoint and (step + 1) % args.checkpoint_every == 0
                        and step + 1 < args.steps):
                    self.save(step + 1)
            if first_step < args.steps and not args.no_checkpoint:
                self.save(args.steps)
            if args.export_hf:
                tensors = full_tensors(self.model, self.groups.tp)
                if self.is_root:
                    export_hf(self.cfg, tensors, args.export_hf)
                else:
                    for _ in tensors:
                        pass
        return log.rows


def train(args) -> list[dict]:
    if args.dp_engine == "deepspeed":
        deepspeed_engine.check(args)
    trainer = Trainer(args)
    if args.eval_only:
        trainer.evaluate()
        return []
    return trainer.train()


def main(argv=None) -> int:
    return run_and_shut_down(train, parse(argv))


if __name__ == "__main__":
    leave(main())  # skips torch's exit-time teardown, which can abort a finished rank
