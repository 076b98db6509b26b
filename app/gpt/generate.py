"""Generate from a Llama with context parallelism: ring prefill into a sequence-sharded KV cache,
then exact decoding from it (ringX.inference).

    torchrun --nproc_per_node 4 app/gpt/generate.py --hf_checkpoint DIR --prompt_ids P.npy \\
        --max_new_tokens 64 --context_parallel 4 --attn ringX3 --dtype bfloat16 --out OUT
    srun -n4 bash -c "source script/setup_dist_vars.sh; python app/gpt/generate.py ..."
    mpirun -n 4 python app/gpt/generate.py ...

``--prompt_ids``: an int64 .npy of shape (batch, prompt_len); prompt_len need not divide by
anything (the last prefill chunk is padded at its end; causal attention keeps the padding out
of every real token, and its keys never enter the cache); with ``--pad_id P`` rows are
left-padded prompts of different lengths (each length is generated exactly, as its own batch). ``--prefill_chunk N`` prefills N
tokens at a time (each chunk attends causally to itself and fully to the cache). Greedy unless
``--temperature`` > 0 (then ``--top_p`` and ``--seed``: every rank draws the same numbers, and
rank 0's token is broadcast). Every rank holds the whole model (weights replicated) and 1/N of
the cache. Writes OUT/generated.json: "tokens" (the new ids per prompt), "prefill_seconds",
"decode_ms_per_token", "peak_memory_gb" (per GPU, max over ranks), and the settings.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.common import checkpoint  # noqa: E402
from app.common.runtime import run_and_shut_down  # noqa: E402
from app.gpt.data import EOT, encode_bytes  # noqa: E402
from app.gpt.config import load_preset  # noqa: E402
from app.gpt.hf import config_from_hf, load_hf  # noqa: E402
from app.gpt.model import Llama, rope_angles, sdpa_causal  # noqa: E402
from ringX import ATTN_FUNCS, expected_layout  # noqa: E402
from ringX.inference import (ShardedKVCache, StaticDecode, chunk_layout, decode_attention,  # noqa: E402
                             prefill_attention)
from ringX.launch import init_distributed, leave  # noqa: E402
from ringX.layout import shard  # noqa: E402
from ringX.parallel import ParallelDims  # noqa: E402
from app.gpt.tensor_parallel import apply_tensor_parallel  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class _PerLayer:
    """The model's attention function for one forward pass: calls ``fn(q, k, v, layer)`` with
    the index of the layer calling it (the model calls its layers in order)."""

    def __init__(self, fn):
        self.fn, self.layer = fn, 0

    def __call__(self, q, k, v):
        out = self.fn(q, k, v, self.layer)
        self.layer += 1
        return out


def pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """(batch, vocab) float32 logits -> (batch,) token ids: argmax, or a draw from the softmax at
    ``temperature`` restricted to the smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double().cpu() / temperature, dim=-1)
    if top_p < 1.0:
        p_sorted, idx = probs.sort(dim=-1, descending=True)
        drop = p_sorted.cumsum(-1) - p_sorted >= top_p
        probs = probs.scatter(-1, idx, p_sorted.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=gen).flatten().to(logits.device)


def _layer_qkv(block, x, cos, sin):
    """A block's rotated q, k, v of x (b, 1, dim) (its attention's input half)."""
    return block.attention.project(block.attention_norm(x), cos, sin)


def _layer_finish(block, x, out):
    """The rest of a block after its attention: out (b, 1, h, d) -> the block's output (b, 1, dim)."""
    b, s, _ = x.shape
    x = x + block.attention.wo(out.reshape(b, s, -1))
    return x + block.feed_forward(block.ffn_norm(x))


def local_kv_heads(model: Llama) -> int:
    """The kv heads of this rank's attention (all of them, or its tensor-parallel share)."""
    wk = next(m for name, m in model.named_modules() if name.endswith("attention.wk")
              or name.endswith("attention.inner.wk"))
    return wk.weight.shape[0] // model.cfg.head_dim


