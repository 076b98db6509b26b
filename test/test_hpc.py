"""The launch layer under real launchers: Slurm (srun, sbatch), OpenMPI (mpirun) and torchrun.

script/run_tests.sh starts a private single-node Slurm when none answers (as root) and installs
OpenMPI and mpi4py, then sets RINGX_REQUIRE_HPC=1 so that a missing launcher fails these tests
instead of skipping them.
"""
import csv
import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("RINGX_REQUIRE_HPC") == "1"
ALGOS = ["ringX1", "ringX2", "ringX3", "ringX4"]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(extra)
    return env


def _need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t, path=_env()["PATH"]) is None]
    if not missing and "srun" in tools:
        ok = subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
        missing = [] if ok else ["a Slurm controller that answers (sinfo)"]
    if missing:
        msg = f"not available: {', '.join(missing)}"
        if REQUIRED:
            pytest.fail(msg + " (RINGX_REQUIRE_HPC=1)")
        pytest.skip(msg)


def _run(cmd, cwd=ROOT, timeout=400, **env) -> tuple[int, str]:
    res = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    return res.returncode, res.stdout + res.stderr


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def _job_state(job: str) -> dict:
    rc, out = _run(["scontrol", "show", "job", job], timeout=30)
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return fields if rc == 0 else {}


def _job_end_state(job: str, timeout: float) -> dict:
    """Look at ``job`` every half second until it has ended or ``timeout`` s have passed -> the
    last ``scontrol show job`` fields seen (JobState in ENDED if it ended)."""
    deadline, state = time.time() + timeout, {}
    while time.time() < deadline:
        state = _job_state(job)
        if state.get("JobState") in ENDED:
            break
        time.sleep(0.5)
    return state


def _sbatch_wait(args: list[str], cwd=ROOT, timeout=400, **env) -> tuple[int, str]:
    """``sbatch ARGS``, then wait for the job to end -> (the job's exit code, sbatch's output), as
    ``sbatch --wait`` gives, but looking every half second: sbatch's own wait looks at growing
    intervals, and every test that used it took 42.0 s whatever its job's length."""
    _need("scontrol", "scancel")
    rc, out = _run(["sbatch", "--parsable", *args], cwd=cwd, timeout=60, **env)
    if rc != 0:
        return rc, out
    job = out.strip().splitlines()[-1].split(";")[0]
    state = _job_end_state(job, timeout)
    if state.get("JobState") in ENDED:
        code, signal = (int(x) for x in state.get("ExitCode", "1:0").split(":"))
        ok = state["JobState"] == "COMPLETED"
        return (code or (128 + signal if signal else (0 if ok else 1))), out
    _run(["scancel", job], timeout=30)
    pytest.fail(f"job {job} still running {timeout} s after sbatch {' '.join(args)}")


def _assert_passed(rc: int, out: str, ranks: int, launcher: str) -> None:
    assert rc == 0, out[-3000:]
    assert out.count("PASSED rank") == ranks, out[-3000:]
    assert f"({launcher}, " in out, out[-3000:]


# ringX1 and ringX2 run under srun in the two tests below as well
@pytest.mark.parametrize("algo", [pytest.param(a, marks=pytest.mark.slow) if a in ("ringX1", "ringX2") else a
                                  for a in ALGOS])
def test_srun_each_algorithm(algo):
    _need("srun")
    rc, out = _run(["srun", "-n", "4", "--kill-on-bad-exit=1", "bash", "-c",
                    f"source script/setup_dist_vars.sh; python test/test_{algo}_attn_func.py"])
    _assert_passed(rc, out, 4, "torchrun")  # setup_dist_vars.sh exports torchrun-style variables


def test_srun_from_script_dir_as_in_the_seed():
    _need("srun")
    rc, out = _run(["srun", "-n4", "bash", "-c",
                    "source setup_dist_vars.sh; python ../test/test_ringX1_attn_func.py"],
                   cwd=ROOT / "script")
    _assert_passed(rc, out, 4, "torchrun")


def test_srun_without_setup_script_reads_slurm_variables():
    _need("srun")
    rc, out = _run(["srun", "-n", "2", "python", "test/test_ringX2_attn_func.py"])
    _assert_passed(rc, out, 2, "slurm")


@pytest.mark.parametrize("script,algo", [("submit_frontier.sh", "ringX3"), ("submit_cuda.sh", "ringX4"),
                                         pytest.param("submit_cuda.sh", "hybrid2-ringX3", marks=pytest.mark.slow)])
