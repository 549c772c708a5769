"""The memory one training step of a text backbone takes on this device, measured (doctor's figure).

A language model's activations, not its weights, decide whether a small device can train it: the logits alone
are batch x sequence x vocabulary floats (4 x 64 x 49,152 x 4 B = 50 MB, and their gradient as much again).
So the step is run, once, through THE training loop on a batch of the run's shape (data_args.batch_size x
data_args.max_seq_len tokens) and the process's resident memory is sampled while it runs.
"""

from __future__ import annotations

import threading
import time

import psutil
import torch
from torch import nn

from fedpeft_edge.config import DataArgs, TrainArgs

MB = 1024.0 * 1024.0


def training_step_mb(model: nn.Module, train_args: TrainArgs, data_args: DataArgs, vocab_size: int,
                     task: str, num_classes: int, interval_s: float = 0.005) -> float:
    """Peak resident memory above the level before the step, in MB, for one optimizer step of `model`
    (already with its PEFT method applied) on random tokens of the run's batch shape."""
    from fedpeft_edge.training import LocalTrainer

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size, (data_args.batch_size, data_args.max_seq_len), generator=g)
    y = torch.roll(x, -1, 1) if task == "causal_lm" else torch.randint(0, num_classes, (data_args.batch_size,),
                                                                       generator=g)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, name="step-memory", daemon=True)
    sampler.start()
    try:
        LocalTrainer(model, train_args, "cpu", [(x, y)]).train(max_steps=1)
    finally:
        done.set()
        sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return (peak[0] - base) / MB