class GraphStep:
    """One decode step of ``model`` at world size 1 (CUDA) captured in a CUDA graph on its first
    use and replayed for every later token: the token, its position and the cache fill are
    copied into fixed device tensors, the attention is ringX.inference.StaticDecode. The first
    step runs the same code eagerly (on a side stream, as capture wants) and gives its logits.

    ``compiled``: each block's two halves around the attention go through torch.compile (one
    compiled graph for every layer), which fuses the norms, RoPE, SwiGLU and residual adds: a
    step of Llama3-8B otherwise replays about a thousand small elementwise kernels."""

    def __init__(self, model: Llama, cache: ShardedKVCache, batch: int, device, compiled: bool = False):
        self.model, self.cache = model, cache
        self.static = StaticDecode(cache, batch, device)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = self.logits = None
        wrap = (lambda f: torch.compile(f, fullgraph=True, dynamic=False)) if compiled else (lambda f: f)
        self.qkv, self.finish = wrap(_layer_qkv), wrap(_layer_finish)

    def _forward(self) -> torch.Tensor:
        m, cfg = self.model, self.model.cfg
        cos, sin = rope_angles(self.pos, cfg.head_dim, cfg.rope_theta, cfg)
        x = m.tok_embeddings(self.tok)
        for i, block in enumerate(m.layers):
            q, k, v = self.qkv(block, x, cos, sin)
            x = self.finish(block, x, self.static.attention(q, k, v, i))
        return m.output(m.norm(x)[:, -1]).float()

    def step(self, tok: torch.Tensor, position: int) -> torch.Tensor:
        """tok (batch,) at ``position`` -> logits (batch, vocab) float32 of the next token."""
        self.tok.copy_(tok[:, None])
        self.pos.fill_(position)
        self.static.set_fill(self.cache.lengths[0])
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            first = self._forward()                 # runs the step (and warms the kernels)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):          # records the same step; replayed from now on
            self.logits = self._forward()
        return first


