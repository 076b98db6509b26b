"""Forecast with a trained climate ViT and plot truth, prediction and error.

    python app/vit/inference.py --config debug --checkpoint runs/vit
    srun -n8 bash -c "source app/vit/export_DDP_vars.sh; python app/vit/inference.py --config=mp_p2_ringX \\
        --tensor_parallel=1 --context_parallel=8 --parallel_order=cp-tp-dp --checkpoint runs/vit"

--checkpoint is a run directory (its newest complete checkpoint is used) or one checkpoint
directory; without it, the run of --config with the newest complete checkpoint (under
$RINGX_RUN_DIR or runs/vit) is used. app/vit/inference-cp8.py is this script under the seed's name. The first --samples validation samples are predicted one step ahead with the same
parallel layout flags as train.py (any cp degree: checkpoints reshard). Writes to --out:
predictions.npy and truth.npy ((samples, channels, lat, lon), physical units), scores.json
(latitude-weighted RMSE and ACC per channel, and those of persistence for comparison), and
forecast.png (truth, prediction and error of --channel for the first sample).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.common import checkpoint  # noqa: E402
from app.common.runtime import run_and_shut_down  # noqa: E402
from app.vit.data import unpatchify  # noqa: E402
from app.vit.metrics import ForecastScore  # noqa: E402
from app.vit.train import Setup, add_model_args  # noqa: E402
from ringX.launch import leave  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--checkpoint", default=None,
                   help="run directory or checkpoint directory (default: the run of --config with the newest "
                        "complete checkpoint under $RINGX_RUN_DIR or runs/vit, as the job scripts name them)")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--channel", type=int, default=2, help="channel to plot (2: vorticity)")
    p.add_argument("--out", default=None, help="default: CHECKPOINT/inference")
    return p.parse_args(argv)


def _gather_tokens(t: torch.Tensor, group) -> torch.Tensor:
    """(B, S_local, D) on each cp rank -> (B, S, D) (contiguous ranges in rank order)."""
    if group is None or dist.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def plot(path: Path, truth: np.ndarray, pred: np.ndarray, name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    lim = float(np.abs(truth).max())
    for ax, field, title in zip(axes, (truth, pred, pred - truth), ("truth", "prediction", "error")):
        scale = lim if title != "error" else max(float(np.abs(pred - truth).max()), 1e-12)
        im = ax.imshow(field, cmap="RdBu_r", vmin=-scale, vmax=scale, extent=(0, 360, -90, 90))
        ax.set(title=f"{name}: {title}", xlabel="longitude", ylabel="latitude")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def newest_run(config: str, roots=None) -> Path | None:
    """The run directory of preset ``config`` whose newest complete checkpoint is the newest:
    <root>/<config>_<job id> (the job scripts' name), <root>/<config>, and <root> itself
    (train.py's default --out), for root in $RINGX_RUN_DIR and runs/vit. Rank 0 looks (so a
    checkpoint being written elsewhere cannot make ranks disagree); the others are told."""
    import os
    choice = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        roots = roots or [Path(r) for r in (os.environ.get("RINGX_RUN_DIR"), "runs/vit") if r]
        best = None
        for root in roots:
            for run in [*root.glob(f"{config}_*"), root / config, root]:
                steps = [m for m in run.glob(f"checkpoints/step_*/{checkpoint.MANIFEST}") if m.is_file()]
                if steps:
                    newest = max(m.stat().st_mtime for m in steps)
                    if best is None or newest > best[0]:
                        best = (newest, run)
        choice = str(best[1]) if best else None
    if dist.is_initialized():
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    return Path(choice) if choice else None


def infer(args) -> None:
    """Predict, score and plot (see the module docstring); a collective over all ranks."""
    s = Setup(args)
    cfg = s.cfg
    if args.checkpoint is None:
        found = newest_run(args.config)
        if found is None:
            raise FileNotFoundError(f"no run of preset {args.config!r} with a complete checkpoint under "
                                    "$RINGX_RUN_DIR or runs/vit; train one or pass --checkpoint")
        args.checkpoint = str(found)
        if s.is_root:
            print(f"using the newest run of {args.config}: {found}", flush=True)
    path = Path(args.checkpoint)
    if not (path / checkpoint.MANIFEST).exists():
        path = checkpoint.latest(path / "checkpoints", log=lambda m: s.is_root and print(m, flush=True))
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint under {args.checkpoint}/checkpoints")
    step = checkpoint.load_model(path, s.model, tp_rank=s.tp_rank, group=s.groups["dp_cp"])
    out = Path(args.out) if args.out else Path(args.checkpoint) / "inference"
    valid = s.dataset("valid", 0)
    std, mean = valid.std.reshape(1, -1, 1, 1), valid.mean.reshape(1, -1, 1, 1)
    model_score, persistence = ForecastScore(cfg.channels, s.device), ForecastScore(cfg.channels, s.device)
    preds, truths = [], []
    s.model.eval()
    with torch.no_grad():
        for i in range(min(args.samples, len(valid))):
            x, y = (t.unsqueeze(0).to(s.device) for t in valid.sample(i))
            pred = s.predict(x)
            model_score.add(pred, y, s.weights)
            persistence.add(x, y, s.weights)
            for store, t in ((preds, pred), (truths, y)):
                whole = _gather_tokens(t.float(), s.groups.cp)
                store.append(unpatchify(whole, cfg.patch, cfg.channels, cfg.lat, cfg.lon)[0].cpu().numpy())
    std_t = torch.from_numpy(std.reshape(-1))
    scores = {"checkpoint": str(path), "step": step, "samples": len(preds),
              "model": model_score.result(std_t, s.groups.cp),
              "persistence": persistence.result(std_t, s.groups.cp)}
    if s.is_root:
        out.mkdir(parents=True, exist_ok=True)
        pred_phys, true_phys = np.stack(preds) * std + mean, np.stack(truths) * std + mean
        np.save(out / "predictions.npy", pred_phys.astype(np.float32))
        np.save(out / "truth.npy", true_phys.astype(np.float32))
        (out / "scores.json").write_text(json.dumps(scores, indent=1))
        meta = s.data_root / "meta.json"
        names = json.loads(meta.read_text())["channels"] if meta.exists() else [str(c) for c in range(cfg.channels)]
        plot(out / "forecast.png", true_phys[0, args.channel], pred_phys[0, args.channel], names[args.channel])
        mean_rmse = float(np.mean(scores["model"]["rmse"]))
        print(f"step {step}: {len(preds)} samples, mean RMSE {mean_rmse:.4g} "
              f"(persistence {float(np.mean(scores['persistence']['rmse'])):.4g}); wrote {out}", flush=True)


def main(argv=None) -> int:
    return run_and_shut_down(infer, parse(argv))


if __name__ == "__main__":
    leave(main())  # skips torch's exit-time teardown, which can abort a finished rank
