"""Climate ViT: the synthetic data generator and HDF5 reader, and context parallelism that gives
the step-0 loss and every weight gradient of the whole grid on one rank (float32, relative 1e-5)."""
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from launcher import resume_point, run_app, spawn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.vit.config import load_preset, presets  # noqa: E402
from app.vit.data import ClimateData, patchify, unpatchify  # noqa: E402
from app.vit.make_data import make_dataset  # noqa: E402
from app.vit.model import ClimateViT  # noqa: E402
from app.vit.parallelize import cp_attention, cp_mse, local_positions  # noqa: E402
from ringX.parallel import reduce_gradients  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("climate"), lat=32, lon=64, steps_per_year=6, years=3,
                        spinup=20, log=lambda m: None)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def test_presets():
    assert {"debug", "emb1024", "emb2048", "emb4096"} <= set(presets())
    for p in (1, 2, 4, 8):
        for attn, fn in (("ringX", "ringX1"), ("allgather", "allgather")):
            cfg = load_preset(f"mp_p{p}_{attn}")
            assert (cfg.patch, cfg.attn, cfg.embed) == (p, fn, 1024)
    assert load_preset("mp_p1_ringX").tokens == 259200 and load_preset("mp_p8_ringX").tokens == 4050
    with torch.device("meta"):
        blocks = sum(p.numel() for n, p in ClimateViT(load_preset("mp_p2_ringX", embed=4096, heads=32)).named_parameters()
                     if n.startswith("blocks"))
    assert 2.3e9 < blocks < 2.5e9
    with pytest.raises(ValueError, match="does not divide"):
        load_preset("debug", patch=5)


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 6, 48)
    assert torch.equal(unpatchify(p, 4, 3, 8, 12), x)
    assert torch.equal(p[1, 1 * 3 + 2].view(3, 4, 4), x[1, :, 4:8, 8:12])   # patch row 1, column 2


def test_synthetic_data_is_finite_normalised_and_evolving(dataset):
    import h5py
    meta = __import__("json").loads((dataset / "meta.json").read_text())
    assert len(meta["channels"]) == 20 and (meta["lat"], meta["lon"]) == (32, 64)
    with h5py.File(dataset / "train" / "2000.h5", "r") as f:
        fields = f["fields"][...]
    assert fields.shape == (6, 20, 32, 64) and np.isfinite(fields).all()
    change = np.abs(fields[1:] - fields[:-1]).mean() / np.abs(fields).mean()
    assert 1e-3 < change < 0.5, change                     # evolves, but is predictable from the last step
    data = ClimateData(dataset, "train", 32, 64, 4, 20)
    x, y = data.sample(0)
    assert x.shape == y.shape == (128, 320)
    assert abs(float(x.mean())) < 0.5 and 0.3 < float(x.std()) < 3.0
    assert len(data) == 2 * 5 and len(ClimateData(dataset, "valid", 32, 64, 4, 20)) == 5


def test_reader_reads_each_ranks_tokens_and_resumes(dataset):
    whole = ClimateData(dataset, "train", 32, 64, 4, 20, seed=3)
    parts = [ClimateData(dataset, "train", 32, 64, 4, 20, r, 4, seed=3) for r in range(4)]
    for i in (0, 7):
        x, y = whole.sample(i)
        assert torch.equal(torch.cat([p.sample(i)[0] for p in parts]), x)
        assert torch.equal(torch.cat([p.sample(i)[1] for p in parts]), y)
    assert parts[1].row1 - parts[1].row0 == 2                  # reads 2 of 8 patch rows
    first = [whole.next_batch(2) for _ in range(3)]
    state = whole.state()
    later = whole.next_batch(2)
    again = ClimateData(dataset, "train", 32, 64, 4, 20, seed=3)
    again.load_state(state)
    assert torch.equal(again.next_batch(2)[0], later[0]) and len(first) == 3
    with pytest.raises(ValueError, match="do not split evenly"):
        ClimateData(dataset, "train", 32, 64, 4, 20, 0, 3)


