"""Learning-rate schedules as a pure function of the step (config key `lr_schedule`).

`plateau` (the default) is not here: the training loop's PlateauPolicy lowers the LR from
validation results. Every other schedule is counted in epochs of the *global* batch, so more
replicas (a bigger global batch, fewer steps per epoch) decay at the same point in the data,
the CIFAR-10 tutorial's multi-GPU schedule bug.

    constant     lr
    step         lr * lr_gamma ** floor(epoch / lr_step_epochs)     (ResNet: every 7 epochs x0.1)
    exponential  lr * lr_gamma ** (epoch / lr_step_epochs)          (smooth version of step)
    cosine       lr * (1 + cos(pi * step / max_steps)) / 2          (down to 0 at max_steps)
"""
from __future__ import annotations

import math
from typing import Mapping

SCHEDULES = ("plateau", "step", "exponential", "cosine", "constant")


def lr_at(cfg: Mapping, step: int, steps_per_epoch: int, max_steps: int | None = None) -> float:
    """The LR for training step `step` (0 = the first step), for every schedule except plateau."""
    kind, base = cfg["lr_schedule"], float(cfg["learning_rate"])
    epoch = step / max(1, steps_per_epoch)
    if kind == "constant":
        return base
    if kind == "step":
        return base * cfg["lr_gamma"] ** math.floor(epoch / cfg["lr_step_epochs"])
    if kind == "exponential":
        return base * cfg["lr_gamma"] ** (epoch / cfg["lr_step_epochs"])
    if kind == "cosine":
        total = max(1, max_steps if max_steps is not None else cfg["max_steps"])
        return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    raise ValueError(f"lr_schedule {kind!r} is not a step function (plateau is the loop's policy)")
