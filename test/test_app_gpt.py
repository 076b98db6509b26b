"""GPT app: with context parallelism over 4 ranks, the step-0 loss and every weight gradient equal
those of the whole sequence on one rank with plain PyTorch attention (float32, relative 1e-5)."""
import copy
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launcher import resume_point, run_app, spawn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.gpt.config import load_preset, presets  # noqa: E402
from app.gpt.model import Llama, rope_angles, apply_rope  # noqa: E402
from app.gpt.parallelize import cp_attention, cp_loss, shard_batch  # noqa: E402
from ringX.parallel import reduce_gradients  # noqa: E402


def _model_and_batch(seq_len=64):
    cfg = load_preset("debug", seq_len=seq_len)
    model = Llama(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=g)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    return cfg, model, tokens, labels


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def cp_equivalence_body(rank, world_size, device, attn):
    cfg, model, tokens, labels = _model_and_batch()
    model = model.to(device)
    tokens, labels = tokens.to(device), labels.to(device)
    # cp = 1: the whole sequence, PyTorch attention
    ref = copy.deepcopy(model)
    logits = ref(tokens, torch.arange(tokens.shape[1], device=device))
    ref_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref_loss.backward()
    # cp = world_size: this rank's shard in the function's layout, ringX attention
    group = dist.group.WORLD
    tok, lab, pos = shard_batch(tokens, labels, attn, group)
    loss, global_loss = cp_loss(model(tok, pos, cp_attention(attn, group), labels=lab), lab, group)
    loss.backward()
    reduce_gradients(model, group)
    assert _rel(global_loss, ref_loss.detach()) <= 1e-5, (global_loss.item(), ref_loss.item())
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        err = _rel(p.grad, p_ref.grad)
        assert err <= 1e-5, f"{attn}: gradient of {name} differs by {err:.2e}"


def tp_cp_equivalence_body(rank, world_size, device, order):
    """tp=2 x cp=2: loss and every gradient (each tp shard against the same slice of the
    cp=1 gradient) equal the whole-sequence single-rank model."""
    from app.gpt.tensor_parallel import apply_tensor_parallel, shard_of
    from ringX.parallel import ParallelDims
    cfg, model, tokens, labels = _model_and_batch()
    model, tokens, labels = model.to(device), tokens.to(device), labels.to(device)
    ref = copy.deepcopy(model)
    logits = ref(tokens, torch.arange(tokens.shape[1], device=device))
    ref_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref_loss.backward()
    dims = ParallelDims(dp=1, cp=2, tp=2, order=order)
    groups = dims.build(names=("cp", "tp"))
    apply_tensor_parallel(model, groups.tp)
    tok, lab, pos = shard_batch(tokens, labels, "ringX3", groups.cp)
    loss, global_loss = cp_loss(model(tok, pos, cp_attention("ringX3", groups.cp), labels=lab), lab, groups.cp)
    loss.backward()
    reduce_gradients(model, groups.cp)
    assert _rel(global_loss, ref_loss.detach()) <= 1e-5
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    tp_rank = dims.coords(rank)["tp"]
    for name, p in model.named_parameters():
        full = ref_grads[name.replace(".inner", "")]
        err = _rel(p.grad, shard_of(name, full, tp_rank, 2))
        assert err <= 1e-5, f"tp2 x cp2 {order}: gradient of {name} differs by {err:.2e}"


def two_level_equivalence_body(rank, world_size, device, attn):
    """cp = 4 as 2 x 2 (heads over the inner pairs, ``attn`` over the outer): the app's sharding
    and attention give the whole sequence's loss and gradients."""
    from ringX.parallel import ParallelDims
    cfg, model, tokens, labels = _model_and_batch()
    ref = copy.deepcopy(model)
    logits = ref(tokens, torch.arange(tokens.shape[1]))
    ref_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref_loss.backward()
    groups = ParallelDims(dp=-1, cp=4, tp=1, world_size=4, cp_inner=2).build(names=("cp",))
    tok, lab, pos = shard_batch(tokens, labels, attn, groups.cp, cp_inner=2)
    attn_fn = cp_attention(attn, groups.cp, inner=groups.cp_levels)
    loss, global_loss = cp_loss(model(tok, pos, attn_fn, labels=lab), lab, groups.cp)
    loss.backward()
    reduce_gradients(model, groups.cp)
    assert _rel(global_loss, ref_loss.detach()) <= 1e-5, (global_loss.item(), ref_loss.item())
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        assert _rel(p.grad, p_ref.grad) <= 1e-5, f"2 x 2 {attn}: gradient of {name}"