def _model_and_reference(device, root):
    """The debug ViT (every parameter mattering), one training sample, and the whole-grid
    single-rank reference model after backward of its step-0 loss."""
    cfg = load_preset("debug")
    model = ClimateViT(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():                                      # make every parameter matter
        model.head.weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    model = model.to(device)
    data = ClimateData(root, "train", cfg.lat, cfg.lon, cfg.patch, cfg.channels)
    x, y = (t.unsqueeze(0).to(device) for t in data.sample(3))
    ref = copy.deepcopy(model)
    ref_loss = torch.nn.functional.mse_loss(ref(x, torch.arange(cfg.tokens, device=device)), y)
    ref_loss.backward()
    return cfg, model, ref, ref_loss


def _check_step0(model, ref, ref_loss, global_loss, what, tp_rank=0, tp=1):
    """Loss and every gradient (a tp shard against the same slice of the reference's) within
    1e-5; wk.bias gets no gradient (softmax ignores a per-query constant), up to rounding."""
    from app.common.weights import canonical_name
    from app.vit.tensor_parallel import shard_of
    assert _rel(global_loss, ref_loss.detach()) <= 1e-5, (global_loss.item(), ref_loss.item())
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    scale = max(g.norm().item() for g in ref_grads.values())
    for name, p in model.named_parameters():
        name = canonical_name(name)
        if name.endswith("wk.bias"):
            assert p.grad.norm().item() <= 1e-6 * scale and ref_grads[name].norm().item() <= 1e-6 * scale, name
            continue
        err = _rel(p.grad, shard_of(name, ref_grads[name], tp_rank, tp))
        assert err <= 1e-5, f"{what}: gradient of {name} differs by {err:.2e}"


def vit_cp_body(rank, world_size, device, root, attn):
    cfg, model, ref, ref_loss = _model_and_reference(device, root)
    group = dist.group.WORLD
    pos = local_positions(cfg.tokens, group, device)
    local = ClimateData(root, "train", cfg.lat, cfg.lon, cfg.patch, cfg.channels, rank, world_size)
    xl, yl = (t.unsqueeze(0).to(device) for t in local.sample(3))
    loss, global_loss = cp_mse(model(xl, pos, cp_attention(attn, group)), yl, group)
    loss.backward()
    reduce_gradients(model, group)
    _check_step0(model, ref, ref_loss, global_loss, attn)


def vit_tp_cp_body(rank, world_size, device, root, order):
    """tp=2 x cp=2 in ``order``: heads and MLP split over tp, tokens over cp."""
    from app.vit.tensor_parallel import apply_tensor_parallel
    from ringX.parallel import ParallelDims
    cfg, model, ref, ref_loss = _model_and_reference(device, root)
    dims = ParallelDims(dp=1, cp=2, tp=2, order=order)
    groups = dims.build(names=("cp", "tp"))
    coords = dims.coords(rank)
    apply_tensor_parallel(model, groups.tp)
    pos = local_positions(cfg.tokens, groups.cp, device)
    local = ClimateData(root, "train", cfg.lat, cfg.lon, cfg.patch, cfg.channels, coords["cp"], 2)
    xl, yl = (t.unsqueeze(0).to(device) for t in local.sample(3))
    loss, global_loss = cp_mse(model(xl, pos, cp_attention("ringX1", groups.cp)), yl, groups.cp)
    loss.backward()
    reduce_gradients(model, groups.cp)
    _check_step0(model, ref, ref_loss, global_loss, f"tp2 x cp2 {order}", coords["tp"], 2)


def vit_two_level_body(rank, world_size, device, root, attn):
    """cp = 4 as 2 x 2: heads over the inner pairs by all-to-all, ``attn`` over the outer."""
    from ringX.parallel import ParallelDims
    cfg, model, ref, ref_loss = _model_and_reference(device, root)
    groups = ParallelDims(dp=1, cp=4, tp=1, world_size=4, cp_inner=2).build(names=("cp",))
    pos = local_positions(cfg.tokens, groups.cp, device)
    local = ClimateData(root, "train", cfg.lat, cfg.lon, cfg.patch, cfg.channels, rank, world_size)
    xl, yl = (t.unsqueeze(0).to(device) for t in local.sample(3))
    attn_fn = cp_attention(attn, groups.cp, inner=groups.cp_levels)
    loss, global_loss = cp_mse(model(xl, pos, attn_fn), yl, groups.cp)
    loss.backward()
    reduce_gradients(model, groups.cp)
    _check_step0(model, ref, ref_loss, global_loss, f"2 x 2 {attn}")


def test_cp4_as_2x2_step0_loss_and_gradients_equal_cp1(dataset):
    spawn(4, vit_two_level_body, str(dataset), "ringX2", deadline_s=300)


@pytest.mark.parametrize("attn", ["ringX1", "ringX3", "allgather"])
def test_cp4_step0_loss_and_gradients_equal_cp1(dataset, attn):
    spawn(4, vit_cp_body, str(dataset), attn, deadline_s=300)


@pytest.mark.parametrize("order", ["cp-tp-dp", "tp-cp-dp"])
def test_tp2_cp2_step0_loss_and_gradients_equal_cp1(dataset, order):
    spawn(4, vit_tp_cp_body, str(dataset), order, deadline_s=300)


def _run_app(tmp_path, nproc, script, *flags):
    """An app/vit script on ``nproc`` ranks (debug, float32) -> metrics rows of its --out."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    _run_app.last_output, rows = run_app(script, nproc, "--config", "debug", "--dtype", "float32", *flags)
    return rows


def test_train_30_steps_cp4_learns_then_inference_writes_its_png(tmp_path, dataset):
    import json
    rows = _run_app(tmp_path, 4, "app/vit/train.py", "--context_parallel", "4", "--steps", "30", "--data", str(dataset),
                    "--out", str(tmp_path / "run"), "--eval_every", "20", "--eval_samples", "2")
    assert [r["step"] for r in rows] == list(range(30))
    assert [r["step"] for r in rows if "val_rmse" in r] == [19, 29]       # every 20 steps and the last
    assert {"step", "loss", "samples_per_s", "max_mem_gb", "val_rmse", "val_acc"} <= set(rows[-1])
    # 10 training samples, one per step: steps 0-9 and 20-29 are epochs over the same samples
    first, last = sum(r["loss"] for r in rows[:10]) / 10, sum(r["loss"] for r in rows[20:]) / 10
    assert last < 0.9 * first, (first, last)
    assert len(rows[-1]["val_rmse"]) == 20 and all(-1.0 <= a <= 1.0 for a in rows[-1]["val_acc"])
    _run_app(tmp_path, 2, "app/vit/inference.py", "--context_parallel", "2", "--data", str(dataset),
             "--checkpoint", str(tmp_path / "run"), "--samples", "2")
    inf = tmp_path / "run" / "inference"
    assert (inf / "forecast.png").stat().st_size > 10_000
    pred, truth = np.load(inf / "predictions.npy"), np.load(inf / "truth.npy")
    assert pred.shape == truth.shape == (2, 20, 32, 64) and np.isfinite(pred).all()
    scores = json.loads((inf / "scores.json").read_text())
    assert scores["step"] == 30 and len(scores["model"]["rmse"]) == 20


def test_resume_is_bit_exact_cp2_dp2_allgather(tmp_path, dataset):
    common = ["--context_parallel", "2", "--attn", "allgather", "--data", str(dataset), "--parallel_order", "cp-tp-dp",
              "--decay_steps", "8"]
    straight = _run_app(tmp_path / "a", 4, "app/vit/train.py", *common, "--steps", "8", "--checkpoint_every", "5",
                        "--out", str(tmp_path / "a" / "run"))
    resume_point(tmp_path / "a" / "run", 5, tmp_path / "b" / "run")
    resumed = _run_app(tmp_path / "b", 4, "app/vit/train.py", *common, "--steps", "8", "--resume",
                       "--out", str(tmp_path / "b" / "run"))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert "resumed from" in _run_app.last_output


def test_tp2_cp2_fsdp_full_ac_trains_like_one_rank_and_infers(tmp_path, dataset):
    """tp=2 x cp=2 with FSDP2 and full activation checkpointing: the loss sequence of one rank
    (float32, within 1e-5); inference reads its per-tp-rank checkpoint with the same tp."""
    common = ["--data", str(dataset), "--steps", "4", "--decay_steps", "8"]
    one = _run_app(tmp_path / "one", 1, "app/vit/train.py", *common, "--no_checkpoint", "--out", str(tmp_path / "one"))
    run = tmp_path / "tp" / "run"
    tp = _run_app(tmp_path / "tp", 4, "app/vit/train.py", *common, "--tensor_parallel", "2", "--context_parallel", "2",
                  "--dp_engine", "fsdp", "--ac", "full", "--out", str(run))
    for a, b in zip(one, tp):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (a["grad_norm"], b["grad_norm"])
    assert sorted(p.name for p in (run / "checkpoints" / "step_00000004").iterdir() if p.is_dir()) == ["tp00", "tp01"]
    _run_app(tmp_path / "tp", 4, "app/vit/inference.py", "--tensor_parallel", "2", "--context_parallel", "2",
             "--data", str(dataset), "--checkpoint", str(run), "--samples", "1")
    assert (run / "inference" / "forecast.png").stat().st_size > 10_000


def test_train_two_level_cp_like_one_rank(tmp_path, dataset):
    """--context_parallel 4 --context_parallel_inner 2 trains with the losses of one rank."""
    common = ["--data", str(dataset), "--steps", "3", "--no_checkpoint"]
    one = _run_app(tmp_path / "one", 1, "app/vit/train.py", *common, "--out", str(tmp_path / "one"))
    two = _run_app(tmp_path / "two", 4, "app/vit/train.py", *common, "--context_parallel", "4",
                   "--context_parallel_inner", "2", "--attn", "ringX3", "--out", str(tmp_path / "two"))
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])


def test_resume_with_another_lr_uses_it(tmp_path, dataset):
    """A run resumed with a new --lr follows that rate's schedule from where it was, and says so."""
    common = ["--data", str(dataset), "--warmup", "1", "--decay_steps", "8"]
    straight = _run_app(tmp_path / "a", 1, "app/vit/train.py", *common, "--steps", "4", "--lr", "2e-4",
                        "--no_checkpoint", "--out", str(tmp_path / "a" / "run"))
    _run_app(tmp_path / "b", 1, "app/vit/train.py", *common, "--steps", "2", "--lr", "1e-3",
             "--out", str(tmp_path / "b" / "run"))
    resumed = _run_app(tmp_path / "b", 1, "app/vit/train.py", *common, "--steps", "4", "--lr", "2e-4", "--resume",
                       "--out", str(tmp_path / "b" / "run"))
    assert resumed[0]["lr"] == 1e-3
    assert [r["lr"] for r in resumed[2:]] == [pytest.approx(r["lr"]) for r in straight[2:]]
    assert "--lr 0.0002 replaces the checkpoint's base rate 0.001" in _run_app.last_output


def test_nan_policy_and_a_broken_checkpoint_is_skipped(tmp_path, dataset):
    """--nan_policy skip drops the poisoned update and counts it; stop exits non-zero and keeps
    the last good checkpoint; a later checkpoint without a manifest is skipped on resume."""
    common = ["--context_parallel", "2", "--data", str(dataset), "--checkpoint_every", "2", "--inject_nan_at", "3"]
    rows = _run_app(tmp_path / "skip", 2, "app/vit/train.py", *common, "--steps", "6", "--out", str(tmp_path / "skip" / "run"))
    assert [r["skipped"] for r in rows] == [0, 0, 0, 1, 1, 1] and rows[3]["loss"] != rows[3]["loss"]
    assert "update skipped (1 so far)" in _run_app.last_output
    with pytest.raises(AssertionError, match="FloatingPointError: step 3"):
        _run_app(tmp_path / "stop", 2, "app/vit/train.py", *common, "--steps", "6", "--nan_policy", "stop",
                 "--out", str(tmp_path / "stop" / "run"))
    ckpts = tmp_path / "stop" / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]
    (ckpts / "step_00000004").mkdir()
    (ckpts / "step_00000004" / "rank00000.pt").write_bytes(b"partial")
    _run_app(tmp_path / "stop", 2, "app/vit/train.py", "--context_parallel", "2", "--data", str(dataset),
             "--steps", "3", "--resume", "--out", str(tmp_path / "stop" / "run"))
    assert "skipping checkpoint" in _run_app.last_output and "step_00000002 at step 2" in _run_app.last_output