def test_sbatch_job_script_cpu_mode(tmp_path, script, algo):
    _need("srun", "sbatch")
    logs, runs = tmp_path / "logs", tmp_path / "runs"
    logs.mkdir()
    rc, out = _sbatch_wait(["-o", str(logs / "job-%j.out"), script, f"{algo}_attn"],
                   cwd=ROOT / "script", RINGX_MODE="cpu", RINGX_LOG_DIR=str(logs),
                   RINGX_RUN_DIR=str(runs), RINGX_BENCH_ARGS="--repeats 1 --warmup 0")
    log = logs / f"{algo}_N1.log"
    assert rc == 0, out + (log.read_text() if log.exists() else "") + "".join(
        p.read_text() for p in logs.glob("job-*.out"))
    text = log.read_text()
    assert "# exit 0" in text
    results = glob.glob(str(runs / f"{algo}_N1_*" / "results.csv"))
    assert len(results) == 1
    rows = [r for r in csv.DictReader(open(results[0])) if r["method"] == algo]
    assert len(rows) == 8  # tiny sweep: 2 (batch, S) pairs x causal on/off x fwd, fwd_bwd
    assert all(float(r["time_ms"]) > 0 and float(r["check_err"]) < 2e-2 for r in rows)


def test_sbatch_rejects_an_unknown_algorithm(tmp_path):
    _need("srun", "sbatch")
    rc, out = _sbatch_wait(["-o", str(tmp_path / "job-%j.out"), "submit_frontier.sh", "ringX9_attn"],
                   cwd=ROOT / "script", RINGX_MODE="cpu", RINGX_LOG_DIR=str(tmp_path))
    assert rc != 0
    assert "unknown algorithm 'ringX9_attn'" in "".join(p.read_text() for p in tmp_path.glob("job-*.out"))