@pytest.mark.parametrize("attn", [pytest.param("ringX1", marks=pytest.mark.slow), "ringX4"])
def test_cp4_as_2x2_step0_equals_cp1(attn):
    spawn(4, two_level_equivalence_body, attn, deadline_s=300)


@pytest.mark.parametrize("order", ["tp-cp-dp", "cp-tp-dp"])
def test_tp2_cp2_step0_equals_cp1(order):
    spawn(4, tp_cp_equivalence_body, order, deadline_s=300)


@pytest.mark.parametrize("attn", ["ringX1", "ringX2", "ringX3", "ringX4"])
def test_cp4_step0_loss_and_gradients_equal_cp1(attn):
    spawn(4, cp_equivalence_body, attn, deadline_s=300)


def test_presets_and_overrides():
    assert {"debug", "llama3-1b", "llama3-8b", "llama3-8b-128k", "llama3-8b-1m"} <= set(presets())
    big = load_preset("llama3-8b-1m")
    assert (big.dim, big.n_layers, big.n_heads, big.n_kv_heads, big.ffn_dim, big.vocab_size,
            big.seq_len, big.rope_theta) == (4096, 32, 32, 8, 14336, 128256, 1048576, 500000.0)
    assert load_preset("debug", seq_len=128).seq_len == 128
    with pytest.raises(ValueError, match="no preset 'nope'"):
        load_preset("nope")
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Llama(load_preset("llama3-8b")).parameters())
    assert n_params == 8_030_261_248  # Llama 3 8B


def test_rope_scale_from_extends_the_trained_frequencies():
    """--rope_scale_from N: frequencies of wavelength above N divided by seq_len / N, those below
    N / 4 kept; positions 0..N-1 of the short model keep their high-frequency angles."""
    from app.gpt.model import rope_inv_freq
    from app.gpt.train import extend_rope
    short = load_preset("passkey", seq_len=256)
    long = extend_rope(load_preset("passkey", seq_len=2048), 256)
    assert (long.rope_scaling, long.rope_factor, long.rope_original_max_pos) == ("llama3", 8.0, 256)
    old, new = rope_inv_freq(short.head_dim, short.rope_theta), rope_inv_freq(long.head_dim, long.rope_theta, long)
    wavelen = 2 * torch.pi / old
    assert torch.equal(new[wavelen < 64], old[wavelen < 64])
    torch.testing.assert_close(new[wavelen > 256], old[wavelen > 256] / 8)
    for bad in (0, 2048, 4096):
        with pytest.raises(ValueError, match="rope_scale_from"):
            extend_rope(load_preset("passkey", seq_len=2048), bad)


def test_rope_depends_on_global_positions_only():
    """A token's rotation is a function of its global position, not of its index in a shard."""
    x = torch.randn(1, 8, 2, 16)
    cos, sin = rope_angles(torch.arange(8), 16, 500000.0)
    full = apply_rope(x, cos, sin)
    pos = torch.tensor([0, 1, 6, 7])
    c2, s2 = rope_angles(pos, 16, 500000.0)
    torch.testing.assert_close(apply_rope(x[:, pos], c2, s2), full[:, pos])