@torch.no_grad()
def generate(model: Llama, prompt: torch.Tensor, max_new_tokens: int, attn: str, group=None,
             prefill_chunk: int = 0, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             keep_logits: bool = False, cuda_graph: bool = False, compiled: bool = False) -> dict:
    """Prompt (batch, P) int64 (the same on every rank) -> {"tokens": (batch, max_new_tokens),
    "logits": [(batch, vocab) float32 per new token] if keep_logits, "prefill_seconds",
    "decode_seconds" (every model step of the decode), "decode_first_seconds" (its first step:
    with ``cuda_graph`` also the capture), "cache": the ShardedKVCache}. ``cuda_graph``: decode
    steps replay one CUDA graph (world size 1 on CUDA, see GraphStep); ``compiled``: its blocks
    compiled."""
    n = dist.get_world_size(group) if dist.is_initialized() else 1
    r = dist.get_rank(group) if dist.is_initialized() else 0
    cfg, device = model.cfg, prompt.device
    dtype = next(model.parameters()).dtype
    fn, layout = ATTN_FUNCS[attn], expected_layout(attn)
    parts = 2 * n if layout == "zigzag" else n
    b, p_len = prompt.shape
    chunk = math.ceil((prefill_chunk or p_len) / parts) * parts
    cap = math.ceil(p_len / n) + parts + math.ceil(max_new_tokens / n) + 1
    cache = ShardedKVCache.empty(cfg.n_layers, b, cap, local_kv_heads(model), cfg.head_dim, r, n, dtype, device)
    gen = torch.Generator().manual_seed(seed)
    logits_kept, tokens = [], []

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    for c0 in range(0, p_len, chunk):                        # ---- prefill, chunk by chunk
        real = min(chunk, p_len - c0)
        size = math.ceil(real / parts) * parts
        toks = torch.zeros(b, size, dtype=prompt.dtype, device=device)
        toks[:, :real] = prompt[:, c0:c0 + real]
        pos, real_rows = chunk_layout(layout, size, real, r, n, device=device)
        layer_fn = _PerLayer(lambda q, k, v, layer: prefill_attention(fn, q, k, v, cache, layer, real_rows, group))
        h = model.hidden(shard(toks, layout, r, n), pos + c0, layer_fn)
        cache.advance([int(chunk_layout(layout, size, real, j, n)[1].sum()) for j in range(n)])
    last = (pos == real - 1).nonzero().flatten()             # the prompt's last token, on one rank
    owner = [j for j in range(n) if bool((chunk_layout(layout, size, real, j, n)[0] == real - 1).any())][0]
    logits = torch.empty(b, cfg.vocab_size, dtype=torch.float32, device=device)
    if r == owner:
        logits.copy_(model.output(h[:, last[0]]).float())
    if n > 1:
        dist.broadcast(logits, src=dist.get_global_rank(group, owner) if group is not None else owner, group=group)
    sync()
    prefill_s = time.perf_counter() - start
    start, first_s = time.perf_counter(), 0.0
    graph = GraphStep(model, cache, b, device, compiled) if cuda_graph else None
    for step in range(max_new_tokens):                      # ---- decode
        tok = pick(logits, temperature, top_p, gen)
        if n > 1:
            dist.broadcast(tok, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        tokens.append(tok)
        if keep_logits:
            logits_kept.append(logits.clone())
        if step == max_new_tokens - 1:
            break
        if graph is not None:
            logits = graph.step(tok, p_len + step)
        else:
            layer_fn = _PerLayer(lambda q, k, v, layer: decode_attention(q, k, v, cache, layer, group))
            h = model.hidden(tok[:, None], torch.full((1,), p_len + step, dtype=torch.long, device=device), layer_fn)
            logits = model.output(h[:, -1]).float()
        cache.advance_decoded()
        if step == 0:
            sync()
            first_s = time.perf_counter() - start
    sync()
    return {"tokens": torch.stack(tokens, dim=1), "logits": logits_kept, "prefill_seconds": prefill_s,
            "decode_seconds": time.perf_counter() - start, "decode_first_seconds": first_s, "cache": cache}


def _sdpa_causal_expanded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA of (b, s, h, d) tensors with k/v expanded to every head, so float32 inputs
    take the memory-efficient kernel (with grouped k/v SDPA falls back to the math kernel,
    which makes the (s, s) scores: 128 GB at 32K tokens)."""
    group = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)


@torch.no_grad()
def dense_logits(model: Llama, prompt: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The logits (batch, vocab) float32 of every generation step from one forward of the whole
    prompt (batch, P) + new tokens (batch, N) with plain attention."""
    p_len = prompt.shape[1]
    seq = torch.cat([prompt, tokens[:, :-1]], dim=1)
    attn = _sdpa_causal_expanded if next(model.parameters()).dtype == torch.float32 else sdpa_causal
    h = model.hidden(seq, torch.arange(seq.shape[1], device=seq.device), attn)[:, p_len - 1:]
    return [model.output(h[:, i]).float() for i in range(tokens.shape[1])]


def _rel_errs(steps: list[torch.Tensor], refs: list[torch.Tensor]) -> list[float]:
    """max |a - b| / max |b| per step."""
    return [float((a - b).abs().max() / b.abs().max()) for a, b in zip(steps, refs)]


@torch.no_grad()
def dense_check(model: Llama, prompt: torch.Tensor, res: dict, fp32: bool = False) -> dict:
    """How far the generation's logits of every step are from one dense forward of the whole
    prompt + new tokens in the model's dtype (the largest relative difference, max |a - b| /
    max |b| per step). With ``fp32``, also both against a float32 copy of the model: the
    generation's error and plain attention's own error in the model's dtype."""
    ref = dense_logits(model, prompt, res["tokens"])
    errs = _rel_errs(res["logits"], ref)
    out = {"dense_logits_max_rel_err": max(errs), "dense_logits_rel_err_per_step": errs}
    if fp32 and next(model.parameters()).dtype != torch.float32:
        import copy
        model32 = copy.deepcopy(model).float()
        ref32 = dense_logits(model32, prompt, res["tokens"])
        del model32
        out["fp32_logits_max_rel_err"] = max(_rel_errs(res["logits"], ref32))
        out["dense_vs_fp32_max_rel_err"] = max(_rel_errs(ref, ref32))
    return out


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf_checkpoint", help="a local Hugging Face Llama directory")
    p.add_argument("--checkpoint", metavar="RUN",
                   help="instead of --hf_checkpoint: the newest checkpoint of an app/gpt/train.py run directory")
    p.add_argument("--config", help="instead of --hf_checkpoint: a model preset with random weights (speed runs)")
    p.add_argument("--n_layers", type=int, default=0, help="with --config: cut the depth (0: the preset's)")
    p.add_argument("--prompt_ids", help="int64 .npy of shape (batch, prompt_len)")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help="instead of --prompt_ids: a text prompt, byte-tokenized (the app's own models)")
    p.add_argument("--random_prompt", default=None, metavar="B,P",
                   help="instead of --prompt_ids: B random prompts of P tokens (speed runs)")
    p.add_argument("--hbm_gb_s", type=float, default=4800.0,
                   help="memory bandwidth per GPU for the decode bound (H200: 4800)")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--context_parallel", type=int, default=1)
    p.add_argument("--tensor_parallel", type=int, default=1,
                   help="heads and SwiGLU width split over this many ranks (world = cp x tp; tp fastest)")
    p.add_argument("--attn", choices=tuple(ATTN_FUNCS), default="ringX3")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--prefill_chunk", type=int, default=0, help="prompt tokens per prefill chunk (0: all at once)")
    p.add_argument("--pad_id", type=int, default=None,
                   help="prompts are left-padded with this id: each row's leading pads are dropped and "
                        "prompts of each real length are generated together")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check_dense", action="store_true",
                   help="also run one dense forward over prompt + new tokens on rank 0 and report how far "
                        "the logits of every step are from it (the whole sequence must fit one GPU)")
    p.add_argument("--check_fp32", action="store_true",
                   help="with --check_dense: also compare the generation and the dense forward with a float32 "
                        "copy of the model (both errors of a bfloat16 run, side by side)")
    p.add_argument("--cuda_graph", choices=("auto", "on", "off"), default="auto",
                   help="replay each decode step as one CUDA graph (world size 1 on CUDA; auto: there)")
    p.add_argument("--compile", action="store_true",
                   help="with a decode graph: torch.compile each block's halves around the attention "
                        "(fused norms, RoPE, SwiGLU; compiles on the first step)")
    p.add_argument("--repeat", type=int, default=1,
                   help="generate this many times and report the last (speed runs: the first warms the kernels)")
    p.add_argument("--out", default="runs/generate")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max_new_tokens must be >= 1")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.check_dense and args.tensor_parallel > 1:
        p.error("--check_dense runs the whole model on one rank; it needs --tensor_parallel 1")
    if args.check_fp32 and not args.check_dense:
        p.error("--check_fp32 needs --check_dense")
    if sum(x is not None for x in (args.hf_checkpoint, args.checkpoint, args.config)) != 1:
        p.error("give one of --hf_checkpoint DIR, --checkpoint RUN or --config PRESET")
    if sum(x is not None for x in (args.prompt_ids, args.prompt, args.random_prompt)) != 1:
        p.error("give one of --prompt_ids FILE.npy, --prompt TEXT or --random_prompt B,P")
    if args.prompt is not None and args.hf_checkpoint is not None:
        p.error("--prompt TEXT is byte-tokenized for the app's own models (--checkpoint RUN); "
                "tokenize it with the checkpoint's tokenizer into --prompt_ids for --hf_checkpoint")
    return args


