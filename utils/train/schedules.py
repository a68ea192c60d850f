"""Learning-rate schedules, stepped once per optimizer iteration (as the original).

The original builds a `LambdaLR` whose factor at step 0 is 0 for the warm-up
schedules, so the very first update happens at lr 0 (utils/scheduler.py
in the original). We keep that: it is part of the training curve the paper reports.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

SCHEDULERS = ("warmupcosine", "warmuplinear", "warmupconstant", "constant", "exponential")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_linear(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1.0, total_steps - warmup_steps))


def warmup_constant(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return 1.0


def lr_factor_fn(name: str, total_steps: int, warmup_rate: float,
                 decay_rate: float = 0.9, lr_update_rate: int = 1) -> Callable[[int], float]:
    """The per-step multiplicative factor of the named schedule.

    warmup_steps = int(total_steps * warmup_rate) as in the original. The
    exponential schedule decays by `decay_rate` every `lr_update_rate` steps;
    for every other schedule the original forces lr_update_rate to 1.
    """
    warmup_steps = int(total_steps * warmup_rate)
    if name == "warmupcosine":
        return lambda s: warmup_cosine(s, warmup_steps, total_steps)
    if name == "warmuplinear":
        return lambda s: warmup_linear(s, warmup_steps, total_steps)
    if name == "warmupconstant":
        return lambda s: warmup_constant(s, warmup_steps, total_steps)
    if name == "constant":
        return lambda s: 1.0
    if name == "exponential":
        return lambda s: decay_rate ** (s // max(1, lr_update_rate))
    raise ValueError(f"unknown --scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                    warmup_rate: float, decay_rate: float = 0.9,
                    lr_update_rate: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor_fn(name, total_steps, warmup_rate, decay_rate, lr_update_rate))