def _train(tmp_path, nproc, *flags):
    """app/gpt/train.py on ``nproc`` ranks (debug, float32) into tmp_path/run -> metrics rows."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    _train.last_output, rows = run_app("app/gpt/train.py", nproc, "--config", "debug", "--dtype", "float32",
                                       "--out", str(tmp_path / "run"), *flags)
    return rows


def test_train_30_steps_cp4_decreases_loss(tmp_path):
    rows = _train(tmp_path, 4, "--context_parallel", "4", "--attn", "ringX4", "--steps", "30")
    assert [r["step"] for r in rows] == list(range(30))
    assert {"step", "loss", "tokens_per_s", "tflops_per_gpu", "mfu", "max_mem_gb"} <= set(rows[0])
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)


def test_train_tp2_cp2_resumes_exactly_with_another_ac_mode(tmp_path):
    """tp=2 x cp=2 with FSDP2: 6 steps (full activation checkpointing) == its checkpoint of step 3
    resumed without checkpointing, loss for loss."""
    common = ["--tensor_parallel", "2", "--context_parallel", "2", "--attn", "ringX2"]
    straight = _train(tmp_path / "a", 4, *common, "--steps", "6", "--ac", "full", "--checkpoint_every", "3")
    resume_point(tmp_path / "a" / "run", 3, tmp_path / "b" / "run")
    resumed = _train(tmp_path / "b", 4, *common, "--steps", "6", "--resume")
    assert straight[-1]["loss"] < straight[0]["loss"]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert sorted(p.name for p in (tmp_path / "b" / "run" / "checkpoints" / "step_00000006").iterdir()
                  if p.is_dir()) == ["tp00", "tp01"]


def test_one_rank_resumes_between_fsdp_and_unsharded(tmp_path):
    """One rank: checkpointed runs shard with FSDP2, uncheckpointed ones run the plain model
    (train.unsharded_one_rank); a checkpoint of either resumes in the other, loss for loss."""
    straight = _train(tmp_path / "a", 1, "--steps", "6", "--ac", "full", "--checkpoint_every", "3")
    resume_point(tmp_path / "a" / "run", 3, tmp_path / "b" / "run")
    _train(tmp_path / "b", 1, "--steps", "5", "--resume")                 # steps 3-4, checkpoint at 5
    assert "weights: unsharded on one rank" in _train.last_output
    rows = _train(tmp_path / "b", 1, "--steps", "6", "--resume", "--ac", "full")   # step 5
    assert "weights: FSDP2 over 1 rank" in _train.last_output
    got, want = [r["loss"] for r in rows], [r["loss"] for r in straight]
    assert len(got) == len(want) == 6 and all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(got, want)), (got, want)


def test_memory_options_and_engines_give_the_same_losses(tmp_path):
    """cp=2 x dp=2: FSDP2 with full or selective activation checkpointing, chunked loss and MLP
    and CPU-offloaded activations trains like replicated weights with all-reduced gradients."""
    common = ["--context_parallel", "2", "--attn", "ringX3", "--steps", "4", "--parallel_order", "cp-tp-dp"]
    base = [r["loss"] for r in _train(tmp_path / "a", 4, *common, "--dp_engine", "allreduce")]
    full = [r["loss"] for r in _train(tmp_path / "b", 4, *common, "--ac", "full", "--loss_chunk", "48",
                                      "--mlp_chunk", "40", "--offload_activations")]
    selective = [r["loss"] for r in _train(tmp_path / "c", 4, *common, "--ac", "selective")]
    attention = [r["loss"] for r in _train(tmp_path / "d", 4, *common, "--ac", "attention")]
    for other in (full, selective, attention):
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(other, base)), (other, base)
    assert base[-1] < base[0]


def _step_counting_attention(m, fn, tokens, labels):
    """Forward and backward of ``m`` -> (attention kernel runs, loss, gradients by plain-model
    name): the runs of the ops a selective checkpoint keeps (app.common.sharding)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from app.common.sharding import _attention_ops
    ops = _attention_ops()

    class Count(TorchDispatchMode):
        runs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.runs += func in ops
            return func(*args, **(kwargs or {}))

    with Count() as count:
        loss = m(tokens, torch.arange(tokens.shape[1]), fn, labels=labels)
        loss.backward()
    return count.runs, loss.detach(), {n.replace("inner.", ""): p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("attn", ["ringX3", "sdpa"])
def test_ac_attention_keeps_the_attention_and_recomputes_the_rest(attn):
    """--ac attention: one attention kernel run per block (its outputs are kept through backward,
    where full checkpointing runs it twice), and the loss and gradients of no checkpointing."""
    from app.gpt.parallelize import apply_activation_checkpointing
    from app.gpt.model import sdpa_causal
    cfg, model, tokens, labels = _model_and_batch()
    results = {}
    for mode in ("none", "attention", "full"):
        m = apply_activation_checkpointing(copy.deepcopy(model), mode)
        fn = sdpa_causal if attn == "sdpa" else cp_attention(attn, None, as_op=mode == "attention")
        results[mode] = _step_counting_attention(m, fn, tokens, labels)
    runs, loss, grads = results["attention"]
    assert results["full"][0] == 2 * cfg.n_layers and runs == cfg.n_layers, (results["full"][0], runs)
    assert torch.equal(loss, results["none"][1])
    for name, g in results["none"][2].items():
        assert _rel(grads[name], g) <= 1e-6, name


def test_ac_layers_checkpoints_only_the_first_blocks():
    """--ac_layers N: the first N blocks recomputed, the rest kept whole (attention runs once more
    per checkpointed block under full checkpointing), the loss and gradients of no checkpointing;
    out-of-range N, or N without --ac, is refused."""
    from app.common.sharding import Checkpointed
    from app.gpt.parallelize import apply_activation_checkpointing
    cfg, model, tokens, labels = _model_and_batch()
    fn = cp_attention("ringX3", None)
    assert cfg.n_layers >= 2
    results = {}
    for mode, layers in (("none", None), ("full", 1)):
        m = apply_activation_checkpointing(copy.deepcopy(model), mode, layers)
        results[mode] = _step_counting_attention(m, fn, tokens, labels)
        if mode == "full":
            assert [isinstance(b, Checkpointed) for b in m.layers] == [True] + [False] * (cfg.n_layers - 1)
    assert results["full"][0] == cfg.n_layers + 1 and results["none"][0] == cfg.n_layers
    assert torch.equal(results["full"][1], results["none"][1])
    for name, g in results["none"][2].items():
        assert _rel(results["full"][2][name], g) <= 1e-6, name
    for mode, layers in (("none", 1), ("full", cfg.n_layers + 1), ("attention", -1)):
        with pytest.raises(ValueError, match="--ac_layers"):
            apply_activation_checkpointing(copy.deepcopy(model), mode, layers)


def test_eval_only_reads_the_newest_checkpoint(tmp_path):
    import json
    _train(tmp_path, 2, "--context_parallel", "2", "--attn", "ringX4", "--steps", "2")
    _train(tmp_path, 2, "--context_parallel", "2", "--attn", "ringX4", "--eval_only", "--eval_batches", "2")
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["batches"] == 2 and result["seq_len"] == 256 and 0.0 < result["loss"] < 10.0
    assert 0.0 <= result["passkey_acc"] <= 1.0
    assert "resumed from" in _train.last_output and "step_00000002" in _train.last_output


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_loss_policy(tmp_path, policy):
    import json
    flags = ["--context_parallel", "2", "--attn", "ringX2", "--steps", "6", "--checkpoint_every", "2",
             "--inject_nan_at", "3", "--nan_policy", policy]
    if policy == "skip":
        rows = _train(tmp_path, 2, *flags)
        assert [r["skipped"] for r in rows] == [0, 0, 0, 1, 1, 1]
        assert rows[3]["loss"] != rows[3]["loss"] and all(r["loss"] == r["loss"] for r in rows[4:])
        assert "update skipped (1 so far)" in _train.last_output
        return
    with pytest.raises(AssertionError, match="FloatingPointError: step 3: loss nan"):
        _train(tmp_path, 2, *flags)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000002"]



def test_train_cp2_dp2(tmp_path):
    rows = _train(tmp_path, 4, "--context_parallel", "2", "--attn", "ringX1", "--steps", "8",
                  "--parallel_order", "cp-tp-dp", "--eval_every", "5")
    assert len(rows) == 8 and all(r["loss"] == r["loss"] for r in rows)
    assert [r["step"] for r in rows if "passkey_acc" in r] == [4, 7]      # every 5 steps and the last
    assert 0.0 <= rows[-1]["passkey_acc"] <= 1.0


def test_resume_is_bit_exact_and_skips_broken_checkpoints(tmp_path):
    """10 steps == their checkpoint of step 6 + resume + 4 steps, loss for loss (float32, CPU,
    cp=2); a later checkpoint without its manifest and a leftover .tmp directory are skipped."""
    common = ["--context_parallel", "2", "--attn", "ringX3"]
    straight = _train(tmp_path / "a", 2, *common, "--steps", "10", "--checkpoint_every", "6")
    assert sorted(p.name for p in (tmp_path / "a" / "run" / "checkpoints").iterdir()) == ["step_00000006", "step_00000010"]
    ckpts = resume_point(tmp_path / "a" / "run", 6, tmp_path / "b" / "run") / "checkpoints"
    broken = ckpts / "step_00000008"
    broken.mkdir()
    (broken / "rank00000.pt").write_bytes(b"partial")
    (ckpts / "step_00000009.tmp").mkdir()
    resumed = _train(tmp_path / "b", 2, *common, "--steps", "10", "--resume")
    assert [r["step"] for r in resumed] == list(range(10))
    assert [r["loss"] for r in resumed[6:]] == [r["loss"] for r in straight[6:]]
    assert "skipping checkpoint" in _train.last_output and "no manifest.json" in _train.last_output
    assert "resumed from" in _train.last_output and "step_00000006 at step 6" in _train.last_output


def test_random_positions_cp2_zigzag_equal_cp1(tmp_path):
    """--random_positions: training batches use a sorted draw of positions, sharded in the
    layout of the attention, so ringX4 at cp = 2 gives the losses of one rank; the draw changes
    the losses; a range shorter than the sequence is refused."""
    common = ["--steps", "3", "--random_positions", "4096"]
    one = _train(tmp_path / "one", 1, *common, "--attn", "sdpa")
    two = _train(tmp_path / "two", 2, *common, "--attn", "ringX4", "--context_parallel", "2")
    plain = _train(tmp_path / "plain", 1, "--steps", "3", "--attn", "sdpa")
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
    assert one[1]["loss"] != plain[1]["loss"]
    from app.gpt.train import parse, train
    try:
        with pytest.raises(ValueError, match="shorter than seq_len"):
            train(parse(["--random_positions", "8"]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_train_two_level_cp_equals_cp1(tmp_path):
    """--context_parallel 4 --context_parallel_inner 2 (ringX3 over the outer pairs) trains
    with the losses of one rank; what the hybrid cannot take is refused."""
    one = _train(tmp_path / "one", 1, "--steps", "3", "--attn", "sdpa")
    two = _train(tmp_path / "two", 4, "--steps", "3", "--attn", "ringX3", "--context_parallel", "4",
                 "--context_parallel_inner", "2")
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
    from app.gpt.train import check_two_level, model_config, parse
    from ringX.parallel import ParallelDims
    args = parse(["--context_parallel", "4", "--context_parallel_inner", "2", "--ac", "attention"])
    with pytest.raises(ValueError, match="--ac attention"):
        check_two_level(args, model_config(args), ParallelDims(cp=4, world_size=4, cp_inner=2))
    args = parse(["--context_parallel", "4", "--context_parallel_inner", "3"])
    with pytest.raises(ValueError, match="cp_inner=3 must divide cp=4"):
        ParallelDims(cp=4, world_size=4, cp_inner=3)


DS_COMMON = ["--context_parallel", "2", "--attn", "ringX3", "--parallel_order", "cp-tp-dp"]
DS = ["--dp_engine", "deepspeed", "--zero_stage", "2"]


def test_deepspeed_zero2_equals_allreduce(tmp_path):
    """--dp_engine deepspeed (ZeRO-2 over cp = 2 x dp = 2, float32) gives the losses of the
    replicated engine (relative 1e-5)."""
    pytest.importorskip("deepspeed")
    ref = _train(tmp_path / "ref", 4, *DS_COMMON, "--steps", "4", "--dp_engine", "allreduce", "--no_checkpoint")
    straight = _train(tmp_path / "a", 4, *DS_COMMON, *DS, "--steps", "4", "--no_checkpoint")
    for a, b in zip(ref, straight):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (a["grad_norm"], b["grad_norm"])


@pytest.mark.slow
def test_deepspeed_resumes_exactly_and_skips_a_nan_step(tmp_path):
    """DeepSpeed ZeRO-2 as above: 4 steps equal 2 steps + checkpoint + --resume + 2 steps, loss
    for loss; a checkpoint of another engine is refused with a reason; a NaN loss skips the step
    as the replicated engine does. (Slow: six 4-rank runs, each importing DeepSpeed.)"""
    pytest.importorskip("deepspeed")
    straight = _train(tmp_path / "a", 4, *DS_COMMON, *DS, "--steps", "4", "--no_checkpoint")
    _train(tmp_path / "b", 4, *DS_COMMON, *DS, "--steps", "2")
    resumed = _train(tmp_path / "b", 4, *DS_COMMON, *DS, "--steps", "4", "--resume")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    with pytest.raises(AssertionError, match="resume with the engine that wrote it"):
        _train(tmp_path / "b", 4, *DS_COMMON, "--steps", "6", "--resume")
    nan = ["--steps", "3", "--no_checkpoint", "--inject_nan_at", "1"]
    poisoned = _train(tmp_path / "nan", 4, *DS_COMMON, *DS, *nan)
    skipped = _train(tmp_path / "nan_ref", 4, *DS_COMMON, *nan, "--dp_engine", "allreduce")
    assert [r["skipped"] for r in poisoned] == [0, 1, 1] and poisoned[1]["loss"] != poisoned[1]["loss"]
    assert abs(poisoned[2]["loss"] - skipped[2]["loss"]) <= 1e-5 * skipped[2]["loss"]   # no trace left


def test_deepspeed_with_tensor_parallel_refuses():
    from app.gpt.train import parse, train
    with pytest.raises(NotImplementedError, match="--dp_engine deepspeed with --tensor_parallel > 1"):
        train(parse(["--dp_engine", "deepspeed", "--tensor_parallel", "2"]))


def test_resume_with_another_lr_uses_it(tmp_path):
    """A curriculum stage resumed with a new --lr trains at that rate, and says so."""
    common = ["--steps", "2", "--warmup", "1", "--checkpoint_every", "2"]
    first = _train(tmp_path, 1, *common, "--lr", "1e-3")
    resumed = _train(tmp_path, 1, "--steps", "4", "--warmup", "1", "--lr", "2e-4", "--resume")
    assert [r["lr"] for r in first] == [1e-3, 1e-3]
    assert [r["lr"] for r in resumed[2:]] == [pytest.approx(2e-4)] * 2
    assert "--lr 0.0002 replaces the checkpoint's base rate 0.001" in _train.last_output


def test_resumed_stage_warms_up_again_from_warmup_start(tmp_path):
    """--warmup_start: a stage resumed at step 2 ramps its rate over --warmup steps from there."""
    _train(tmp_path, 1, "--steps", "2", "--warmup", "1", "--lr", "1e-3", "--checkpoint_every", "2")
    resumed = _train(tmp_path, 1, "--steps", "6", "--warmup", "4", "--warmup_start", "2", "--lr", "4e-4",
                     "--resume")
    assert [r["lr"] for r in resumed[2:]] == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4])


@pytest.mark.parametrize("data", [pytest.param("passkey", marks=pytest.mark.slow), "token_file"])
def test_resume_under_another_layout_keeps_each_sequence_whole(tmp_path, data):
    """A stage written on tp=2 x dp=2 and resumed as tp=2 x cp=2: the ranks that split one sequence
    continue from one data state (each rank's own saved state differs, having drawn for another
    dp rank), for the passkey generator and for a token file's position."""
    flags = ["--data", str(_token_file(tmp_path))] if data == "token_file" else []
    _train(tmp_path, 4, "--steps", "2", "--tensor_parallel", "2", *flags)
    out, _ = run_app("test/resume_layout_worker.py", 4, "--config", "debug", "--dtype", "float32",
                     "--out", str(tmp_path / "run"), "--tensor_parallel", "2", "--context_parallel", "2",
                     "--attn", "ringX2", "--resume", *flags)
    assert "data states agree across cp and tp" in out


def _tiny_hf_llama(path, rope_scaling=None):
    """A tiny random Hugging Face Llama checkpoint (float32, untied, rope_theta 500000)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(5)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=300, rope_theta=500000.0,
                      tie_word_embeddings=False, attn_implementation="eager", rope_scaling=rope_scaling)
    hf = LlamaForCausalLM(cfg).float().eval()
    hf.save_pretrained(str(path), safe_serialization=True)
    return hf


def _hf_tokens():
    return torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(9))


def hf_cp_body(rank, world_size, device, path, hf_loss):
    from app.gpt.hf import config_from_hf, load_hf
    cfg = config_from_hf(path)
    model = Llama(cfg)
    load_hf(model, path)
    tokens = _hf_tokens()
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    group = dist.group.WORLD
    tok, lab, pos = shard_batch(tokens, labels, "ringX4", group)
    with torch.no_grad():
        _, loss = cp_loss(model(tok, pos, cp_attention("ringX4", group), labels=lab), lab, group)
    assert abs(loss.item() - hf_loss) <= 1e-4 * abs(hf_loss), (loss.item(), hf_loss)


def test_hf_checkpoint_loss_equals_transformers_cp1_and_cp4(tmp_path):
    from app.gpt.hf import config_from_hf, load_hf
    hf = _tiny_hf_llama(tmp_path / "hf")
    tokens = _hf_tokens()
    with torch.no_grad():
        hf_loss = hf(input_ids=tokens, labels=tokens).loss.item()
    model = Llama(config_from_hf(tmp_path / "hf"))
    load_hf(model, tmp_path / "hf")
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]))
    ours = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert abs(ours - hf_loss) <= 1e-4 * abs(hf_loss), (ours, hf_loss)
    spawn(4, hf_cp_body, str(tmp_path / "hf"), hf_loss, deadline_s=300)


def test_rope_scale_from_extends_an_hf_checkpoints_rope(tmp_path):
    """--rope_scale_from applies to the architecture read from --hf_checkpoint (not to the preset
    it replaces), and refuses a checkpoint whose RoPE is already scaled."""
    from app.gpt.train import model_config, parse
    _tiny_hf_llama(tmp_path / "hf")
    cfg = model_config(parse(["--hf_checkpoint", str(tmp_path / "hf"), "--seq_len", "256", "--rope_scale_from", "64"]))
    assert (cfg.dim, cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_pos) == (64, "llama3", 4.0, 64)
    scaled = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}
    _tiny_hf_llama(tmp_path / "hf31", scaled)
    with pytest.raises(ValueError, match="already scales RoPE"):
        model_config(parse(["--hf_checkpoint", str(tmp_path / "hf31"), "--seq_len", "256", "--rope_scale_from", "64"]))


def test_hf_llama3_rope_scaling_matches_transformers(tmp_path):
    """Llama 3.1's "llama3" rope scaling (original length 16 so that it acts at 64 tokens)."""
    from app.gpt.hf import config_from_hf, load_hf
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    hf = _tiny_hf_llama(tmp_path / "hf", scaling)
    tokens = _hf_tokens()
    cfg = config_from_hf(tmp_path / "hf")
    assert cfg.rope_scaling == "llama3" and cfg.rope_original_max_pos == 16
    model, plain = Llama(cfg), Llama(replace(cfg, rope_scaling="none"))
    load_hf(model, tmp_path / "hf")
    load_hf(plain, tmp_path / "hf")
    with torch.no_grad():
        theirs = hf(input_ids=tokens).logits
        ours, unscaled = model(tokens, torch.arange(64)), plain(tokens, torch.arange(64))
    assert (ours - theirs).abs().max() <= 1e-5
    assert (unscaled - theirs).abs().max() >= 1e-3, "the scaling made no difference: test too weak"


def test_chunked_loss_and_mlp_equal_whole(tmp_path):
    """Chunking the logits of the loss and the feed-forward changes memory, not results."""
    cfg, model, tokens, labels = _model_and_batch()
    chunked = Llama(cfg, mlp_chunk=24, loss_chunk=20)
    chunked.load_state_dict(model.state_dict())
    pos = torch.arange(tokens.shape[1])
    ref, out = model(tokens, pos, labels=labels), chunked(tokens, pos, labels=labels)
    ref.backward()
    out.backward()
    assert _rel(out, ref) <= 1e-6
    for (name, a), (_, b) in zip(chunked.named_parameters(), model.named_parameters()):
        assert _rel(a.grad, b.grad) <= 1e-5, name


def test_export_hf_round_trip(tmp_path):
    from transformers import LlamaForCausalLM
    from app.gpt.hf import export_hf
    cfg, model, tokens, _ = _model_and_batch()
    export_hf(model.cfg, model.named_parameters(), tmp_path / "out")
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "out")).float().eval()
    with torch.no_grad():
        ours = model(tokens, torch.arange(tokens.shape[1]))
        theirs = hf(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_train_from_hf_checkpoint_and_export(tmp_path):
    _tiny_hf_llama(tmp_path / "hf")
    rows = _train(tmp_path / "run", 2, "--context_parallel", "2", "--attn", "ringX1", "--steps", "3",
                  "--hf_checkpoint", str(tmp_path / "hf"), "--export_hf", str(tmp_path / "export"),
                  "--data", str(_token_file(tmp_path)))
    assert len(rows) == 3
    assert (tmp_path / "export" / "model.safetensors").exists()


def test_export_hf_gathers_tp_slices_and_fsdp_shards(tmp_path):
    """tp = 2 x cp = 2 with FSDP2: loading a Hugging Face checkpoint and exporting it again
    (no step taken) gives back every tensor exactly."""
    from safetensors.torch import load_file
    _tiny_hf_llama(tmp_path / "hf")
    _train(tmp_path / "run", 4, "--tensor_parallel", "2", "--context_parallel", "2", "--attn", "ringX2",
           "--steps", "0", "--hf_checkpoint", str(tmp_path / "hf"), "--export_hf", str(tmp_path / "export"),
           "--data", str(_token_file(tmp_path)))
    original, exported = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "export" / "model.safetensors")
    assert set(original) == set(exported)
    for name, t in original.items():
        assert torch.equal(exported[name].to(t.dtype), t), name