def run_checkpoint(run: str):
    """(ModelConfig, newest checkpoint path) of an app/gpt/train.py run directory."""
    import argparse as _argparse
    from app.gpt.train import model_config
    run = Path(run)
    if not (run / "args.json").exists():
        raise SystemExit(f"--checkpoint {run}: no args.json there (the output directory of app/gpt/train.py)")
    settings = json.loads((run / "args.json").read_text())
    if settings.get("tensor_parallel", 1) != 1:
        raise SystemExit(f"--checkpoint {run}: trained with tensor parallelism {settings['tensor_parallel']}; "
                         "generation loads tp = 1 checkpoints (export it with --export_hf, then --hf_checkpoint)")
    path = checkpoint.latest(run / "checkpoints", log=lambda m: None)
    if path is None:
        raise SystemExit(f"--checkpoint {run}: no complete checkpoint under {run / 'checkpoints'}")
    return model_config(_argparse.Namespace(**settings)), path


def length_groups(prompt: np.ndarray, pad_id: int | None) -> list[tuple[list[int], int]]:
    """(rows, real length) groups of a (batch, P) prompt array: without ``pad_id`` one group of
    every row at P; with it each row's leading pad tokens are not part of its prompt."""
    if pad_id is None:
        return [(list(range(prompt.shape[0])), prompt.shape[1])]
    real = prompt.shape[1] - np.argmax(prompt != pad_id, axis=1)
    real[(prompt == pad_id).all(axis=1)] = 0
    if (real == 0).any():
        raise SystemExit(f"--pad_id {pad_id}: rows {np.flatnonzero(real == 0).tolist()} hold no prompt token")
    return [(np.flatnonzero(real == n).tolist(), int(n)) for n in sorted(set(real.tolist()))]


