"""Generation from a sequence-sharded KV cache (ringX.inference, app/gpt/generate.py) against
transformers: greedy tokens equal ``generate``'s for a batch of 2 prompts of odd length at
cp = 1, 2, 4 with each of ringX1-4, whole and chunked prefill; the logits of every step equal a
full forward over prompt + generated tokens; every rank's cache holds its share only."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from launcher import run_app, spawn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.gpt.generate import generate  # noqa: E402
from app.gpt.hf import config_from_hf, load_hf  # noqa: E402
from app.gpt.model import Llama  # noqa: E402

PROMPT_LEN, NEW = 13, 5


def _tiny_hf(path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(7)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=300, rope_theta=10000.0, tie_word_embeddings=False,
                      attn_implementation="eager")
    hf = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():                     # peaked logits: greedy choices far from ties
        hf.lm_head.weight.mul_(40)
    hf.save_pretrained(str(path), safe_serialization=True)
    return hf


def _prompt():
    return torch.randint(0, 300, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf = _tiny_hf(path)
    prompt = _prompt()
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                          pad_token_id=0)
    return str(path), out[:, PROMPT_LEN:]


def generate_body(rank, world_size, device, path, ref):
    model = Llama(config_from_hf(path))
    load_hf(model, path)
    model.eval()
    prompt = _prompt()
    group = dist.group.WORLD
    parts = 2 * world_size
    for attn in ("ringX1", "ringX2", "ringX3", "ringX4"):
        for chunk in (0, parts):                       # whole prompt; chunks of 2N (the last padded)
            res = generate(model, prompt, NEW, attn, group, prefill_chunk=chunk, keep_logits=True)
            assert torch.equal(res["tokens"], ref), (attn, chunk, res["tokens"], ref)
            full_in = torch.cat([prompt, res["tokens"][:, :-1]], dim=1)
            with torch.no_grad():
                full = model(full_in, torch.arange(full_in.shape[1]))[:, PROMPT_LEN - 1:]
            for i, step_logits in enumerate(res["logits"]):
                err = (step_logits - full[:, i]).abs().max() / full[:, i].abs().max()
                assert err <= 1e-5, (attn, chunk, i, float(err))
            cache = res["cache"]                   # O(S/N) per rank: its share, balanced
            total = PROMPT_LEN + NEW - 1
            assert sum(cache.lengths) == total, cache.lengths
            assert max(cache.lengths) <= math.ceil(total / world_size) + 1, cache.lengths
            assert cache.capacity <= math.ceil(PROMPT_LEN / world_size) + parts + math.ceil(NEW / world_size) + 1
            assert cache.k[0].shape[1] == cache.capacity and len(cache.k) == model.cfg.n_layers


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_greedy_tokens_equal_transformers(reference, world_size):
    path, ref = reference
    spawn(world_size, generate_body, path, ref, deadline_s=300)


def test_generate_cli_writes_tokens(reference, tmp_path):
    """The CLI at cp = 2 with chunked prefill; the second prompt is left-padded (--pad_id) to the
    first's length and generates what it generates alone."""
    from transformers import AutoModelForCausalLM
    path, ref = reference
    prompt = _prompt()
    short = prompt[1, 4:]
    prompt[1, :4] = 299
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()
    with torch.no_grad():
        want_short = hf.generate(short[None], attention_mask=torch.ones(1, short.numel(), dtype=torch.long),
                                 max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, short.numel():]
    np.save(tmp_path / "prompt.npy", prompt.numpy())
    out = tmp_path / "out"
    run_app("app/gpt/generate.py", 2, "--hf_checkpoint", path, "--prompt_ids", str(tmp_path / "prompt.npy"),
            "--max_new_tokens", str(NEW), "--context_parallel", "2", "--attn", "ringX4", "--dtype", "float32",
            "--prefill_chunk", "4", "--pad_id", "299", "--out", str(out))
    result = json.loads((out / "generated.json").read_text())
    assert result["tokens"] == [ref[0].tolist(), want_short.tolist()]
    assert result["prefill_seconds"] > 0 and result["decode_ms_per_token"] > 0 and "peak_memory_gb" in result


