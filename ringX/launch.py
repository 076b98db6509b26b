"""Start torch.distributed from whichever launcher started this process.

``init_distributed()`` reads rank, world size, local rank and the rendezvous address from, in
this order: torchrun (or ``script/setup_dist_vars.sh``: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST),
OpenMPI (OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK) and MPICH/PMI (PMI_RANK, PMI_SIZE,
MPI_LOCALRANKID). With none of them it runs as a single process. Under MPI with no MASTER_ADDR,
rank 0's host name and a free port are broadcast with mpi4py.

It picks the device from the local rank (CUDA or ROCm GPUs: one per local rank; otherwise CPU) and
the backend: nccl on GPUs (RCCL on ROCm is the same torch backend), gloo on CPU. The process-group
timeout (argument, else $RINGX_TIMEOUT seconds, else 600 s) bounds how long a collective waits for
a dead or stuck peer before the job fails instead of hanging.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """What the launcher told this process."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None


@dataclass(frozen=True)
class DistInfo:
    """The result of init_distributed."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    launcher: str


def _int(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a Slurm host list such as ``gpu[01-03,07],login1`` to host names."""
    hosts, i = [], 0
    parts = re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist)
    for part in parts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for rng in ranges.split(","):
            lo, _, hi = rng.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(n).zfill(len(lo))}{suffix}")
        i += 1
    return hosts


def _slurm_first_host(nodelist: str) -> str:
    if shutil.which("scontrol"):
        try:
            res = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=20, check=True)
            names = res.stdout.split()
            if names:
                return names[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_hostlist(nodelist)[0]


def detect_env(env: dict | None = None) -> DistEnv:
    """Read the launcher's variables (see the module docstring). Raises ValueError naming the
    variables when they are inconsistent."""
    env = dict(os.environ if env is None else env)
    addr = env.get("MASTER_ADDR") or None
    port = _int(env, "MASTER_PORT") if env.get("MASTER_PORT") else None
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [n for n in ("RANK", "WORLD_SIZE") if n not in env]
        if missing:
            raise ValueError(f"torchrun-style environment is incomplete: {', '.join(missing)} not set "
                             "(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are read)")
        rank, size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        launcher = "torchrun"
    elif "SLURM_PROCID" in env:
        if "SLURM_NTASKS" not in env:
            raise ValueError("SLURM_PROCID is set but SLURM_NTASKS is not: run inside srun")
        rank, size = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if addr is None:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            addr = _slurm_first_host(nodelist) if nodelist else "127.0.0.1"
        if port is None and "SLURM_JOB_ID" in env:
            port = 10000 + _int(env, "SLURM_JOB_ID") % 20000
        launcher = "slurm"
    elif "OMPI_COMM_WORLD_RANK" in env:
        rank, size = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0
        launcher = "openmpi"
    elif "PMI_RANK" in env:
        rank, size = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local = _int(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else 0
        launcher = "pmi"
    else:
        return DistEnv("none", 0, 1, 0, addr or "127.0.0.1", port)
    if not 0 <= rank < size:
        raise ValueError(f"{launcher} environment gives rank {rank} outside world size {size}")
    if local < 0:
        raise ValueError(f"{launcher} environment gives a negative local rank {local}")
    return DistEnv(launcher, rank, size, local, addr, port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_rendezvous(denv: DistEnv) -> DistEnv:
    """Under MPI with no MASTER_ADDR: rank 0's host and a free port, broadcast with mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError:
        if denv.master_addr:
            return denv
        raise RuntimeError(f"started by {denv.launcher} without MASTER_ADDR, and mpi4py is not "
                           "installed to find rank 0's address: pip install ringX[mpi], or export "
                           "MASTER_ADDR and MASTER_PORT") from None
    comm = MPI.COMM_WORLD
    mine = (socket.gethostname(), _free_port()) if comm.Get_rank() == 0 else None
    host, port = comm.bcast(mine, root=0)
    return DistEnv(denv.launcher, denv.rank, denv.world_size, denv.local_rank,
                   denv.master_addr or host, denv.master_port or port)


def resolve_timeout(timeout: float | datetime.timedelta | None) -> datetime.timedelta:
    if isinstance(timeout, datetime.timedelta):
        return timeout
    if timeout is None:
        raw = os.environ.get("RINGX_TIMEOUT")
        try:
            timeout = float(raw) if raw else DEFAULT_TIMEOUT_S
        except ValueError:
            raise ValueError(f"RINGX_TIMEOUT={raw!r} is not a number of seconds") from None
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    return datetime.timedelta(seconds=float(timeout))


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def nccl_env_defaults() -> None:
    """PyTorch NCCL/RCCL settings ringX relies on, unless the user set them: a failed or timed-out
    collective raises instead of hanging (TORCH_NCCL_ASYNC_ERROR_HANDLING=1)."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")


def init_distributed(backend: str | None = None,
                     timeout: float | datetime.timedelta | None = None) -> DistInfo:
    """Initialise torch.distributed from the launcher's environment; returns rank, world size,
    local rank, device and backend. Safe to call when it is already initialised."""
    denv = detect_env()
    if denv.launcher in ("openmpi", "pmi") and (denv.master_addr is None or denv.master_port is None):
        denv = _mpi_rendezvous(denv)
    device = pick_device(denv.local_rank)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        nccl_env_defaults()
    if not dist.is_initialized():
        addr = denv.master_addr or "127.0.0.1"
        port = denv.master_port or DEFAULT_PORT
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, init_method=f"tcp://{addr}:{port}",
                                rank=denv.rank, world_size=denv.world_size,
                                timeout=resolve_timeout(timeout), **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), denv.local_rank, device,
                    str(dist.get_backend()), denv.launcher)