def decode_bound_s(model: Llama, batch: int, context: int, cp: int, hbm_gb_s: float) -> float:
    """The memory-bandwidth bound of one decode step on one rank: every weight this rank holds
    (all, or its tensor-parallel share) and its 1/cp of the cache (keys and values of its kv
    heads, every layer, at ``context`` tokens) read once, at ``hbm_gb_s``."""
    cfg = model.cfg
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    itemsize = next(model.parameters()).element_size()
    cache = 2 * cfg.n_layers * batch * math.ceil(context / cp) * local_kv_heads(model) * cfg.head_dim * itemsize
    return (weights + cache) / (hbm_gb_s * 1e9)


def main(argv=None) -> int:
    return run_and_shut_down(run, parse(argv))


def run(args) -> None:
    if args.prompt_ids is not None:
        prompt_np = np.load(args.prompt_ids)
        if prompt_np.ndim != 2 or prompt_np.dtype.kind not in "iu" or prompt_np.shape[1] < 1:
            raise SystemExit(f"--prompt_ids {args.prompt_ids}: expected an integer array (batch, prompt_len), "
                             f"got {prompt_np.dtype} {prompt_np.shape}")
    info = init_distributed()
    cp, tp = args.context_parallel, args.tensor_parallel
    if info.world_size != cp * tp:
        raise SystemExit(f"--context_parallel {cp} x --tensor_parallel {tp} needs exactly {cp * tp} ranks "
                         f"(this job has {info.world_size})")
    pgroups = ParallelDims(dp=-1, cp=cp, tp=tp, order="tp-cp-dp", world_size=info.world_size).build(names=("cp", "tp"))
    if args.hf_checkpoint:
        cfg = config_from_hf(args.hf_checkpoint)
    elif args.checkpoint:
        cfg, ckpt = run_checkpoint(args.checkpoint)
    else:
        cfg = load_preset(args.config, **({"n_layers": args.n_layers} if args.n_layers else {}))
    if args.prompt is not None:
        prompt_np = np.asarray([encode_bytes(args.prompt)[:-1]], dtype=np.int64)     # no end-of-text
    if args.random_prompt is not None:
        b, p_len = (int(x) for x in args.random_prompt.split(","))
        prompt_np = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (b, p_len))
    if int(prompt_np.max()) >= cfg.vocab_size or int(prompt_np.min()) < 0:
        raise SystemExit(f"--prompt_ids: token ids must lie in [0, {cfg.vocab_size})")
    device = info.device
    with torch.device("meta"):
        model = Llama(cfg)
    model = model.to_empty(device=device)
    if args.hf_checkpoint:
        load_hf(model, args.hf_checkpoint)
    elif args.checkpoint:
        checkpoint.load_model(ckpt, model, group=dist.group.WORLD)
    else:
        model.init_weights(torch.Generator(device).manual_seed(args.seed))
    apply_tensor_parallel(model, pgroups.tp)          # heads and SwiGLU width split over tp (tp > 1)
    model = model.to(DTYPES[args.dtype]).eval()
    prompt = torch.from_numpy(prompt_np.astype(np.int64)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tokens = torch.empty(prompt.shape[0], args.max_new_tokens, dtype=torch.long, device=device)
    prefill_s = decode_s = first_s = 0.0
    dense_errs, fp32_errs = [], {}
    groups = length_groups(prompt_np, args.pad_id)
    why_not = ("a CUDA device" if device.type != "cuda" else
               f"world size 1 (this job has {info.world_size})" if info.world_size != 1 else "")
    if args.cuda_graph == "on" and why_not:
        raise SystemExit(f"--cuda_graph on: a decode graph needs {why_not}; use --cuda_graph auto or off")
    graphs = args.cuda_graph != "off" and not why_not
    if args.compile and not graphs:
        raise SystemExit("--compile compiles the decode graph's blocks; it needs a decode graph "
                         f"({why_not or '--cuda_graph is off'})")
    decode_path = f"one CUDA graph per step{', compiled blocks' if args.compile else ''}" if graphs else \
        "eager" + (f" (a CUDA graph needs {why_not})" if why_not and args.cuda_graph == "auto" else "")
    if info.rank == 0:
        print(f"decode: {decode_path}", flush=True)
    for rows, length in groups:   # left-padded prompts: by real length
        part = prompt[torch.as_tensor(rows, device=device)][:, -length:]
        for _ in range(args.repeat):
            res = None                                  # the previous run's cache goes first
            res = generate(model, part, args.max_new_tokens, args.attn, pgroups.cp, args.prefill_chunk,
                           args.temperature, args.top_p, args.seed, keep_logits=args.check_dense,
                           cuda_graph=graphs, compiled=args.compile)
        tokens[torch.as_tensor(rows, device=device)] = res["tokens"]
        prefill_s, decode_s = prefill_s + res["prefill_seconds"], decode_s + res["decode_seconds"]
        first_s += res["decode_first_seconds"]
        if args.check_dense and info.rank == 0:
            check = dense_check(model, part, res, fp32=args.check_fp32)
            dense_errs += check.pop("dense_logits_rel_err_per_step")
            check.pop("dense_logits_max_rel_err")
            for key, err in check.items():
                fp32_errs[key] = max(fp32_errs.get(key, 0.0), err)
    res.update(tokens=tokens, prefill_seconds=prefill_s, decode_seconds=decode_s, decode_first_seconds=first_s)
    dense = {"dense_logits_max_rel_err": max(dense_errs), "dense_logits_rel_err_per_step": dense_errs,
             **fp32_errs} if dense_errs else {}
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0],
                        device=device if info.backend == "nccl" else "cpu")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if info.rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        new = args.max_new_tokens
        result = {"tokens": res["tokens"].cpu().tolist(),
                  **({"text": [bytes(t for t in (row + [EOT])[:(row + [EOT]).index(EOT)] if t < 256).decode("utf-8", "replace")
                               for row in res["tokens"].cpu().tolist()]} if args.prompt is not None else {}), "prefill_seconds": res["prefill_seconds"],
                  "prefill_tokens_per_s": sum(len(rows) * n for rows, n in groups) / res["prefill_seconds"],
                  # per token after the first step (which also warms up and, with graphs, captures)
                  "decode_ms_per_token": 1e3 * (res["decode_seconds"] - res["decode_first_seconds"])
                  / (len(groups) * (new - 2)) if new > 2 else 1e3 * res["decode_seconds"] / max(1, new - 1),
                  "decode_first_step_ms": 1e3 * res["decode_first_seconds"] / len(groups),
                  "decode_over_bound": None,
                  "decode_bound_ms": 1e3 * decode_bound_s(model, prompt.shape[0], prompt.shape[1] + new,
                                                          cp, args.hbm_gb_s),
                  "decode_path": decode_path, "peak_memory_gb": float(peak), "cache_capacity_per_rank": res["cache"].capacity,
                  "cache_tokens_per_rank": res["cache"].lengths, **dense, "args": vars(args)}
        result["decode_over_bound"] = result["decode_ms_per_token"] / result["decode_bound_ms"]
        (out / "generated.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "args"}), flush=True)


if __name__ == "__main__":
    leave(main())  # skips torch's exit-time teardown, which can abort a finished rank