def test_generate_cli_with_tensor_parallel(reference, tmp_path):
    """cp = 2 x tp = 2 (heads and the SwiGLU width split, each rank caching its kv heads'
    share of its sequence share): transformers' greedy tokens for both prompts."""
    path, ref = reference
    np.save(tmp_path / "prompt.npy", _prompt().numpy())
    out = tmp_path / "out"
    run_app("app/gpt/generate.py", 4, "--hf_checkpoint", path, "--prompt_ids", str(tmp_path / "prompt.npy"),
            "--max_new_tokens", str(NEW), "--context_parallel", "2", "--tensor_parallel", "2", "--attn", "ringX3",
            "--dtype", "float32", "--out", str(out))
    result = json.loads((out / "generated.json").read_text())
    assert result["tokens"] == ref.tolist()
    fill, total = result["cache_tokens_per_rank"], PROMPT_LEN + NEW - 1      # the cp ranks' shares
    assert sum(fill) == total and max(fill) <= math.ceil(total / 2) + 1, fill


def test_generate_cli_refuses_bad_prompts(reference, tmp_path):
    import subprocess
    path, _ = reference
    np.save(tmp_path / "bad.npy", np.zeros((3,), dtype=np.float32))
    res = subprocess.run([sys.executable, "app/gpt/generate.py", "--hf_checkpoint", path, "--prompt_ids",
                          str(tmp_path / "bad.npy"), "--out", str(tmp_path / "o")],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "expected an integer array (batch, prompt_len)" in res.stderr


def test_generate_from_an_app_run_with_a_text_prompt(tmp_path):
    """--checkpoint RUN (the newest checkpoint of app/gpt/train.py) with --prompt TEXT: the same
    tokens at cp = 1 and cp = 2, and their bytes as text (every run on CPU: greedy tokens of a
    barely trained model are compared, on one device)."""
    run_app("app/gpt/train.py", 1, "--config", "debug", "--steps", "2", "--out", str(tmp_path / "run"), cpu=True)
    results = []
    for n in (1, 2):
        run_app("app/gpt/generate.py", n, "--checkpoint", str(tmp_path / "run"), "--prompt", "The key is 12345.",
                "--max_new_tokens", "4", "--context_parallel", str(n), "--attn", "ringX3", "--dtype", "float32",
                "--out", str(tmp_path / f"gen{n}"), cpu=True)
        results.append(json.loads((tmp_path / f"gen{n}" / "generated.json").read_text()))
    assert results[0]["tokens"] == results[1]["tokens"] and len(results[0]["tokens"][0]) == 4
    assert isinstance(results[0]["text"][0], str)


def test_decode_layer_halves_make_the_block():
    """The decode graph's per-layer halves (around the attention) compute the block's forward."""
    from app.gpt.config import load_preset
    from app.gpt.generate import _layer_finish, _layer_qkv
    from app.gpt.model import rope_angles, sdpa_causal
    cfg = load_preset("debug")
    model = Llama(cfg).eval()
    model.init_weights(torch.Generator().manual_seed(0))
    x = torch.randn(2, 7, cfg.dim, generator=torch.Generator().manual_seed(1))
    cos, sin = rope_angles(torch.arange(7), cfg.head_dim, cfg.rope_theta, cfg)
    with torch.no_grad():
        for block in model.layers:
            want = block(x, cos, sin, sdpa_causal)
            got = _layer_finish(block, x, sdpa_causal(*_layer_qkv(block, x, cos, sin)))
            assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the flash kernel need a GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_graph_decode_equals_eager_on_gpu(reference, compiled):
    """On a GPU (bf16), decode steps replayed as one CUDA graph (with compiled blocks or not)
    give the eager decode's tokens and logits (batch 2: both sequences' varlen offsets)."""
    path, _ = reference
    cfg = config_from_hf(str(path))
    model = Llama(cfg)
    load_hf(model, str(path))
    model = model.to("cuda", torch.bfloat16).eval()
    prompt = _prompt().cuda()
    eager = generate(model, prompt, NEW + 3, "ringX3", keep_logits=True)
    graph = generate(model, prompt, NEW + 3, "ringX3", keep_logits=True, cuda_graph=True, compiled=compiled)
    assert torch.equal(graph["tokens"], eager["tokens"])
    for a, b in zip(graph["logits"], eager["logits"]):
        assert (a - b).abs().max() <= 2e-2 * b.abs().max()
