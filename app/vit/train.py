"""Train the climate ViT forecaster with RingX context parallelism.

    python app/vit/train.py --config debug --steps 30                                    # 1 process
    torchrun --nproc_per_node 4 app/vit/train.py --config debug --context_parallel 4 --steps 30
    srun -n8 bash -c "source app/vit/export_DDP_vars.sh; python app/vit/train.py --config mp_p2_ringX --context_parallel 8"

Ranks are laid out by ringX.parallel.ParallelDims (dp is the rest); each cp group splits the
patch tokens of every sample into contiguous ranges, and each rank reads and embeds only its own
(app/vit/data.py). Attention is the preset's (ringX1 by default, ringX2-4 with causal=False, or
the all-gather baseline), --attn overrides it. --tensor_parallel T splits heads and the MLP over
tp groups (app/vit/tensor_parallel.py). Gradients are summed over cp and averaged over dp:
--dp_engine allreduce (default) keeps the weights replicated and all-reduces the gradients after
backward; --dp_engine fsdp shards weights, gradients and AdamW state over dp x cp with FSDP2.
--ac full recomputes each block in backward (only block inputs are kept). The gradient norm is
clipped to 1 globally (over tp slices and FSDP shards).

Without --data a synthetic dataset for the preset's grid is made once under
runs/vit_data/<lat>x<lon> (app/vit/make_data.py) and reused.

OUT/metrics.jsonl, one object per step: step, loss (normalised MSE), grad_norm, samples_per_s (whole job),
max_mem_gb, skipped; every --eval_every steps and at the last step also val_loss, val_rmse and val_acc (per channel,
latitude-weighted, physical units; app/vit/metrics.py) over --eval_samples validation samples.
Checkpoints (app/common/checkpoint.py) every --checkpoint_every steps and at the end;
--resume continues exactly. SIGTERM/SIGUSR1: finish the step, checkpoint, write OUT/preempted,
exit 0. --nan_policy skip|stop as in the GPT app.
"""
from __future__ import annotations

import argparse
import math
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
from app.common.sharding import apply_fsdp, checkpoint_blocks, clip_grad_norm, set_fsdp_divide_factor  # noqa: E402
from app.common.runtime import (NonFiniteSteps, RunLog, StopRequest, every_and_last, guarded_update, resume_lr,  # noqa: E402
                                run_and_shut_down)
from app.common.presets import parse_overrides  # noqa: E402
from app.vit.config import ViTConfig, load_preset, presets  # noqa: E402
from app.vit.data import ClimateData  # noqa: E402
from app.vit.metrics import ForecastScore, patch_weights  # noqa: E402
from app.vit.model import ClimateViT  # noqa: E402
from app.vit.parallelize import ATTN_CHOICES, cp_attention, cp_mse, local_positions  # noqa: E402
from app.vit.tensor_parallel import apply_tensor_parallel, is_tp_sharded  # noqa: E402
from ringX.comm import GroupComm  # noqa: E402
from ringX.launch import init_distributed, leave  # noqa: E402
from ringX.parallel import ParallelDims, reduce_gradients  # noqa: E402

