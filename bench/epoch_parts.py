"""Where a training run's time goes besides the train steps: validations, checkpoints, best/.

    python bench/epoch_parts.py --data_dir DIR --train_dir RUN [hw2_train.py flags, e.g. --time_budget 1.5]

Runs hw2_train.py in this process with timers around the train step (its call and the fetch of
its results), `Validator.__call__` (EMA swap, val set, summaries), `Checkpoints.save`,
`Checkpoints.save_best` and the TensorBoard histograms (`summary_every_steps`), and prints each
one's total, count and ms per call after the run. On a small folder an epoch is a second or two,
so what an epoch end costs is a share of the epochs a time budget buys (245 photos at 64 px: ~1.5 s
an epoch on 2 cores).
"""
from __future__ import annotations

import collections
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from train_throughput import machine_line  # noqa: E402

TOTALS: dict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter = collections.Counter()


def timed(fn, name: str):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTALS[name] += time.perf_counter() - t
            CALLS[name] += 1
    return wrapper


def instrument() -> None:
    import hw2
    import training
    for cls, attr, name in [(training.Validator, "__call__", "validate"), (training.Checkpoints, "save", "save"),
                            (training.Checkpoints, "save_best", "save_best")]:
        setattr(cls, attr, timed(getattr(cls, attr), name))
    make_train_step = hw2.make_train_step

    def make_timed_step(*args, **kwargs):
        step = make_train_step(*args, **kwargs)
        # The loop converts the step's results to floats at once; timing that fetch too makes the
        # step's time its compute, not its dispatch.
        return timed(lambda *a: [float(t) for t in step(*a)], "train_step")
    hw2.make_train_step = make_timed_step
    make_summary_step = hw2.make_summary_step
    hw2.make_summary_step = lambda *a, **k: timed(make_summary_step(*a, **k), "histograms")


def report(start: float) -> None:
    print(f"machine: {machine_line()}")
    print(f"wall {time.perf_counter() - start:.1f} s (start-up, tracing and the autotune included)")
    for name in ("train_step", "validate", "save", "save_best", "histograms"):
        if CALLS[name]:
            print(f"{name:<10} {TOTALS[name]:7.1f} s  {CALLS[name]:5d} calls  {1000 * TOTALS[name] / CALLS[name]:7.1f} ms each")


def main() -> int:
    import hw2_train
    instrument()
    start = time.perf_counter()
    try:
        return hw2_train.main(sys.argv[1:])
    finally:
        report(start)


if __name__ == "__main__":
    sys.exit(main())
