"""Worker for test_app_gpt: build the GPT trainer from the command line, resume its checkpoint
under this run's layout, and fail unless the ranks that split one sequence (cp and tp groups)
continue from the same data state (generator and token-file position)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from app.common.runtime import run_and_shut_down  # noqa: E402
from app.gpt.train import Trainer, parse  # noqa: E402


def check(args) -> list:
    trainer = Trainer(args)
    trainer.restore()
    mine = (trainer.gen.get_state().tolist(), trainer.data.state() if trainer.data is not None else None)
    for name in ("cp", "tp"):
        group = trainer.groups[name]
        states = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, mine, group=group)
        if any(s != states[0] for s in states):
            raise AssertionError(f"the {name} ranks resumed from different data states")
    trainer.say("data states agree across cp and tp")
    return []


if __name__ == "__main__":
    from ringX.launch import leave
    leave(run_and_shut_down(check, parse()))