def test_sbatch_benchmark_stops_cleanly_on_the_time_limit_signal(tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@60 sends before the limit): the log says why,
    the ranks are stopped, and the job exits non-zero promptly."""
    _need("srun", "sbatch", "scancel", "scontrol")
    logs = tmp_path / "logs"
    logs.mkdir()
    rc, out = _run(["sbatch", "--parsable", "-o", str(logs / "job-%j.out"), "submit_cuda.sh", "ringX1_attn"],
                   cwd=ROOT / "script", RINGX_MODE="cpu", RINGX_LOG_DIR=str(logs), RINGX_RUN_DIR=str(tmp_path / "runs"),
                   RINGX_BENCH_ARGS="--repeats 2000 --warmup 0")
    assert rc == 0, out
    job = out.strip().split(";")[0]
    log = logs / "ringX1_N1.log"
    deadline = time.time() + 180
    while not (log.exists() and "TFLOP" in log.read_text() or log.exists() and log.read_text().count("\n") > 4) \
            and time.time() < deadline:
        time.sleep(0.5)
    assert _job_state(job).get("JobState") == "RUNNING", log.read_text() if log.exists() else ""
    sent = time.time()
    assert _run(["scancel", "-b", "-s", "USR1", job], timeout=30)[0] == 0
    state = {}
    while time.time() < sent + 120:
        state = _job_state(job)
        if state.get("JobState") not in ("RUNNING", "PENDING", "COMPLETING", None):
            break
        time.sleep(1)
    text = log.read_text()
    assert "# USR1: the time limit is near; stopping the benchmark" in text, text[-2000:]
    assert "(stopped by USR1 before the time limit)" in text and state.get("JobState") == "FAILED", (state, text[-2000:])
    assert time.time() - sent < 60


def test_mpirun_with_mpi4py_rendezvous():
    _need("mpirun")
    rc, out = _run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "4", "python",
                    "test/test_ringX2_attn_func.py"])
    _assert_passed(rc, out, 4, "openmpi")


def test_torchrun():
    rc, out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
                    "--standalone", "test/test_ringX3_attn_func.py"])
    _assert_passed(rc, out, 4, "torchrun")


def _dead_rank(cmd, stamp: Path) -> None:
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("ranks still running 180 s after start: a dead rank left the job hanging")
    end = time.time()
    assert stamp.exists(), f"the victim never reached its kill point:\n{out[-3000:]}"
    killed_at = float(stamp.read_text())
    assert proc.returncode != 0, out[-3000:]
    assert end - killed_at < 60, f"job ended {end - killed_at:.0f} s after the kill"
    assert "finished all steps" not in out
    assert start < killed_at


def test_dead_rank_under_srun(tmp_path):
    _need("srun")
    stamp = tmp_path / "killed"
    _dead_rank(["srun", "-n", "4", "--kill-on-bad-exit=1", "bash", "-c",
                f"source script/setup_dist_vars.sh; python test/dead_rank_worker.py {stamp}"], stamp)


def test_dead_rank_under_torchrun(tmp_path):
    stamp = tmp_path / "killed"
    _dead_rank([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
                "--standalone", "test/dead_rank_worker.py", str(stamp)], stamp)


def test_dead_rank_mid_decode_under_torchrun(tmp_path):
    """A rank dying between two decode steps from a sharded KV cache ends the job."""
    stamp = tmp_path / "killed"
    _dead_rank([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
                "--standalone", "test/dead_rank_worker.py", str(stamp), "decode"], stamp)


def test_dead_rank_under_mpirun(tmp_path):
    _need("mpirun")
    stamp = tmp_path / "killed"
    _dead_rank(["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "4", "python",
                "test/dead_rank_worker.py", str(stamp)], stamp)


def test_gpt_job_preempted_requeues_and_resumes(tmp_path):
    """app/gpt/job.sb under the real Slurm: USR1 to the job's tasks (as before a time limit or a
    preemption) -> checkpoint, exit 0, the script requeues the job, which resumes and finishes."""
    _need("srun", "sbatch", "scancel", "scontrol")
    runs = tmp_path / "runs"
    rc, out = _run(["sbatch", "--parsable", "-o", str(tmp_path / "job-%j.out"), "app/gpt/job.sb", "debug",
                    "--context_parallel", "2", "--attn", "ringX1", "--dtype", "float32", "--steps", "40"],
                   RINGX_PLATFORM="cpu", RINGX_CPU_RANKS="2", RINGX_RUN_DIR=str(runs), RINGX_PYTHON=sys.executable)
    assert rc == 0, out
    job = out.strip().split(";")[0]
    metrics = runs / f"debug_{job}" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.5)
    assert metrics.exists(), (tmp_path / f"job-{job}.out").read_text() if (tmp_path / f"job-{job}.out").exists() else out
    assert _run(["scancel", "-s", "USR1", job], timeout=30)[0] == 0
    state = _job_end_state(job, 400)
    log = (tmp_path / f"job-{job}.out").read_text()
    assert state.get("JobState") == "COMPLETED" and state.get("Restarts") == "1", (state, log[-3000:])
    assert "preempted after step" in log and "requeueing job" in log and "resumed from" in log, log[-3000:]
    steps = [__import__("json").loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(40)), steps


def test_vit_submit_script_cpu_mode(tmp_path):
    """app/vit/submit_frontier_cp.sh under the real Slurm in CPU mode, from app/vit as in the seed."""
    _need("srun", "sbatch")
    runs = tmp_path / "runs"
    rc, out = _sbatch_wait(["-o", str(tmp_path / "job-%j.out"), "submit_frontier_cp.sh",
                    "debug", "--context_parallel", "2", "--steps", "3", "--dtype", "float32"],
                   cwd=ROOT / "app" / "vit", RINGX_PLATFORM="cpu", RINGX_CPU_RANKS="2", RINGX_RUN_DIR=str(runs),
                   RINGX_PYTHON=sys.executable)
    logs = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert rc == 0, out + logs
    metrics = glob.glob(str(runs / "debug_*" / "metrics.jsonl"))
    assert len(metrics) == 1 and len(open(metrics[0]).read().splitlines()) == 3, logs
    assert "# ringx-vit: preset=debug platform=cpu" in logs


DEBUG_GPT = "dim=64,n_layers=2,n_heads=4,n_kv_heads=2,ffn_dim=128,vocab_size=512"
DEBUG_VIT = "lat=32,lon=64,patch=4,embed=64,depth=2,heads=4"


def test_seed_gpt_command_runs_the_1m_run_preset(tmp_path):
    """The seed README's `cd app/gpt/train; sbatch job.sb xforge/llama3-8b-1m` under the real
    Slurm in CPU mode: the run preset brings its cp = 8, ringX4, full checkpointing and chunking;
    a debug-sized --override of the model (and a short --seq_len and --steps) is all that is
    added."""
    _need("srun", "sbatch")
    runs = tmp_path / "runs"
    rc, out = _sbatch_wait(["-o", str(tmp_path / "job-%j.out"), "job.sb", "xforge/llama3-8b-1m",
                    "--override", DEBUG_GPT, "--seq_len", "1024", "--steps", "2", "--dtype", "float32",
                    "--checkpoint_every", "0"],
                   cwd=ROOT / "app" / "gpt" / "train", RINGX_PLATFORM="cpu", RINGX_CPU_RANKS="8",
                   RINGX_RUN_DIR=str(runs), RINGX_PYTHON=sys.executable, timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert rc == 0, out + logs[-3000:]
    assert "# ringx-gpt: preset=xforge/llama3-8b-1m platform=cpu" in logs, logs[-3000:]
    runs_made = glob.glob(str(runs / "xforge" / "llama3-8b-1m_*"))
    assert len(runs_made) == 1, logs[-3000:]
    rows = [__import__("json").loads(line) for line in open(Path(runs_made[0]) / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1]
    args = __import__("json").loads((Path(runs_made[0]) / "args.json").read_text())
    assert (args["context_parallel"], args["attn"], args["ac"], args["loss_chunk"], args["mlp_chunk"]) == \
        (8, "ringX4", "full", 8192, 65536), args


def test_seed_vit_inference_command_finds_the_newest_checkpoint(tmp_path):
    """The seed README's ViT inference command, from app/vit under the real Slurm, with a
    debug-sized --override: inference-cp8.py at cp = 8 finds the newest complete checkpoint of
    its preset's run (trained here by submit_frontier_cp.sh at cp = 2) and writes its forecast."""
    _need("srun", "sbatch")
    runs = tmp_path / "runs"
    env = dict(RINGX_PLATFORM="cpu", RINGX_CPU_RANKS="2", RINGX_RUN_DIR=str(runs), RINGX_PYTHON=sys.executable)
    rc, out = _sbatch_wait(["-o", str(tmp_path / "job-%j.out"), "submit_frontier_cp.sh",
                    "mp_p2_ringX", "--override", DEBUG_VIT, "--context_parallel", "2", "--steps", "3",
                    "--dtype", "float32"], cwd=ROOT / "app" / "vit", timeout=600, **env)
    logs = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert rc == 0, out + logs[-3000:]
    rc, out = _run(["srun", "-n8", "--kill-on-bad-exit=1", "bash", "-c",
                    "source export_DDP_vars.sh; python inference-cp8.py --config=mp_p2_ringX --tensor_parallel=1 "
                    f"--context_parallel=8 --parallel_order=cp-tp-dp --override {DEBUG_VIT} --dtype float32"],
                   cwd=ROOT / "app" / "vit", timeout=600, **env)
    assert rc == 0, out[-3000:]
    (run,) = glob.glob(str(runs / "mp_p2_ringX_*"))
    assert f"using the newest run of mp_p2_ringX: {run}" in out, out[-3000:]
    assert (Path(run) / "inference" / "forecast.png").stat().st_size > 10_000


