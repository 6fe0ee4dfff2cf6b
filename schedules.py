"""The learning rate: schedules as a pure function of the step, and the plateau policy.

`lr_schedule` (config key):

    plateau      lr, lowered by `PlateauPolicy` from validation results (the default)
    constant     lr
    step         lr * lr_gamma ** floor(epoch / lr_step_epochs)     (ResNet: every 7 epochs x0.1)
    exponential  lr * lr_gamma ** (epoch / lr_step_epochs)          (smooth version of step)
    cosine       lr * (1 + cos(pi * step / max_steps)) / 2          (down to 0 at max_steps, or at the
                                                                    end of the time budget)
    onecycle     cosine x a linear rise over warmup_fraction of the same horizon (in place of
                 warmup_epochs): min(1, (step + 1) / (f * max_steps)) * cosine. With f 0.3 the LR
                 peaks at ~0.8 lr at 30% of the run. The warm-up scales with the run, not the epoch:
                 a small folder's 10 minutes are ~350 epochs, CIFAR's ~50, and both want ~30% of
                 them at a rising LR (bench/README.md, time to accuracy: the long high-LR phase
                 regularizes a small folder that the cosine alone lets the network memorize).

Every schedule is counted in epochs of the *global* batch, so more replicas (a bigger global
batch, fewer steps per epoch) decay at the same point in the data: the CIFAR-10 tutorial's
multi-GPU schedule bug. The training loop multiplies the result by the replica scaling and by
the factors the plateau policy and the NaN guard have applied, so a lowered LR stays lowered
under any schedule.
"""
from __future__ import annotations

import math
from typing import Mapping

SCHEDULES = ("plateau", "step", "exponential", "cosine", "onecycle", "constant")


def lr_at(cfg: Mapping, step: int, steps_per_epoch: int, max_steps: int | None = None) -> float:
    """The scheduled LR for training step `step` (0 = the first step); plateau is constant here.
    With warmup_epochs (warmup_fraction of the horizon under onecycle), it first rises linearly
    from lr / warm-up steps to lr."""
    if cfg["lr_schedule"] == "onecycle":
        warmup = cfg["warmup_fraction"] * _horizon(cfg, max_steps)
    else:
        warmup = cfg["warmup_epochs"] * max(1, steps_per_epoch)
    rise = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return rise * _scheduled(cfg, step, steps_per_epoch, max_steps)


def _scheduled(cfg: Mapping, step: int, steps_per_epoch: int, max_steps: int | None) -> float:
    kind, base = cfg["lr_schedule"], float(cfg["learning_rate"])
    epoch = step / max(1, steps_per_epoch)
    if kind in ("constant", "plateau"):
        return base
    if kind == "step":
        return base * cfg["lr_gamma"] ** math.floor(epoch / cfg["lr_step_epochs"])
    if kind == "exponential":
        return base * cfg["lr_gamma"] ** (epoch / cfg["lr_step_epochs"])
    if kind in ("cosine", "onecycle"):
        total = _horizon(cfg, max_steps)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    raise ValueError(f"unknown lr_schedule {kind!r}")


def _horizon(cfg: Mapping, max_steps: int | None) -> int:
    return max(1, max_steps if max_steps is not None else cfg["max_steps"])


class PlateauPolicy:
    """When to lower the LR and when to stop, from val top-1 results (counted in validations).

    - A gain is a val top-1 above the reference by more than `min_delta`; it resets both counts.
    - The LR drops (x lr_factor, by the caller) after `lr_patience` validations without a gain,
      counted since the last gain or the last drop (Keras ReduceLROnPlateau, no cooldown).
    - Training stops once `stop_patience` validations have passed without a gain, but never
      before the last drop has had its `lr_patience` validations: a lowered LR always gets its
      full chance. With lr_patience 4 and stop_patience 8: drops after 4 and 8 stale validations,
      stop after 12. With lr_patience > stop_patience: no drop, stop after stop_patience.
    - The best checkpoint follows any strict improvement, gain or not, and also moves to a later
      validation that is not significantly worse than the best so far: within two standard
      errors (~95%) of the difference of two val top-1 figures on n examples, 2 sqrt(2 p (1 - p)
      / n), p = (hits + 1) / (n + 2). On a small val set the highest single figure is mostly luck
      (the winner's curse): with 49 val images an early 0.88 outlier kept a model 6 test points
      worse than the one the run ended with, and one standard error still kept mid-run models
      3.9-4.6 test points worse than the run's last (bench/README.md, time to accuracy). Without
      n, strict improvements only.
    """

    NOISE_ERRORS = 2.0  # standard errors a later val top-1 may fall below the best and still count

    FIELDS = ("best", "best_step", "ref", "stale", "since_drop", "lowered")

    def __init__(self, lr_patience: int, stop_patience: int, min_delta: float):
        self.lr_patience, self.stop_patience, self.min_delta = lr_patience, stop_patience, min_delta
        self.best, self.best_step, self.ref = -math.inf, -1, -math.inf
        self.stale, self.since_drop, self.lowered = 0, 0, 0

    @property
    def top(self) -> float:
        """The highest val top-1 seen (within min_delta), which a later best must stay near: best
        itself may have moved on to a lower figure within the noise."""
        return max(self.best, self.ref)

    def update(self, metric: float, step: int, n: int = 0) -> tuple[bool, str]:
        """Returns (is_new_best, action) with action in 'gain' | 'wait' | 'lower_lr' | 'stop'.
        n: how many val examples `metric` counts (0: unknown, no noise allowance)."""
        top = self.top
        # p by Laplace's rule, (hits + 1) / (n + 2): a perfect score on a few val images is as
        # noisy as any other (p = 1 would allow none and keep the run's first perfect model).
        p = (top * n + 1) / (n + 2) if n and 0 <= top <= 1 else 0.0
        noise = self.NOISE_ERRORS * math.sqrt(2 * p * (1 - p) / n) if p else 0.0
        is_best = metric > self.best or (noise > 0 and metric >= top - noise)
        if is_best:
            self.best, self.best_step = metric, step
        if metric > self.ref + self.min_delta:
            self.ref, self.stale, self.since_drop = metric, 0, 0
            return is_best, "gain"
        self.stale += 1
        self.since_drop += 1
        drop_due = self.since_drop >= self.lr_patience
        if drop_due and self.stale <= self.stop_patience:
            self.since_drop, self.lowered = 0, self.lowered + 1
            return is_best, "lower_lr"
        dropped_since_gain = self.since_drop < self.stale
        if self.stale >= self.stop_patience and (drop_due or not dropped_since_gain):
            return is_best, "stop"
        return is_best, "wait"

    def state(self) -> dict[str, float]:
        return {f: float(getattr(self, f)) for f in self.FIELDS}

    def load(self, state: Mapping[str, float]) -> None:
        for f in self.FIELDS:
            value = float(state[f])
            setattr(self, f, value if f in ("best", "ref") else int(value))
