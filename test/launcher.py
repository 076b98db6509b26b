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

try:
    import ringX  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist

DEADLINE_S = float(os.environ.get("RINGX_TEST_DEADLINE", "600"))


def spawn(world_size: int, body, *args, deadline_s: float = DEADLINE_S) -> None:
    """Run ``body(rank, world_size, device, *args)`` on ``world_size`` fresh processes (one torch
    thread each, 120 s process-group timeout); raise if any fails or the deadline passes."""
    from ringX.launch import spawn as spawn_ranks
    spawn_ranks(world_size, body, *args, deadline_s=deadline_s, threads=1, pg_timeout_s=120)


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