@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_generate_under_srun_and_mpirun(tmp_path, launcher):
    """app/gpt/generate.py at cp = 2 under srun (setup_dist_vars.sh) and mpirun gives the tokens
    of a one-process run."""
    _need(launcher)
    import json
    args = "app/gpt/generate.py --config debug --random_prompt 1,21 --max_new_tokens 4 --dtype float32 --attn ringX2"
    rc, out = _run([sys.executable, *args.split()[:1], *args.split()[1:], "--out", str(tmp_path / "one")])
    assert rc == 0, out[-3000:]
    cmd = (["srun", "-n", "2", "bash", "-c", f"source script/setup_dist_vars.sh; python {args} "
            f"--context_parallel 2 --out {tmp_path / 'two'}"] if launcher == "srun" else
           ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2", "python", *args.split(),
            "--context_parallel", "2", "--out", str(tmp_path / "two")])
    rc, out = _run(cmd)
    assert rc == 0, out[-3000:]
    one, two = (json.loads((tmp_path / d / "generated.json").read_text()) for d in ("one", "two"))
    assert two["tokens"] == one["tokens"] and two["cache_tokens_per_rank"] != one["cache_tokens_per_rank"]


def test_gpt_job_with_two_level_cp(tmp_path):
    """app/gpt/job.sb with RINGX_CP_INNER under the real Slurm (CPU mode): the job passes
    --context_parallel_inner and trains with the hybrid."""
    _need("srun", "sbatch")
    runs = tmp_path / "runs"
    rc, out = _sbatch_wait(["-o", str(tmp_path / "job-%j.out"), "app/gpt/job.sb", "debug",
                    "--context_parallel", "4", "--attn", "ringX3", "--dtype", "float32", "--steps", "2"],
                   RINGX_PLATFORM="cpu", RINGX_CPU_RANKS="4", RINGX_CP_INNER="2", RINGX_RUN_DIR=str(runs),
                   RINGX_PYTHON=sys.executable, timeout=400)
    logs = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert rc == 0, out + logs[-3000:]
    assert "--context_parallel_inner 2" in logs, logs[-3000:]
    made = glob.glob(str(runs / "debug_*"))
    args = __import__("json").loads((Path(made[0]) / "args.json").read_text())
    assert (args["context_parallel"], args["context_parallel_inner"]) == (4, 2), args
    assert len((Path(made[0]) / "metrics.jsonl").read_text().splitlines()) == 2