DP_ENGINES = ("allreduce", "fsdp")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--dp_engine", choices=DP_ENGINES, default="allreduce")
    p.add_argument("--ac", choices=("none", "full"), default="none", help="activation checkpointing")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=1, help="samples per dp rank per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--decay_steps", type=int, default=None, help="cosine decay horizon (default: --steps)")
    p.add_argument("--eval_every", type=int, default=0)
    p.add_argument("--eval_samples", type=int, default=4)
    p.add_argument("--checkpoint_every", type=int, default=0, help="0: only at the end")
    p.add_argument("--no_checkpoint", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--nan_policy", choices=["skip", "stop"], default="skip")
    p.add_argument("--max_nan_steps", type=int, default=10)
    p.add_argument("--inject_nan_at", type=int, default=-1, help="fault injection for testing: NaN loss at this step")
    p.add_argument("--out", default="runs/vit")
    return p.parse_args(argv)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Flags train.py and inference.py share."""
    p.add_argument("--config", default="debug", help=f"preset: {', '.join(presets())}")
    p.add_argument("--embed", type=int, default=None, help="override the preset's width (1024, 2048, 4096)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--override", default=None, metavar="FIELD=VALUE,...",
                   help="set fields of the preset (e.g. lat=32,lon=64,patch=4,embed=64,depth=2: a preset's "
                        "parallel setup at a debug size)")
    p.add_argument("--attn", choices=ATTN_CHOICES, default=None, help="override the preset's attention")
    p.add_argument("--tensor_parallel", type=int, default=1)
    p.add_argument("--context_parallel", type=int, default=1)
    p.add_argument("--context_parallel_inner", type=int, default=1,
                   help="two-level cp (ringX.hybrid): heads split by all-to-all over groups of this many "
                        "consecutive cp ranks (one node), the attention function over the rest")
    p.add_argument("--parallel_order", default="tp-cp-dp")
    p.add_argument("--data", default=None, help="dataset directory (default: make a synthetic one)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0)


class Setup:
    """Process groups, config, model, data and attention for one rank (train and inference)."""

    def __init__(self, args):
        self.args = args
        self.info = info = init_distributed()
        self.dims = ParallelDims(dp=-1, cp=args.context_parallel, tp=args.tensor_parallel,
                                 order=args.parallel_order, world_size=info.world_size,
                                 cp_inner=args.context_parallel_inner)
        self.groups = self.dims.build(names=("cp", "tp", "dp", "dp_cp"))
        self.cfg = cfg = load_preset(args.config, **{**parse_overrides(getattr(args, "override", None), ViTConfig),
                                                     **{k: v for k, v in (("embed", args.embed), ("heads", args.heads),
                                                                          ("attn", args.attn)) if v is not None}})
        coords = self.dims.coords(info.rank)
        self.device, self.dp_rank, self.cp_rank, self.tp_rank = info.device, coords["dp"], coords["cp"], coords["tp"]
        self.is_root = info.rank == 0
        self.data_root = Path(args.data) if args.data else self._synthetic_data()
        if self.dims.cp_inner > 1 and (cfg.attn == "allgather" or (cfg.heads // self.dims.tp) % self.dims.cp_inner):
            raise ValueError(f"--context_parallel_inner {self.dims.cp_inner} splits the heads of a ringX function: "
                             f"it needs a ringX --attn (not {cfg.attn}) and heads per tp rank "
                             f"({cfg.heads // self.dims.tp}) divisible by it")
        self.attn_fn = cp_attention(cfg.attn, self.groups.cp, inner=self.groups.cp_levels)
        self.positions = local_positions(cfg.tokens, self.groups.cp, self.device)
        self.weights = patch_weights(cfg.lat, cfg.lon, cfg.patch, self.positions)
        torch.manual_seed(args.seed)
        self.model = ClimateViT(cfg)
        self.model.init_weights(torch.Generator().manual_seed(args.seed))
        self.model.to(self.device)
        apply_tensor_parallel(self.model, self.groups.tp)
        if getattr(args, "ac", "none") == "full":
            checkpoint_blocks(self.model.blocks)
        bf16 = args.dtype == "bfloat16"
        self.fsdp = getattr(args, "dp_engine", "allreduce") == "fsdp"
        if self.fsdp:
            from torch.distributed.device_mesh import DeviceMesh
            dp_cp = self.groups["dp_cp"]
            apply_fsdp(self.model, self.model.blocks, DeviceMesh.from_group(dp_cp, self.device.type), bf16)
            set_fsdp_divide_factor(self.model, self.dims.dp, dp_cp)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def _synthetic_data(self) -> Path:
        from app.vit.make_data import make_dataset
        cfg = self.cfg
        root = Path("runs") / "vit_data" / f"{cfg.lat}x{cfg.lon}_c{cfg.channels}"
        if self.is_root and not (root / "meta.json").exists():
            print(f"making a synthetic dataset under {root} (app/vit/make_data.py)", flush=True)
            make_dataset(root, cfg.lat, cfg.lon, cfg.channels, steps_per_year=32 if cfg.lat <= 64 else 16,
                         years=3, seed=0)
        dist.barrier()
        return root

    def dataset(self, split: str, seed: int) -> ClimateData:
        cfg = self.cfg
        return ClimateData(self.data_root, split, cfg.lat, cfg.lon, cfg.patch, cfg.channels,
                           self.cp_rank, self.dims.cp, seed=seed)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return self.model(x, self.positions, self.attn_fn).float()

    def evaluate(self, n: int) -> dict:
        """val_loss, val_rmse, val_acc over the first ``n`` validation samples."""
        valid = self.dataset("valid", 0)
        score = ForecastScore(self.cfg.channels, self.device)
        losses = []
        self.model.eval()
        with torch.no_grad():
            for i in range(min(n, len(valid))):
                x, y = (t.unsqueeze(0).to(self.device) for t in valid.sample(i))
                pred = self.predict(x)
                losses.append(cp_mse(pred, y, self.groups.cp)[1])
                score.add(pred, y, self.weights)
        self.model.train()
        res = score.result(torch.from_numpy(valid.std.reshape(-1)), self.groups.cp)
        return {"val_loss": torch.stack(losses).mean().item(), "val_rmse": res["rmse"], "val_acc": res["acc"]}


def train(args) -> list[dict]:
    s = Setup(args)
    dims, groups, model, device = s.dims, s.groups, s.model, s.device
    data = s.dataset("train", args.seed + s.dp_rank)
    opt = LocalShardAdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    horizon = max(1, args.decay_steps or args.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / max(1, args.warmup)) *
                                              0.5 * (1 + math.cos(math.pi * min(k, horizon) / horizon)))
    out = Path(args.out)
    ckpt_root = out / "checkpoints"
    flag_device = GroupComm(dist.group.WORLD).collective_device()
    kw = dict(tp_rank=s.tp_rank, tp=dims.tp, group=groups["dp_cp"])

    def save(done: int) -> Path:
        return checkpoint.save(ckpt_root, done, model, opt, {
            "step": done, "sched": sched.state_dict(), "torch_rng": torch.get_rng_state(), "data": data.state()}, **kw)

    first = 0
    if args.resume:
        path = checkpoint.latest(ckpt_root, log=lambda m: s.is_root and print(m, flush=True))
        if path is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint under {ckpt_root}")
        local = checkpoint.load(path, model, opt, **kw)
        sched.load_state_dict(local["sched"])
        resume_lr(sched, opt, args.lr, lambda m: s.is_root and print(m, flush=True))
        torch.set_rng_state(local["torch_rng"])
        data.load_state(local["data"])
        first = local["step"]
        if s.is_root:
            print(f"resumed from {path} at step {first}", flush=True)
    stop = StopRequest()
    nonfinite = NonFiniteSteps(args.nan_policy, args.max_nan_steps, ckpt_root,
                               lambda m: s.is_root and print(m, flush=True))
    with RunLog(out, args.steps - first, s.is_root, args.resume) as log:
        for step in range(first, args.steps):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            x, y = (t.to(device) for t in data.next_batch(args.batch))
            with s.autocast:
                pred = model(x, s.positions, s.attn_fn)
            loss, global_loss = cp_mse(pred, y, groups.cp)
            if step == args.inject_nan_at:
                loss, global_loss = loss * float("nan"), global_loss * float("nan")
            loss.backward()
            if not s.fsdp:
                reduce_gradients(model, groups["dp_cp"], divide_by=dims.dp)
            grad_norm = clip_grad_norm(model, 1.0, groups.tp, groups["dp_cp"], is_tp_sharded)
            if dims.dp > 1:
                dist.all_reduce(global_loss, group=groups.dp)
                global_loss /= dims.dp
            lr = opt.param_groups[0]["lr"]
            bad, stop_now = guarded_update(opt, sched, global_loss, grad_norm, stop.signum != 0, flag_device)
            loss_value, norm_value = global_loss.item(), grad_norm.item()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            row = {"step": step, "loss": loss_value, "grad_norm": norm_value, "lr": lr,
                   "samples_per_s": args.batch * dims.dp / seconds,
                   "max_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
            nonfinite.count(bad, row)
            if every_and_last(step, args.eval_every, args.steps):
                row.update(s.evaluate(args.eval_samples))
            log.record(row)
            nonfinite.enforce(step, bad, row)
            if stop_now:
                save(step + 1)
                log.preempted(step + 1)
                if s.is_root:
                    print(f"stop requested by signal: checkpoint written after step {step}; exiting", flush=True)
                return log.rows
            if args.checkpoint_every and not args.no_checkpoint and (step + 1) % args.checkpoint_every == 0 \
                    and step + 1 < args.steps:
                save(step + 1)
        if first < args.steps and not args.no_checkpoint:
            save(args.steps)
    return log.rows


def main(argv=None) -> int:
    return run_and_shut_down(train, parse(argv))


if __name__ == "__main__":
    leave(main())  # skips torch's exit-time teardown, which can abort a finished rank
