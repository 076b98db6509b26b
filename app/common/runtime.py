"""What the training apps share at run time: the entry-point wrapper, the stop-request signal
flag, the all-rank flag check, the guarded optimizer update, the non-finite-step policy, the
progress bar and the run log."""
from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import torch
import torch.distributed as dist


def run_and_shut_down(fn, *args) -> int:
    """Call ``fn(*args)`` and tear the process group down afterwards, also on an error; 0."""
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


class StopRequest:
    """Remembers a SIGTERM / SIGUSR1 (Slurm's warning before a time limit or preemption); the
    training loop checks it after each step, all ranks together."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum


def any_rank(flags: list[bool], device) -> list[bool]:
    """Element-wise OR of boolean ``flags`` over all ranks (one small all-reduce of a tensor on
    ``device``, the collective device of the default group)."""
    t = torch.tensor([float(f) for f in flags], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def guarded_update(opt: torch.optim.Optimizer, sched, loss: torch.Tensor, grad_norm: torch.Tensor,
                   stop_requested: bool, flag_device, clip_norm: float | None = None) -> tuple[bool, bool]:
    """The optimizer and scheduler step unless the loss or the gradient norm (0-dim tensors, the
    same on every rank) is not finite on some rank -> (update skipped, stop requested on some
    rank). A fused optimizer skips on the device (its ``found_inf``, as under a GradScaler): the
    flags are worked out and all-reduced there and the update is queued before the host reads
    them, so the host never waits for the backward in between. Others decide on the host first.
    Either way the parameters, optimizer state (step counts included) and schedule are as if a
    skipped step had not been taken.

    ``clip_norm``: the gradients, of global norm ``grad_norm``, are clipped to it as part of the
    update (sharding.clip_coefficient): a fused optimizer divides them by 1 / coefficient inside
    its kernel (its ``grad_scale``, as a GradScaler's unscaling: no pass of its own over the
    gradients), others scale them first. None: the gradients are taken as they are."""
    from .sharding import clip_coefficient, scale_grads_
    coef = clip_coefficient(grad_norm, clip_norm) if clip_norm is not None else None
    if opt.defaults.get("fused"):
        flags = torch.zeros(2, device=flag_device)
        flags[0] = torch.logical_or(~torch.isfinite(loss), ~torch.isfinite(grad_norm)).to(flag_device)
        if stop_requested:
            flags[1].fill_(1.0)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        opt.found_inf = flags[0]             # the fused kernels skip the update (and the step count)
        if coef is not None:                 # and divide the gradients by grad_scale first
            opt.grad_scale = coef.reciprocal().float()
        try:
            opt.step()
        finally:
            del opt.found_inf
            opt.__dict__.pop("grad_scale", None)
        bad, stop_now = (bool(x) for x in flags.tolist())
    else:
        bad, stop_now = any_rank([NonFiniteSteps.bad(loss.item(), grad_norm.item()), stop_requested], flag_device)
        if not bad:
            if coef is not None:
                scale_grads_([p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None], coef)
            opt.step()
    if not bad:
        sched.step()
    return bad, stop_now


class NonFiniteSteps:
    """--nan_policy: ``skip`` drops a step whose loss or gradient norm is not finite and counts
    it, stopping after more than ``max_in_a_row`` such steps in a row; ``stop`` stops at the first.
    Stopping raises FloatingPointError; the caller writes no checkpoint then."""

    def __init__(self, policy: str, max_in_a_row: int, ckpt_root: Path, say):
        self.policy, self.max_in_a_row, self.ckpt_root, self.say = policy, max_in_a_row, ckpt_root, say
        self.skipped = self.in_a_row = 0

    @staticmethod
    def bad(loss: float, grad_norm: float) -> bool:
        return not (math.isfinite(loss) and math.isfinite(grad_norm))

    def count(self, bad: bool, row: dict) -> None:
        """Record this step (``bad`` as agreed by all ranks) in the counters and in ``row``."""
        self.skipped, self.in_a_row = self.skipped + bad, (self.in_a_row + 1) if bad else 0
        row["skipped"] = self.skipped

    def enforce(self, step: int, bad: bool, row: dict) -> None:
        """After the step's row is logged: raise per the policy, or report the skipped update."""
        if not bad:
            return
        if self.policy == "stop" or self.in_a_row > self.max_in_a_row:
            raise FloatingPointError(
                f"step {step}: loss {row['loss']} / gradient norm {row['grad_norm']} is not finite "
                f"({self.in_a_row} such step(s) in a row, --nan_policy {self.policy}); no checkpoint "
                f"written, the newest good one under {self.ckpt_root} is kept")
        self.say(f"step {step}: non-finite loss or gradient, update skipped ({self.skipped} so far)")


def every_and_last(step: int, every: int, steps: int) -> bool:
    """True after every ``every``-th step (0: never) and after the last of ``steps``: when a run
    that evaluates periodically evaluates, so that each run or curriculum stage ends with one."""
    return bool(every) and ((step + 1) % every == 0 or step + 1 == steps)


def resume_lr(sched, opt, lr: float, say) -> None:
    """After loading a checkpoint's LambdaLR state: train at this run's ``lr`` and this run's
    schedule. The checkpoint's base rate is replaced (and said) when they differ, so a later stage
    of a curriculum can change the rate; each group's rate is set to base x schedule(step), what
    LambdaLR itself computes, so an unchanged run resumes bit for bit (the scheduler's own record of
    the last rates is refreshed by its next step; the apps read the rate from the optimizer)."""
    old = sched.base_lrs[0]
    if old != lr:
        say(f"--lr {lr:g} replaces the checkpoint's base rate {old:g}")
    sched.base_lrs = [lr for _ in sched.base_lrs]
    rates = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
    for group, rate in zip(opt.param_groups, rates):
        group["lr"] = rate


def progress_bar(total: int, enabled: bool, desc: str = "train"):
    """An update(row) callable: a progress bar on rank 0 (tqdm when installed, else a line every
    10 steps); rows carry step and loss, and tokens_per_s or samples_per_s."""
    if not enabled:
        return lambda row: None
    rate = lambda row: row.get("tokens_per_s", row.get("samples_per_s", 0.0))  # noqa: E731
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, desc=desc, dynamic_ncols=True)

        def update(row):
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", rate=f"{rate(row):.1f}")
            if bar.n >= total:
                bar.close()
        return update
    except ImportError:
        return lambda row: (row["step"] % 10 == 0 or row["step"] + 1 == total) and print(
            f"step {row['step']:5d}  loss {row['loss']:.4f}  rate {rate(row):.1f}/s", flush=True)


class RunLog:
    """One run's step rows: kept in ``rows``, and on rank 0 appended to OUT/metrics.jsonl (a new
    file unless resuming) and shown on the progress bar. ``preempted(done)`` writes OUT/preempted
    for the job script. Use as a context manager (closes the file)."""

    def __init__(self, out: Path, steps_left: int, is_root: bool, resume: bool):
        self.out, self.is_root, self.rows, self._file = Path(out), is_root, [], None
        if is_root:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "preempted").unlink(missing_ok=True)
            self._file = open(self.out / "metrics.jsonl", "a" if resume else "w")
        self._bar = progress_bar(steps_left, is_root)

    def record(self, row: dict) -> None:
        self.rows.append(row)
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        self._bar(row)

    def preempted(self, done: int) -> None:
        if self.is_root:
            (self.out / "preempted").write_text(f"{done}\n")

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
