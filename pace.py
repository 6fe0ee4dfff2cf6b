"""The training loop's clock: when to validate, when a time budget says stop, how many steps fit,
and how long until the next validation and the end.

    validate   every epoch (or every save_checkpoint_steps steps when that is set), and also
               whenever checkpoint_minutes of training have passed since the last validation;
               with validation_share s > 0, an epoch end validates only once (1 - s) / s times a
               validation's measured time has trained since the last one. Every epoch, validating
               and saving took a quarter of a 196-photo folder's run (697-708 steps in a 1-minute
               budget; 827-860 at s = 0.1)
    histograms the TensorBoard histograms due every summary_every_steps steps are written only
               once the training since the last ones is HISTOGRAM_SHARE's (1 - s) / s times what
               they took, the first ones once it is that times the first step's time (at most ~2%
               of the time; not with deterministic = true)
    budget     time_budget minutes for the whole run, its earlier starts and each start's start-up
               (image checks, RAM decoding, autotune; not Python's imports) included: training stops
               when the next step and a final validation would no longer fit
    horizon    the step the run is expected to end at: max_steps, or what fits in the budget at
               the measured pace (steps and validations), re-estimated as the run goes; the LR
               schedule is laid over it
    agree      several workers each read their own clock: with a budget, `decide` sums every
               worker's reading (one small all-reduce a step) so that all stop at the same step
               and lay the LR over the same horizon; a worker that stopped alone would leave the
               others waiting in a collective, and different LRs would tear the replicas apart

Time comes from `clock` (time.monotonic by default), so tests can drive it.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping

# Step times of the first steps after a start include tracing and warm-up: left out of the pace.
WARMUP_STEPS = 3
# The share of the time histograms may take. At the photo defaults (~0.1 s a step) one summary
# step takes ~0.7 s (4 s the first, with its trace): every 100 steps that was 6% of the run.
HISTOGRAM_SHARE = 0.02


class Pace:
    def __init__(self, cfg: Mapping, steps_per_epoch: int, max_steps: int, start_step: int,
                 spent_seconds: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 agree: Callable[[list[float]], list[float]] | None = None, started: float | None = None):
        """started: the clock's reading when this start of the run began (before its image checks,
        RAM decoding and autotune), which the budget counts too; None: now."""
        self.clock, self.agree = clock, agree
        self.steps_per_epoch, self.max_steps = steps_per_epoch, max_steps
        self.every_steps = cfg["save_checkpoint_steps"]  # 0: once per epoch
        # Time-triggered validations would make --deterministic runs depend on the machine's speed.
        self.every_seconds = 0.0 if cfg["deterministic"] else 60.0 * cfg["checkpoint_minutes"]
        self.share = 0.0 if cfg["deterministic"] or self.every_steps else cfg["validation_share"]
        if agree is not None:
            # Several workers (what `agree` sums over) validate together (a collective): each one's own clock could make
            # them disagree on when, so only steps decide there.
            self.every_seconds = self.share = 0.0
        self.budget = 60.0 * cfg["time_budget"]
        now = clock()
        # A user's --time_budget 10 is the command's 10 minutes, start-up included (25-60 s for 8,000
        # CIFAR images on a 2-core Zen 3); the validation and histogram timers start with training.
        self.t0, self.spent_before = now if started is None else min(started, now), spent_seconds
        self.last_validation, self.last_step_end = now, now
        self.start_step, self.timed_steps, self.timed_seconds = start_step, 0, 0.0
        self.validation_seconds, self.validations = 0.0, 0
        self.histogram_seconds, self.last_histograms = 0.0, now
        self.histograms_by_time = not cfg["deterministic"]
        self.first_step_seconds = 0.0

    # ---------------------------------------------------------------- what happened

    def step_done(self, step: int) -> None:
        now = self.clock()
        if step == self.start_step + 1:
            self.first_step_seconds = now - self.last_step_end
        if step - self.start_step > WARMUP_STEPS:
            self.timed_steps += 1
            self.timed_seconds += now - self.last_step_end
        self.last_step_end = now

    def validated(self, seconds: float) -> None:
        """A validation (and its checkpoint) took `seconds`: the next one is counted from now."""
        self.validation_seconds += seconds
        self.validations += 1
        self.last_validation = self.last_step_end = self.clock()

    def histograms_written(self, seconds: float) -> None:
        """The histograms took `seconds`: not a step's time, and the next wait is counted from now."""
        self.histogram_seconds = seconds
        self.last_histograms = self.last_step_end = self.clock()

    # ---------------------------------------------------------------- what to do

    def histograms_due(self) -> bool:
        """Whether the histograms due by the step count may be written now (see HISTOGRAM_SHARE)."""
        if not self.histograms_by_time:
            return True
        # Before the first ones, their cost is a guess: the first step's, which like the first
        # histograms traces a forward and backward pass (~4 s at the photo defaults, where a step
        # takes 0.1). Written at the first summary step, they had cost a 1-minute run 7% of it.
        cost = self.histogram_seconds or self.first_step_seconds
        wait = cost * (1.0 - HISTOGRAM_SHARE) / HISTOGRAM_SHARE
        return self.clock() - self.last_histograms >= wait

    def spent(self) -> float:
        """Seconds of training so far, earlier starts included."""
        return self.spent_before + self.clock() - self.t0

    def validation_due(self, step: int) -> bool:
        if step >= self.max_steps:
            return True
        if self.every_steps:
            return step % self.every_steps == 0
        since = self.clock() - self.last_validation
        if step % self.steps_per_epoch == 0 and since >= self.training_between_validations():
            return True
        return bool(self.every_seconds) and since >= self.every_seconds

    def out_of_time(self) -> bool:
        """Whether one more step and a final validation would end past the budget."""
        if not self.budget:
            return False
        return self.spent() + self.step_seconds() + self.one_validation() > self.budget

    def decide(self, step: int) -> tuple[bool, int | None]:
        """(out_of_time, horizon) for the next step; with `agree`, the same answer on every worker:
        out of time when any one is, the horizon their mean (None while no worker knows it)."""
        out, horizon = self.out_of_time(), self.horizon(step)
        if self.agree is None or not self.budget:
            return out, horizon
        outs, known, total = self.agree([float(out), float(horizon is not None), float(horizon or 0)])
        return outs > 0, (int(total / known) if known else None)

    def horizon(self, step: int) -> int | None:
        """The step the run should end at: max_steps, or with a budget what fits in it at the
        measured pace (None until the pace is known)."""
        if not self.budget:
            return self.max_steps
        if not self.timed_steps:
            return None
        per_step = self.step_seconds() + self.one_validation() / self.steps_between_validations()
        left = max(0.0, self.budget - self.spent() - self.one_validation())
        return min(self.max_steps, step + int(left / per_step))

    # ---------------------------------------------------------------- estimates

    def step_seconds(self) -> float:
        return self.timed_seconds / self.timed_steps if self.timed_steps else 0.0

    def one_validation(self) -> float:
        """A validation and its save, as measured; before the first, a guess of 3 steps' time."""
        return self.validation_seconds / self.validations if self.validations else 3 * self.step_seconds()

    def training_between_validations(self) -> float:
        """Seconds of training an epoch-end validation waits for since the last one: 0, or with
        validation_share, (1 - share) / share times a validation's measured time."""
        if not self.share or not self.validations:
            return 0.0
        return self.one_validation() * (1.0 - self.share) / self.share

    def _epoch_steps_between_validations(self) -> int:
        """Steps between epoch-end validations: whole epochs that hold training_between_validations."""
        if not self.step_seconds():
            return self.steps_per_epoch
        steps = max(1, math.ceil(self.training_between_validations() / self.step_seconds()))
        return self._epoch_end_at_or_after(steps)

    def _epoch_end_at_or_after(self, step: int) -> int:
        return -(-step // self.steps_per_epoch) * self.steps_per_epoch

    def steps_between_validations(self) -> float:
        steps = self.every_steps or self._epoch_steps_between_validations()
        if self.every_seconds and self.step_seconds():
            steps = min(steps, self.every_seconds / self.step_seconds())
        return max(1.0, steps)

    def eta(self, step: int) -> tuple[float, float]:
        """(seconds to the next validation, seconds to the end); nan while the pace is unknown."""
        if not self.timed_steps:
            return math.nan, math.nan
        per = self.step_seconds()
        if self.every_steps:
            to_val = (self.every_steps - step % self.every_steps) * per
        else:  # the first epoch end after the training a validation waits for
            wait = max(0.0, self.training_between_validations() - (self.clock() - self.last_validation))
            first = step + max(1, math.ceil(wait / per - 1e-9))
            to_val = (self._epoch_end_at_or_after(first) - step) * per
        if self.every_seconds:
            to_val = min(to_val, max(0.0, self.every_seconds - (self.clock() - self.last_validation)))
        end = self.horizon(step) or self.max_steps
        to_end = (end - step) * per + (end - step) / self.steps_between_validations() * self.one_validation()
        if self.budget:
            to_end = min(to_end, max(0.0, self.budget - self.spent()))
        return to_val, to_end


def clock_text(seconds: float) -> str:
    """1:02:03, 4:05 or 0:42 (-:-- when unknown)."""
    if not math.isfinite(seconds):
        return "-:--"
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"
