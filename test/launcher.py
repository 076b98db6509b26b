"""Run a test body on several ranks, two ways.

- Under pytest: ``spawn(world_size, body, *args)`` starts ``world_size`` processes (NCCL with one
  GPU each where enough GPUs exist, else gloo on CPU), runs ``body(rank, world_size, device,
  *args)`` on each and fails if any rank raises or the whole run exceeds its deadline (the ranks
  are then killed: a hang fails the test instead of blocking CI).
- As a plain script under srun, mpirun or torchrun: ``script_main(body, *args)`` takes the ranks
  from the environment through ringX.launch.init_distributed and returns an exit code.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

try:
    import ringX  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist

DEADLINE_S = float(os.environ.get("RINGX_TEST_DEADLINE", "600"))


# what every forked rank has imported already (a second a rank, for four ranks on two cores)
FORKSERVER_PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp",
                      "torch.distributed.checkpoint", "ringX", "ringX.launch"]


def spawn(world_size: int, body, *args, deadline_s: float = DEADLINE_S) -> None:
    """Run ``body(rank, world_size, device, *args)`` on ``world_size`` fresh processes (one torch
    thread each, 120 s process-group timeout); raise if any fails or the deadline passes. The
    ranks fork from a server that has imported torch and RingX once (``FORKSERVER_PRELOAD``):
    each is a new process with the environment of this one, without the imports' cost."""
    import torch.multiprocessing as mp
    from ringX.launch import spawn as spawn_ranks
    mp.set_forkserver_preload(FORKSERVER_PRELOAD)
    spawn_ranks(world_size, body, *args, deadline_s=deadline_s, threads=1, pg_timeout_s=120,
                start_method="forkserver")


def torchrun_command(nproc: int, script: str, *args: str, cpu: bool = False) -> tuple[list[str], dict]:
    """(argv, environment) that run ``script`` (relative to the checkout) on ``nproc`` local
    ranks under ``torchrun --standalone``, without rank variables leaking in from this process.
    With fewer GPUs than ranks, or ``cpu``, the GPUs are hidden, so that the ranks run on CPU with
    gloo, as spawn's do (NCCL takes one GPU per rank)."""
    import torch
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    if cpu or (torch.cuda.is_available() and torch.cuda.device_count() < nproc):
        env["CUDA_VISIBLE_DEVICES"] = ""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
            script, *args], env


def run_app(script: str, nproc: int, *args: str, timeout: float = 600, cpu: bool = False):
    """Run an app's ``train.py``/``inference.py`` under torchrun from the checkout root; require
    exit 0 (else fail with its output). Returns (stdout + stderr, the rows of OUT/metrics.jsonl
    for the ``--out`` in ``args``, [] when there is none). ``cpu``: on CPU even where GPUs are
    (runs whose results are compared with CPU runs)."""
    import json
    import subprocess
    argv, env = torchrun_command(nproc, script, *args, cpu=cpu)
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    # the raised errors first (torchrun's own report can push them out of a tail), then the tails
    errors = [line for line in (res.stdout + res.stderr).splitlines() if "Error: " in line]
    assert res.returncode == 0, "\n".join(dict.fromkeys(errors)) + "\n" + res.stdout[-3000:] + res.stderr[-3000:]
    metrics = Path(args[list(args).index("--out") + 1]) / "metrics.jsonl" if "--out" in args else None
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics and metrics.exists() else []
    return res.stdout + res.stderr, rows


def resume_point(run: Path, step: int, dest: Path) -> Path:
    """Copy the app run directory ``run`` (its ``--out``) to ``dest`` as it stood when its
    checkpoint of ``step`` was written: later checkpoints removed, OUT/metrics.jsonl cut to the
    steps before ``step``. ``--resume`` into ``dest`` then continues from that checkpoint, as a run
    stopped there would (one launch fewer than training the first part again). -> dest"""
    import json
    import shutil
    shutil.copytree(run, dest)
    kept = dest / "checkpoints" / f"step_{step:08d}"
    assert (kept / "manifest.json").exists(), f"{run} has no complete checkpoint of step {step}"
    for path in (dest / "checkpoints").glob("step_*"):
        if path.name > kept.name:
            shutil.rmtree(path)
    metrics = dest / "metrics.jsonl"
    if metrics.exists():
        rows = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] < step]
        metrics.write_text("".join(line + "\n" for line in rows))
    return dest


def script_main(body, *args) -> int:
    """Entry point for running a test file under srun / mpirun / torchrun."""
    from ringX.launch import init_distributed

    info = init_distributed()
    try:
        body(info.rank, info.world_size, info.device, *args)
    except Exception as exc:  # report on every rank, then fail the job step
        print(f"FAILED rank {info.rank}/{info.world_size} ({info.launcher}): {exc}", flush=True)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(f"PASSED rank {info.rank}/{info.world_size} ({info.launcher}, {info.backend})", flush=True)
    return 0
