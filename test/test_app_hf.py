"""app/hf/finetune.py on CPU: --eval_only reports transformers' own loss at cp = 2; training over
dp 2 x cp 2 lowers the loss, resumes exactly from its mid-run checkpoint, and exports a directory that
from_pretrained loads with the trained weights (whose eval the first test's path computes)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher import resume_point, run_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=211, tie_word_embeddings=False)
    Qwen2ForCausalLM(cfg).save_pretrained(str(root / "model"), safe_serialization=True)
    tokens = np.random.default_rng(0).integers(0, 211, 50)
    np.save(root / "tokens.npy", np.tile(tokens, 40).astype(np.int64))
    return root


def _hf_loss(model_dir, tokens_file, seq_len=32):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager", dtype=torch.float32)
    ids = torch.from_numpy(np.load(tokens_file)[:seq_len])[None]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def _finetune(nproc, tiny, out, *flags, model=None, seq_len=32):
    run_app("app/hf/finetune.py", nproc, "--model", str(model or tiny / "model"), "--data", str(tiny / "tokens.npy"),
            "--seq_len", str(seq_len), "--dtype", "float32", "--out", str(out), *flags)
    return out


@pytest.mark.parametrize("seq_len", [32, 30])      # 30: padded to 32 for ringX3's 2 x 2 chunks
def test_eval_only_is_transformers_loss(tiny, tmp_path, seq_len):
    out = _finetune(2, tiny, tmp_path / "ev", "--context_parallel", "2", "--attn", "ringX3", "--eval_only",
                    seq_len=seq_len)
    loss = json.loads((out / "eval.json").read_text())["loss"]
    want = _hf_loss(tiny / "model", tiny / "tokens.npy", seq_len)
    assert abs(loss - want) <= 1e-5 * abs(want), (loss, want)


def test_train_resume_and_export(tiny, tmp_path):
    common = ("--context_parallel", "2", "--attn", "ringX2", "--lr", "3e-3", "--checkpoint_every", "4")
    full = _finetune(4, tiny, tmp_path / "full", *common, "--steps", "8", "--export", str(tmp_path / "exported"))
    losses = [json.loads(l)["loss"] for l in (full / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.3, losses
    part = resume_point(full, 4, tmp_path / "part")
    _finetune(4, tiny, part, *common, "--steps", "8", "--resume")
    resumed = [json.loads(l)["loss"] for l in (part / "metrics.jsonl").read_text().splitlines()]
    assert resumed == losses, (resumed, losses)
    exported = _hf_loss(tmp_path / "exported", tiny / "tokens.npy")
    assert exported < _hf_loss(tiny / "model", tiny / "tokens.npy") - 0.3       # the trained weights