def leave(code: int = 0) -> NoReturn:
    """End this rank's process with exit status ``code`` once its work is done: destroy the
    process group (if any), flush stdout and stderr, then ``os._exit``. This skips the
    interpreter's exit-time teardown, where a C++ thread of torch's distributed or profiler
    runtime can abort a finished process ("terminate called without an active exception",
    SIGABRT), which a launcher such as torchrun or srun then reports as a failed rank. MPI, if
    mpi4py started it (the rendezvous under mpirun), is finalised, as mpirun requires. Open
    files must already be closed; ``atexit`` handlers do not run."""
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
        mpi = sys.modules.get("mpi4py.MPI")
        if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
            mpi.Finalize()
    except BaseException as exc:  # report it; the exit status says the teardown failed
        print(f"ringX.launch.leave: tearing down failed: {exc!r}", file=sys.stderr)
        code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _spawned(rank: int, world_size: int, init_file: str, body, args, threads, pg_timeout_s,
             shared_gpu: bool = False, inherit: tuple[dict, str] | None = None) -> None:
    if inherit is not None:  # a forked rank takes the caller's environment and directory, as a spawned one does
        os.environ.clear()
        os.environ.update(inherit[0])
        os.chdir(inherit[1])
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world_size))
    use_nccl = not shared_gpu and torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    if shared_gpu:
        device = torch.device("cuda", 0)
    else:
        device = torch.device("cuda", rank) if use_nccl else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if use_nccl:
        nccl_env_defaults()
    dist.init_process_group("nccl" if use_nccl else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world_size, timeout=resolve_timeout(pg_timeout_s),
                            **({"device_id": device} if use_nccl else {}))
    try:
        body(rank, world_size, device, *args)
    except BaseException:
        dist.destroy_process_group()
        raise  # the spawn wrapper records the traceback for the parent
    leave(0)


def spawn(world_size: int, body, *args, deadline_s: float | None = None, threads: int | None = None,
          pg_timeout_s: float | None = None, shared_gpu: bool = False, start_method: str = "spawn") -> None:
    """Run ``body(rank, world_size, device, *args)`` on ``world_size`` new local processes: NCCL
    with one GPU each where enough GPUs exist, else gloo on CPUs (``threads`` torch threads each,
    default cores / ranks). ``shared_gpu``: every rank on the first GPU, talking through gloo
    (which stages CUDA tensors through host memory), so the GPU code of multi-rank schedules runs
    at any world size on one GPU (for correctness: its timings mean nothing); needs CUDA. Raises
    if a rank fails; with ``deadline_s`` the ranks are killed and TimeoutError raised once it
    passes, so a hang cannot outlive it. A rank whose ``body`` returns ends through ``leave(0)``,
    without the interpreter's exit-time teardown. ``start_method="forkserver"`` forks the ranks
    from one server process, started at the first such call with the modules named in
    ``torch.multiprocessing.set_forkserver_preload`` imported, so later calls skip the imports
    (seconds a rank); each rank still gets this process's environment and working directory."""
    import torch.multiprocessing as mp
    if start_method not in ("spawn", "forkserver"):
        raise ValueError(f"spawn(start_method={start_method!r}): use 'spawn' or 'forkserver'")
    if shared_gpu and not torch.cuda.is_available():
        raise ValueError("spawn(shared_gpu=True) puts every rank on the first CUDA device, and none is visible")
    with tempfile.TemporaryDirectory() as tmp:
        inherit = (dict(os.environ), os.getcwd()) if start_method == "forkserver" else None
        ctx = mp.start_processes(_spawned, nprocs=world_size, join=False, start_method=start_method,
                                 args=(world_size, os.path.join(tmp, "rendezvous"), body, args,
                                       threads, pg_timeout_s, shared_gpu, inherit))
        end = None if deadline_s is None else time.monotonic() + deadline_s
        while not ctx.join(timeout=1.0):
            if end is not None and time.monotonic() > end:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{world_size} ranks of {getattr(body, '__name__', body)} did not "
                                   f"finish within {deadline_s:.0f} s (killed)")