def _token_file(tmp_path):
    from app.gpt.data import write_token_file
    return write_token_file(tmp_path / "tokens.npy", ["hello world " * 40] * 4)


def _packed_batch(seq_len=64):
    """Two packed rows of documents (1 token, documents crossing every rank boundary, one longer
    than a shard): tokens, labels (-100 where the next token starts another document), positions
    restarting at 0 in each document, and each row's cu_seqlens."""
    from app.gpt.parallelize import packed_attention  # noqa: F401  (imported where it is used)
    cfg = load_preset("debug", seq_len=seq_len)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=g)
    cus = [[0, 1, 21, 51, seq_len], [0, 9, 10, 40, seq_len]]
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.empty_like(tokens)
    for b, cu in enumerate(cus):
        for a, e in zip(cu, cu[1:]):
            labels[b, e - 1] = -100
            positions[b, a:e] = torch.arange(e - a)
    return cfg, tokens, labels, positions, cus


def packed_body(rank, world_size, device):
    from app.gpt.parallelize import packed_attention, shard_positions
    cfg, tokens, labels, positions, cus = _packed_batch()
    model = Llama(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    ref = copy.deepcopy(model)
    # one rank, every document on its own: the sum of their token losses over all counted tokens
    total, count = 0.0, (labels != -100).sum()
    for b, cu in enumerate(cus):
        for a, e in zip(cu, cu[1:]):
            logits = ref(tokens[b:b + 1, a:e], torch.arange(e - a))
            total = total + torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), labels[b, a:e], ignore_index=-100, reduction="sum")
    ref_loss = total / count
    ref_loss.backward()
    group = dist.group.WORLD
    for attn in ("ringX1", "ringX2", "ringX3", "ringX4"):
        model.zero_grad(set_to_none=True)
        tok, lab, _ = shard_batch(tokens, labels, attn, group)
        pos = shard_positions(positions, attn, group)
        loss, global_loss = cp_loss(model(tok, pos, packed_attention(attn, group, cus), labels=lab), lab, group)
        loss.backward()
        reduce_gradients(model, group)
        assert _rel(global_loss, ref_loss.detach()) <= 1e-5, (attn, global_loss.item(), ref_loss.item())
        for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
            err = _rel(p.grad, p_ref.grad)
            assert err <= 1e-5, f"{attn}: gradient of {name} differs by {err:.2e}"


