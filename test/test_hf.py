"""ringX.hf: Hugging Face models with "ringX1".."ringX4" as attn_implementation. At cp = 2 and 4
the loss and every gradient of tiny random Llama, Qwen2 (qkv bias) and Mistral (sliding window
shorter than the sequence) models equal transformers' single-process eager model (float32:
relative 1e-5 for the loss, 1e-4 for gradients); a packed batch equals its documents run
separately; every refused feature raises an error that names it."""
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launcher import spawn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ringX.hf  # noqa: E402
from ringX.layout import unshard  # noqa: E402

SEQ = 32


def _model(kind: str, attn: str):
    import transformers as tf
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=211, tie_word_embeddings=False)
    cfg = {"llama": lambda: tf.LlamaConfig(**common),
           "qwen2": lambda: tf.Qwen2Config(**common),
           "mistral": lambda: tf.MistralConfig(sliding_window=6, **common)}[kind]()
    cfg._attn_implementation = attn
    torch.manual_seed(11)
    model = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM}[kind](cfg)
    if kind == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    return model.float().train()


def _tokens(b=2):
    return torch.randint(0, 211, (b, SEQ), generator=torch.Generator().manual_seed(4))


def _reference(kind):
    model = _model(kind, "eager")
    tokens = _tokens()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def hf_body(rank, world_size, device, kinds):
    ringX.hf.register()
    group = dist.group.WORLD
    for kind in kinds:
        ref_loss, ref_grads = _reference(kind)
        for attn in ringX.hf.NAMES:
            model = _model(kind, attn)
            batch = ringX.hf.shard_inputs(_tokens(), attn, group)
            logits = model(**batch.model_inputs()).logits
            loss, mean = ringX.hf.cp_loss(logits, batch.shift_labels, group)
            loss.backward()
            assert abs(mean - ref_loss) <= 1e-5 * abs(ref_loss), (kind, attn, float(mean), float(ref_loss))
            for name, p in model.named_parameters():
                g = p.grad.clone()
                dist.all_reduce(g, group=group)
                err = ((g - ref_grads[name]).norm() / ref_grads[name].norm().clamp(min=1e-12)).item()
                assert err <= 1e-4, (kind, attn, name, err)


@pytest.mark.parametrize("world_size", [2, 4])
def test_loss_and_gradients_equal_transformers(world_size):
    spawn(world_size, hf_body, ("llama", "qwen2", "mistral"), deadline_s=300)


def padded_body(rank, world_size, device):
    """30 tokens over 4 ranks (which split 32): shard_inputs(pad_id=0) pads them at the end (one
    document still), and the loss and every gradient equal transformers' on the 30 tokens alone;
    a packed batch keeps its documents."""
    ringX.hf.register()
    group = dist.group.WORLD
    tokens = _tokens()[:, :30]
    ref = _model("mistral", "eager")
    ref_loss = ref(input_ids=tokens, labels=tokens).loss
    ref_loss.backward()
    for attn in ringX.hf.NAMES:
        model = _model("mistral", attn)
        batch = ringX.hf.shard_inputs(tokens, attn, group, pad_id=0)
        assert batch.cu_seqlens is None and batch.shift_labels.numel() * world_size == 2 * 32
        assert ringX.hf.shard_inputs(tokens, attn, group, position_ids=torch.cat(
            [torch.arange(12), torch.arange(18)])[None].expand(2, 30), pad_id=0).cu_seqlens[0].tolist() == [0, 12, 32]
        loss, mean = ringX.hf.cp_loss(model(**batch.model_inputs()).logits, batch.shift_labels, group)
        loss.backward()
        assert abs(mean - ref_loss.detach()) <= 1e-5 * abs(ref_loss.detach()), (attn, float(mean), float(ref_loss))
        for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
            g = p.grad.clone()
            dist.all_reduce(g, group=group)
            err = ((g - p_ref.grad).norm() / p_ref.grad.norm().clamp(min=1e-12)).item()
            assert err <= 1e-4, (attn, name, err)


def test_padded_batch_equals_the_unpadded_one():
    spawn(4, padded_body, deadline_s=300)


def packed_body(rank, world_size, device):
    ringX.hf.register()
    group = dist.group.WORLD
    lengths = (10, 14, 8)
    tokens = _tokens(1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    alone = _model("mistral", "eager").eval()
    with torch.no_grad():
        starts = [0, 10, 24]
        want = torch.cat([alone(input_ids=tokens[:, s:s + n]).logits for s, n in zip(starts, lengths)], dim=1)
    for attn in ringX.hf.NAMES:
        model = _model("mistral", attn).eval()
        batch = ringX.hf.shard_inputs(tokens, attn, group, position_ids=positions)
        assert batch.cu_seqlens[0].tolist() == [0, 10, 24, 32]
        with torch.no_grad():
            local = model(**batch.model_inputs()).logits
        parts = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        got = unshard(parts, ringX.hf.ALGORITHMS[attn].layout)
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= 1e-5, (attn, err)


def test_packed_batch_equals_documents_alone():
    spawn(4, packed_body, deadline_s=300)


def refusal_body(rank, world_size, device):
    import transformers as tf
    ringX.hf.register()
    tokens = _tokens(1)
    batch = ringX.hf.shard_inputs(tokens, "ringX2", dist.group.WORLD)
    model = _model("llama", "ringX2")
    with pytest.raises(NotImplementedError, match="attention mask"):
        model(**batch.model_inputs(), attention_mask=torch.ones(1, 1, SEQ // world_size, SEQ // world_size))
    cfg = tf.LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=211, attention_dropout=0.1)
    cfg._attn_implementation = "ringX2"
    with pytest.raises(NotImplementedError, match=r"attention dropout \(0.1\) in training"):
        tf.LlamaForCausalLM(cfg).train()(**batch.model_inputs())
    gcfg = tf.Gemma2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=96, vocab_size=211, head_dim=16, attn_logit_softcapping=50.0)
    gcfg._attn_implementation = "ringX2"
    with pytest.raises(NotImplementedError, match="attention logit softcapping"):
        tf.Gemma2ForCausalLM(gcfg)(**batch.model_inputs())
    q = torch.zeros(1, 4, 8, 16)
    k = torch.zeros(1, 2, 8, 16)

    class Alibi(torch.nn.Module):
        config = type("C", (), {"alibi": True})()
    with pytest.raises(NotImplementedError, match="ALiBi"):
        ringX.hf.attention("ringX2", None, Alibi(), q, k, k, None)
    with pytest.raises(ValueError, match="must divide by 4"):
        ringX.hf.shard_inputs(torch.zeros(1, 30, dtype=torch.long), "ringX3", dist.group.WORLD)
    with pytest.raises(ValueError, match="sharded for ringX2 but the model runs ringX3"):
        ringX.hf.attention("ringX3", None, model.model.layers[0].self_attn, q, k, k, None, ringx=batch)


def test_refused_features_raise():
    spawn(2, refusal_body, deadline_s=300)
