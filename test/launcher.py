"""Run a test body on several ranks, two ways.

- Under pytest: ``spawn(world_size, body, *args)`` starts ``world_size`` processes (NCCL with one
  GPU each where enough GPUs exist, else gloo on CPU), runs ``body(rank, world_size, device,
  *args)`` on each and fails if any rank raises or the whole run exceeds its deadline (the ranks
  are then killed: a hang fails the test instead of blocking CI).
- As a plain script under srun, mpirun or torchrun: ``script_main(body, *args)`` takes the ranks
  from the environment through ringX.launch.init_distributed and returns an exit code.
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

try:
    import ringX  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEADLINE_S = float(os.environ.get("RINGX_TEST_DEADLINE", "600"))


def _worker(rank: int, world_size: int, init_file: str, use_nccl: bool, body, args) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if use_nccl else torch.device("cpu")
    if use_nccl:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_nccl else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120),
                            **({"device_id": device} if use_nccl else {}))
    try:
        body(rank, world_size, device, *args)
    finally:
        dist.destroy_process_group()


def spawn(world_size: int, body, *args, deadline_s: float = DEADLINE_S) -> None:
    """Run ``body`` on ``world_size`` fresh processes; raise if any fails or time runs out."""
    use_nccl = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        ctx = mp.start_processes(_worker, args=(world_size, init_file, use_nccl, body, args),
                                 nprocs=world_size, join=False, start_method="spawn")
        end = time.monotonic() + deadline_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > end:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{world_size} ranks of {body.__name__} did not finish within "
                                   f"{deadline_s:.0f} s (killed)")


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