def test_cp4_packed_documents_equal_each_document_alone():
    """No leakage: at cp = 4 the loss and every gradient of a packed batch equal the single-rank
    model run on each document separately (float32, relative 1e-5), for all four functions."""
    spawn(4, packed_body, deadline_s=300)


def test_packed_corpus_windows(tmp_path):
    """app.gpt.corpus packs text files into tokens plus a document index; PackedTokenFile's
    windows restart positions at every document and never label across one."""
    from app.gpt.corpus import build, docs_path
    from app.gpt.data import EOT, PackedTokenFile
    src = tmp_path / "src"
    src.mkdir()
    texts = ["alpha " * 7, "b", "gamma delta " * 9, "epsilon " * 3]
    for i, t in enumerate(texts):
        (src / f"{i}.txt").write_text(t)
    stats = build(src, tmp_path / "c.npy", ("*.txt",))
    assert stats["documents"] == 4 and docs_path(tmp_path / "c.npy").exists()
    data = PackedTokenFile(tmp_path / "c.npy", seq_len=32)
    starts = data.starts.tolist()
    for w in range(data.n_windows):
        tok, lab, pos, cu = data.window(w * 32)
        assert cu[0] == 0 and cu[-1] == 32 and all(b > a for a, b in zip(cu, cu[1:]))
        for a, e in zip(cu, cu[1:]):
            assert pos[a:e].tolist() == list(range(e - a))
        for i in range(32):
            crosses = (w * 32 + i + 1) in starts
            assert (lab[i] == -100) == crosses
            if crosses:
                assert tok[i] == EOT                 # a document's last token closes it


