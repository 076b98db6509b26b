"""ringX.launch: reading each launcher's environment, host lists, timeouts; DeviceMesh layout."""
import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from launcher import spawn
from ringX.launch import _free_port, detect_env, expand_hostlist, resolve_timeout
from ringX.parallel import ParallelDims

ROOT = Path(__file__).resolve().parents[1]


def test_torchrun_env():
    e = detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == \
        ("torchrun", 3, 8, 1, "n1", 1234)


def test_slurm_env_parses_nodelist_and_derives_port():
    e = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                    "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"})
    assert (e.launcher, e.rank, e.world_size, e.local_rank) == ("slurm", 5, 16, 1)
    assert e.master_addr in ("gpu07",)  # scontrol, if present, expands the same way
    assert e.master_port == 10000 + 123456 % 20000


def test_openmpi_and_pmi_env():
    e = detect_env({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "2"})
    assert (e.launcher, e.rank, e.world_size, e.local_rank, e.master_addr) == ("openmpi", 2, 4, 2, None)
    e = detect_env({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"})
    assert (e.launcher, e.rank, e.world_size, e.local_rank) == ("pmi", 1, 2, 1)


def _never_runs(rank, world_size, device):
    raise AssertionError("spawn(shared_gpu=True) must refuse before starting ranks without CUDA")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA refusal")
def test_shared_gpu_spawn_without_cuda_is_a_clear_error():
    from ringX.launch import spawn as spawn_ranks
    with pytest.raises(ValueError, match="first CUDA device"):
        spawn_ranks(2, _never_runs, deadline_s=30, shared_gpu=True)


def _sees_the_callers_environment(rank, world_size, device, want_dir, want_mark):
    assert os.environ.get("RINGX_TEST_MARK") == want_mark, os.environ.get("RINGX_TEST_MARK")
    assert os.getcwd() == want_dir, (os.getcwd(), want_dir)
    assert dist.get_world_size() == world_size == 2


def test_forked_ranks_get_the_callers_environment_and_directory(monkeypatch, tmp_path):
    """Ranks forked from the (already running) fork server see the environment and directory of
    the spawn call, as spawned ones do; an unknown start method is refused."""
    from ringX.launch import spawn as spawn_ranks
    monkeypatch.delenv("RINGX_TEST_MARK", raising=False)
    spawn(2, _sees_the_callers_environment, os.getcwd(), None)          # the server may start here
    monkeypatch.setenv("RINGX_TEST_MARK", "set later")
    monkeypatch.chdir(tmp_path)
    spawn(2, _sees_the_callers_environment, str(tmp_path), "set later")
    with pytest.raises(ValueError, match="start_method='fork'"):
        spawn_ranks(2, _never_runs, start_method="fork")


def test_no_launcher_is_a_single_process():
    e = detect_env({})
    assert (e.launcher, e.rank, e.world_size) == ("none", 0, 1)


@pytest.mark.parametrize("env,match", [
    ({"RANK": "0"}, "WORLD_SIZE not set"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4 outside world size 4"),
    ({"SLURM_PROCID": "0"}, "SLURM_NTASKS is not"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
])
def test_inconsistent_env_names_the_variables(env, match):
    with pytest.raises(ValueError, match=match):
        detect_env(env)


def test_expand_hostlist():
    assert expand_hostlist("frontier[00001-00003,00010],login01") == [
        "frontier00001", "frontier00002", "frontier00003", "frontier00010", "login01"]
    assert expand_hostlist("a[1-2]-ib,b5") == ["a1-ib", "a2-ib", "b5"]


def test_timeout_argument_environment_default(monkeypatch):
    monkeypatch.delenv("RINGX_TIMEOUT", raising=False)
    assert resolve_timeout(None) == datetime.timedelta(seconds=600)
    monkeypatch.setenv("RINGX_TIMEOUT", "42")
    assert resolve_timeout(None) == datetime.timedelta(seconds=42)
    assert resolve_timeout(7) == datetime.timedelta(seconds=7)
    with pytest.raises(ValueError):
        resolve_timeout(-1)


def test_setup_dist_vars_exports_torchrun_variables():
    out = subprocess.run(
        ["bash", "-c", "source script/setup_dist_vars.sh && echo $RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR $MASTER_PORT"],
        cwd=ROOT, capture_output=True, text=True, check=True,
        env={"PATH": "/usr/bin:/bin", "SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0",
             "SLURM_JOB_ID": "10", "SLURM_STEP_ID": "1", "MASTER_ADDR": "head"}).stdout.split()
    assert out == ["2", "4", "0", "head", str(10000 + (10 * 17 + 1) % 20000)]
    res = subprocess.run(["bash", "-c", "source script/setup_dist_vars.sh"], cwd=ROOT,
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert res.returncode != 0 and "inside srun" in res.stderr


def test_leave_destroys_the_group_flushes_and_exits_with_the_code():
    code = ("import atexit, torch.distributed as dist\n"
            "from ringX.launch import init_distributed, leave\n"
            "init_distributed()\n"
            "destroy = dist.destroy_process_group\n"
            "dist.destroy_process_group = lambda: (print(' group destroyed', end=''), destroy())\n"
            "atexit.register(print, 'atexit ran')\n"
            "print('buffered line', end='')\n"
            "leave(3)\n"
            "print('not reached')\n")
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 3, res.stderr[-2000:]
    # the group destroyed, output flushed; nothing after leave(), no atexit handlers
    assert res.stdout == "buffered line group destroyed"


def mesh_body(rank, world_size, device):
    groups = ParallelDims(dp=-1, cp=2, tp=2, order="tp-cp-dp").build()
    mesh = groups.device_mesh(device.type)
    assert mesh.mesh_dim_names == ("dp", "cp", "tp")
    for name in ("cp", "tp", "dp"):
        assert sorted(dist.get_process_group_ranks(mesh.get_group(name))) == \
            sorted(dist.get_process_group_ranks(groups[name])), name


def test_device_mesh_matches_groups():
    spawn(8, mesh_body)


def test_bench_table_script(tmp_path):
    csv_path = tmp_path / "results.csv"
    csv_path.write_text(
        "method,world_size,seqlen,mode,causal,time_ms,tflops_per_gpu\n"
        "ringX4,4,1024,fwd_bwd,True,2.0,100.0\nringX4,8,1024,fwd_bwd,True,1.1,90.0\n"
        "ringX3,4,1024,fwd_bwd,True,2.1,95.0\n")
    res = subprocess.run([sys.executable, "script/bench_table.py", str(csv_path), "--plot",
                          str(tmp_path / "p.png")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[1].split() == ["method", "4", "8"]
    assert lines[2].split() == ["ringX4", "100.0", "90.0"]
    assert lines[3].split() == ["ringX3", "95.0", "-"]


def test_bench_table_scaling_includes_single_gpu_point(tmp_path):
    csv_path = tmp_path / "results.csv"
    csv_path.write_text(
        "method,world_size,seqlen,mode,causal,time_ms,tflops_per_gpu,efficiency\n"
        "single,2,1024,fwd_bwd,False,4.0,100.0,\nringX1,2,1024,fwd_bwd,False,2.5,80.0,0.8\n"
        "ringX1,4,1024,fwd_bwd,False,1.25,80.0,0.8\n")
    res = subprocess.run([sys.executable, "script/bench_table.py", str(csv_path), "--causal", "false",
                          "--plot", str(tmp_path / "p.png")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[1].split() == ["method", "1", "2", "4"]
    assert lines[2].split() == ["single", "100.0", "-", "-"]
    assert lines[3].split() == ["ringX1", "-", "80.0", "80.0"]
    assert lines[5].split() == ["method", "1", "2", "4"]
    assert lines[7].split() == ["ringX1", "-", "0.80", "0.80"]


def test_error_vs_ranks_script_keeps_bf16_error_flat(tmp_path):
    """script/error_vs_ranks.py on CPU: rows for single-device PyTorch and each function at every
    world size, and no function's bf16 error beyond 1.5x its own at N = 1 (the suite's rule)."""
    import json
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, "script/error_vs_ranks.py", "--cpu", "--fns", "ringX2", "ringX4",
                          "--world_sizes", "1", "2", "4", "--seqlen", "64", "--heads", "4", "--kv_heads", "2",
                          "--headdim", "16", "--masks", "causal", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["N"]) for r in rows] == [("pytorch (1 device)", 1)] + [
        (fn, n) for fn in ("ringX2", "ringX4") for n in (1, 2, 4)]
    for fn in ("ringX2", "ringX4"):
        mine = {r["N"]: r for r in rows if r["method"] == fn}
        for name in ("out", "dq", "dk", "dv"):
            assert max(r[name] for r in mine.values()) <= 1.5 * mine[1][name], (fn, name)
        assert max(r["lse"] for r in mine.values()) <= 2e-5, fn
    assert "largest error over N / error at N = 1" in res.stdout
