"""DeepSpeed ZeRO (stages 1 and 2) as an alternative data-parallel engine for the GPT app,
used when the ``deepspeed`` package is installed (``--dp_engine deepspeed --zero_stage N``).

DeepSpeed's data-parallel group is the whole job (dp x cp ranks; tensor parallelism is not
combined with it). It averages gradients over that group, so each rank back-propagates its loss
times cp: gradients come out summed over cp and averaged over dp, as with the other engines.
Optimizer state (and with stage 2 the gradients) is partitioned over the group; with
``--dtype bfloat16`` the module computes in bf16 and DeepSpeed keeps float32 master weights.
Gradient norms are clipped to 1 by DeepSpeed, globally.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Callable

import torch

from app.common.checkpoint import EngineFiles

ZERO_STAGES = (1, 2)
TAG = "deepspeed"


def check(args) -> None:
    """Refuse, with a reason, what this engine does not do (before any process group exists)."""
    if args.tensor_parallel > 1:
        raise NotImplementedError("--dp_engine deepspeed with --tensor_parallel > 1 is not implemented: "
                                  "use --dp_engine fsdp")
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError("--dp_engine deepspeed needs the deepspeed package (pip install deepspeed)")


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               schedule: Callable[[int], float], args):
    """(engine, optimizer, lr scheduler) of DeepSpeed ZeRO over the default (whole-job) group."""
    import deepspeed
    from deepspeed.utils import logger
    logger.setLevel(logging.WARNING)
    config = {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.zero_stage},
        "bf16": {"enabled": args.dtype == "bfloat16"},
        "gradient_clipping": 1.0,
        "steps_per_print": 2**31 - 1,
    }
    engine, opt, _, sched = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule))
    return engine, opt, sched


def checkpoint_files(engine) -> EngineFiles:
    """DeepSpeed writes and reads its own (partitioned) files inside the atomic checkpoint."""
    return EngineFiles(fmt="deepspeed", write=lambda d: engine.save_checkpoint(str(d), tag=TAG),
                       read=lambda d: engine.load_checkpoint(str(d), tag=TAG))