def test_train_packed_stdlib_corpus_cp4(tmp_path):
    """--pack_documents on real text (a slice of the Python standard library, built by
    app.gpt.corpus) at cp = 4: trains, reports documents per sequence and padding, and logs the
    kernel of the document blocks."""
    import sysconfig
    from app.gpt.corpus import build
    corpus = tmp_path / "stdlib.npy"
    build(sysconfig.get_paths()["stdlib"], corpus, ("*.py",), max_docs=60)
    rows = _train(tmp_path, 4, "--context_parallel", "4", "--attn", "ringX2", "--steps", "12",
                  "--data", str(corpus), "--pack_documents", "--seq_len", "256", "--lr", "3e-3",
                  "--no_checkpoint")
    assert [r["step"] for r in rows] == list(range(12))
    assert "; document blocks: " in _train.last_output      # the log names the window kernel too
    assert all(r["docs_per_seq"] >= 1 and r["padding"] == 0.0 for r in rows)
    assert sum(r["loss"] for r in rows[-3:]) / 3 < rows[0]["loss"] - 0.5


def test_compiled_blocks_train_like_eager(tmp_path):
    """--compile (every block through torch.compile, fullgraph, ringX as a custom op) at cp = 2,
    FSDP2 and selective checkpointing, gives the losses of the eager run (float32; aot_eager here: inductor's CPU code generation
    is tested on one block in test_compile.py)."""
    flags = ("--context_parallel", "2", "--attn", "ringX2", "--steps", "4", "--no_checkpoint", "--ac", "selective")
    eager = _train(tmp_path / "eager", 2, *flags)
    compiled = _train(tmp_path / "compiled", 2, *flags, "--compile", "--compile_backend", "aot_eager")
    for a, b in zip(eager, compiled):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
