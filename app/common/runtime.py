"""What the training apps share at run time: the entry-point wrapper, the stop-request signal
flag and the progress bar."""
from __future__ import annotations

import signal

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
