"""Both apps under torchrun: SIGUSR1 to every worker mid-run (what Slurm sends before a time limit
or a preemption) lets the step finish, writes a checkpoint and OUT/preempted, and every rank exits
0 within 60 s; resuming then gives the same losses, bit for bit, as a run never interrupted."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launcher import ROOT, torchrun_command


def _cmd(app, out, flags):
    return torchrun_command(2, f"app/{app}/train.py", "--config", "debug", "--dtype", "float32", "--out", str(out), *flags)


def _losses(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vit_data(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    from app.vit.make_data import make_dataset
    return make_dataset(tmp_path_factory.mktemp("climate"), lat=32, lon=64, steps_per_year=6, years=3,
                        spinup=20, log=lambda m: None)


# the GPT app's path (SIGUSR1 -> checkpoint -> exit 0 -> resume) also runs under the real Slurm in
# test_hpc.py::test_gpt_job_preempted_requeues_and_resumes, so its torchrun variant is a slow one
@pytest.mark.parametrize("app", [pytest.param("gpt", marks=pytest.mark.slow), "vit"])
def test_sigusr1_checkpoints_and_exits_0_then_resumes_exactly(tmp_path, app, request):
    common = ["--context_parallel", "2", "--attn", "ringX1"]
    if app == "vit":
        common += ["--data", str(request.getfixturevalue("vit_data")), "--decay_steps", "40"]
    out = tmp_path / "b"
    argv, env = _cmd(app, out, [*common, "--steps", "100000"])
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-f", f"train.py.*{out}"], capture_output=True, text=True).stdout.split()
    workers = [int(w) for w in workers if int(w) != proc.pid]
    assert workers, "no worker processes found"
    sent = time.time()
    for pid in workers:
        os.kill(pid, signal.SIGUSR1)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, log[-3000:]
    assert time.time() - sent < 60
    done = int((out / "preempted").read_text())
    assert (out / "checkpoints" / f"step_{done:08d}" / "manifest.json").exists()
    assert done >= 3 and "stop requested by signal" in log, done
    straight = tmp_path / "a"
    for argv, env in (_cmd(app, out, [*common, "--steps", str(done + 3), "--resume"]),
                      _cmd(app, straight, [*common, "--steps", str(done + 3)])):
        res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    resumed = _losses(out)
    assert [r["step"] for r in resumed] == list(range(done + 3))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in _losses(straight)[:done + 3]]
    assert not (out / "preempted").exists()
