"""The training loop's clock (pace.py) on a clock the test drives, and a budgeted run that obeys it."""
import contextlib
import io
import math
import os

import pytest

import pace
import utils


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def cfg(**overrides):
    return utils.load_config("default", {k: str(v) for k, v in overrides.items()})


def validate(p, clock, seconds):
    clock.t += seconds
    p.validated(seconds)


def run_steps(p, clock, first, last, seconds):
    for step in range(first, last + 1):
        clock.t += seconds
        p.step_done(step)


def test_validation_once_per_epoch_or_every_n_steps():
    clock = Clock()
    p = pace.Pace(cfg(), steps_per_epoch=13, max_steps=100, start_step=0, clock=clock)
    assert [s for s in range(1, 101) if p.validation_due(s)] == [13, 26, 39, 52, 65, 78, 91, 100]
    p = pace.Pace(cfg(save_checkpoint_steps=30), steps_per_epoch=13, max_steps=100, start_step=0, clock=clock)
    assert [s for s in range(1, 101) if p.validation_due(s)] == [30, 60, 90, 100]


def test_validation_when_checkpoint_minutes_have_passed_but_not_when_deterministic():
    clock = Clock()
    p = pace.Pace(cfg(checkpoint_minutes=1), steps_per_epoch=1000, max_steps=10_000, start_step=0, clock=clock)
    run_steps(p, clock, 1, 59, 1.0)
    assert not p.validation_due(59)
    run_steps(p, clock, 60, 60, 1.0)
    assert p.validation_due(60)
    validate(p, clock, 5.0)
    run_steps(p, clock, 61, 100, 1.0)
    assert not p.validation_due(100)  # counted from the last validation
    det = pace.Pace(cfg(checkpoint_minutes=1, deterministic="true"), 1000, 10_000, 0, clock=clock)
    run_steps(det, clock, 1, 500, 1.0)
    assert not det.validation_due(500)


def test_histograms_wait_until_they_would_take_two_percent_of_the_time_but_not_when_deterministic():
    clock = Clock()
    p = pace.Pace(cfg(), steps_per_epoch=1000, max_steps=10_000, start_step=0, clock=clock)
    clock.t += 0.9  # the first step traces: 1 s
    run_steps(p, clock, 1, 10, 0.1)
    assert not p.histograms_due()  # none written yet: their first costs about what the first step did
    run_steps(p, clock, 11, 490, 0.1)  # 49 s after the first step
    assert p.histograms_due()
    clock.t += 1.0
    p.histograms_written(1.0)
    run_steps(p, clock, 491, 880, 0.1)  # 39 s of training
    assert not p.histograms_due()
    assert p.step_seconds() == pytest.approx(0.1)  # their second is no step's time
    run_steps(p, clock, 881, 960, 0.1)  # 47 s
    assert not p.histograms_due()
    run_steps(p, clock, 961, 990, 0.1)  # 50 s: 1 s is 2% of 51
    assert p.histograms_due()
    det = pace.Pace(cfg(deterministic="true"), 1000, 10_000, 0, clock=clock)
    det.histograms_written(1.0)
    assert det.histograms_due()


def test_a_validation_share_validates_at_the_first_epoch_end_after_nine_validations_of_training():
    clock = Clock()
    p = pace.Pace(cfg(validation_share=0.1), steps_per_epoch=4, max_steps=1000, start_step=0, clock=clock)
    due = []
    for step in range(1, 101):
        run_steps(p, clock, step, step, 0.5)  # an epoch: 2 s
        if p.validation_due(step):
            due.append(step)
            validate(p, clock, 1.0)  # waits for 9 s of training
    assert due == [4, 24, 44, 64, 84]  # 18 steps after step 4 is step 22: the epoch ends at 24
    assert p.validation_seconds / (clock.t - 1000.0) <= 0.1
    # An explicit interval, --deterministic and several workers (whose clocks could disagree) keep
    # every epoch end; the workers' 0.01-minute checkpoint_minutes adds no time-triggered validation.
    for fixed, one_process in ((cfg(save_checkpoint_steps=4, validation_share=0.1), True),
                               (cfg(deterministic="true", validation_share=0.1), True), (cfg(), True),
                               (cfg(checkpoint_minutes=0.01, validation_share=0.1), False)):
        p = pace.Pace(fixed, steps_per_epoch=4, max_steps=1000, start_step=0, clock=clock,
                      agree=None if one_process else lambda values: values)
        due = []
        for step in range(1, 21):
            run_steps(p, clock, step, step, 0.5)
            if p.validation_due(step):
                due.append(step)
                validate(p, clock, 1.0)
        assert due == [4, 8, 12, 16, 20]


def test_a_budget_stops_when_a_step_and_a_final_validation_would_not_fit():
    clock = Clock()
    p = pace.Pace(cfg(time_budget=1), steps_per_epoch=10, max_steps=10_000, start_step=0, clock=clock)
    assert p.horizon(0) is None  # no pace measured yet
    run_steps(p, clock, 1, 10, 2.0)  # 2 s per step (the first 3 are warm-up, left out)
    validate(p, clock, 4.0)  # 24 s spent
    assert p.step_seconds() == pytest.approx(2.0)
    # 60 - 24 - 4 (final validation) = 32 s left at 2 s/step + 4 s per 10 steps = 2.4 s/step: 13 steps
    assert p.horizon(10) == 10 + 13
    run_steps(p, clock, 11, 20, 2.0)  # 44 s
    validate(p, clock, 4.0)  # 48 s
    assert not p.out_of_time()  # 48 + 2 + 4 = 54
    run_steps(p, clock, 21, 23, 2.0)  # 54 s: another step and a validation would end at 60 s
    assert not p.out_of_time()
    run_steps(p, clock, 24, 24, 2.0)  # 56 s: 62 s
    assert p.out_of_time()


def test_a_resumed_budget_counts_the_time_already_spent():
    clock = Clock()
    p = pace.Pace(cfg(time_budget=1), 10, 10_000, start_step=50, spent_seconds=55.0, clock=clock)
    run_steps(p, clock, 51, 55, 1.0)
    assert p.spent() == pytest.approx(60.0) and p.out_of_time()


def test_a_budget_counts_the_start_up_but_the_validation_timer_starts_with_training():
    """--time_budget 10 is the command's 10 minutes: the image checks, RAM decoding and autotune
    before the first step count (a 10-minute CIFAR run had spent ~1 minute on them uncounted)."""
    clock = Clock()
    p = pace.Pace(cfg(time_budget=1, checkpoint_minutes=0.5), 10, 10_000, start_step=0, clock=clock,
                  started=clock.t - 30.0)
    assert p.spent() == pytest.approx(30.0)
    run_steps(p, clock, 1, 5, 1.0)
    assert p.spent() == pytest.approx(35.0)
    assert not p.validation_due(5)  # 5 s of training, not 35, since the start: 30 s between validations
    run_steps(p, clock, 6, 9, 5.0)
    assert p.spent() == pytest.approx(55.0) and p.out_of_time()


def test_workers_whose_clocks_disagree_stop_at_the_same_step_with_the_same_horizon():
    """Two workers' Paces, one a slower clock reader; `agree` sums both readings as the all-reduce
    of training._sum_over_workers does across processes."""
    clocks = [Clock(), Clock()]
    workers = []
    for i in range(2):
        workers.append(pace.Pace(cfg(time_budget=1), steps_per_epoch=10, max_steps=10_000, start_step=0,
                                 clock=clocks[i],
                                 agree=lambda values, i=i: [a + b for a, b in zip(values, local[1 - i])]))
    stops = []
    for step in range(1, 100):
        for i, (p, seconds) in enumerate(zip(workers, (2.0, 2.2))):
            clocks[i].t += seconds
            p.step_done(step)
        local = [[float(p.out_of_time()), float(p.horizon(step) is not None), float(p.horizon(step) or 0)]
                 for p in workers]
        decisions = [p.decide(step) for p in workers]
        assert decisions[0] == decisions[1], step
        if step == 10:
            # Alone, 60 - 20 - 6 s left at 2.6 s a step (a validation, 3 steps' time, every 10)
            # fit 13 more steps, and 60 - 22 - 6.6 at 2.86 s, 10: together, their mean.
            assert [p.horizon(10) for p in workers] == [23, 20] and decisions[0][1] == 21
        if decisions[0][0]:
            stops.append(step)
            break
    # The slower clock runs out first (24 x 2.2 + a step + a validation's 6.6 s > 60): both stop
    # there, where the faster one alone would have trained on.
    assert stops == [24] and not workers[0].out_of_time()
    alone = pace.Pace(cfg(time_budget=1), 10, 10_000, 0, clock=Clock())
    assert alone.decide(0) == (False, None)  # one process: no agreement asked for


def test_eta_to_the_next_validation_and_the_end():
    clock = Clock()
    p = pace.Pace(cfg(validation_share=0.1), steps_per_epoch=10, max_steps=100, start_step=0, clock=clock)
    assert all(math.isnan(x) for x in p.eta(0))
    run_steps(p, clock, 1, 14, 0.5)
    validate(p, clock, 0.25)  # waits for 2.25 s (4.5 steps) of training: the next epoch end, step 20
    to_val, to_end = p.eta(14)
    assert to_val == pytest.approx(6 * 0.5)
    assert to_end == pytest.approx(86 * 0.5 + 8.6 * 0.25)
    validate(p, clock, 1.75)  # now 1 s on average: 9 s (18 steps) of training, the epoch end at step 40
    to_val, to_end = p.eta(14)
    assert to_val == pytest.approx(26 * 0.5)
    assert to_end == pytest.approx(86 * 0.5 + 86 / 20 * 1.0)
    assert pace.clock_text(3725) == "1:02:05" and pace.clock_text(42.4) == "0:42"


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_a_budgeted_run_ends_in_its_budget_with_a_final_validation(tmp_path, monkeypatch, caplog, schedule):
    """The real loop against a clock where every training step takes 1 s: a 0.5 min budget, the
    schedule laid over the steps that fit, and the LR near 0 at the end; onecycle's rise spans
    ~30% of those steps, not warmup_epochs."""
    import hw2
    import run_dir
    import training
    from helpers import make_image_folder
    clock = Clock()
    real = hw2.make_train_step

    def one_second_steps(*args, **kwargs):
        step = real(*args, **kwargs)

        def timed(iterator):
            clock.t += 1.0
            return step(iterator)
        return timed

    monkeypatch.setattr(hw2, "make_train_step", one_second_steps)
    config = utils.load_config("tiny", {"model": "simple_cnn", "fc_units": "8",
                                        "time_budget": "0.5", "max_steps": "1000", "save_checkpoint_steps": "0",
                                        "batch_size": "4", "lr_schedule": schedule, "stop_patience": "100",
                                        "warmup_epochs": "0", "warmup_fraction": "0.3"})
    run = str(tmp_path / "run")
    os.makedirs(run)
    split = run_dir.prepare_split(run, config, make_image_folder(tmp_path / "data", per_class=10))

    class Rows:
        rows = []

        def on_validation(self, row):
            self.rows.append(row)

    with contextlib.redirect_stdout(io.StringIO()):
        training.train(config, split, run, hooks=[Rows()], clock=clock)
    steps = [r["step"] for r in Rows.rows]
    assert steps[:3] == [4, 8, 12]  # 16 train images / batch 4: one validation per epoch
    assert 25 <= steps[-1] <= 30 and steps[-1] % 4 != 0  # stopped by the budget, validated at the end
    assert clock.t - 1000.0 <= 30.0 + 1.0
    assert Rows.rows[-1]["lr"] < 0.1 * config.learning_rate  # the cosine reached its end with the budget
    lrs = [r["lr"] for r in Rows.rows]
    if schedule == "cosine":
        assert lrs == sorted(lrs, reverse=True)
    else:  # ~28 steps fit: rising to ~step 8, falling from there (validations at steps 4, 8, 12, ...)
        assert lrs[0] < lrs[1] and lrs[1:] == sorted(lrs[1:], reverse=True)
        assert lrs[1] > 0.7 * config.learning_rate
    assert os.path.isfile(os.path.join(run, f"ckpt-{steps[-1]}.index"))
    if schedule == "cosine":  # the same command again: nothing left to train, and it says what would
        with contextlib.redirect_stdout(io.StringIO()), caplog.at_level("INFO"):
            assert training.train(config, split, run, clock=clock, started=clock.t - 5)["step"] == steps[-1]
        assert "stopped: the time budget of 0.5 min is spent (0.5 min by this run's earlier starts): a larger " \
               "--time_budget trains on" in caplog.text


def test_a_commands_budget_counts_from_the_process_start(tmp_path, monkeypatch):
    """Run as a command (utils.console), hw2_train's --time_budget counts from the process's start,
    the Python and TensorFlow imports included; called from Python, from the call."""
    import subprocess
    import sys
    import time

    import hw2_train
    import training
    from helpers import make_image_folder
    code = "import time; time.sleep(0.5); import utils; print(utils.process_age())"
    age = subprocess.run([sys.executable, "-c", code], cwd=utils.HERE, capture_output=True, text=True, check=True)
    assert 0.5 <= float(age.stdout) < 60, age.stdout  # a few ms more than the sleep; 0.0 = unreadable
    # Without /proc (macOS): `ps`, to its whole seconds.
    code = "import time; time.sleep(1.1); import utils; print(utils.process_age(proc='/nowhere'))"
    age = subprocess.run([sys.executable, "-c", code], cwd=utils.HERE, capture_output=True, text=True, check=True)
    assert 1.0 <= float(age.stdout) < 60, age.stdout
    assert [utils.etime_seconds(t) for t in ("05:06", " 12:00:01\n", "1-02:03:04")] == [306, 43201, 93784]
    seen = []
    monkeypatch.setattr(training, "train", lambda *args, started=None, **kwargs: seen.append(started) or {})
    data = make_image_folder(tmp_path / "data", per_class=2)
    before = time.monotonic()
    for command_started in (None, 123.0):
        monkeypatch.setattr(utils, "COMMAND_STARTED", command_started)
        argv = ["--data_dir", data, "--train_dir", str(tmp_path / f"run{command_started}"), "--section", "tiny"]
        assert hw2_train.main(argv) == 0
    assert seen[0] >= before and seen[1] == 123.0


def test_a_budget_spent_before_the_first_step_is_one_error_line(tmp_path):
    """Start-up (imports, image checks, decoding, a first run's autotune) longer than the budget:
    one error saying so, not a run that ends as if max_steps were reached."""
    import run_dir
    import training
    from helpers import make_image_folder
    config = utils.load_config("tiny", {"model": "simple_cnn", "fc_units": "8", "time_budget": "0.5"})
    run = str(tmp_path / "run")
    os.makedirs(run)
    split = run_dir.prepare_split(run, config, make_image_folder(tmp_path / "data", per_class=4))
    clock = Clock()
    with pytest.raises(utils.UserError, match="the time budget of 0.5 min is spent before the first step: "
                                              "starting took 40 s "):
        training.train(config, split, run, clock=clock, started=clock.t - 40)


def test_img_s_is_the_trainings_own_with_the_validations_left_out(monkeypatch):
    """The log's img/s window spans validations (one per epoch at the defaults); their time is
    left out, so the rate is what the steps ran at: 4 steps of 8 images in 4 s of training, with
    a 5 s validation between them, is 8 img/s, not 32 / 9."""
    import training
    clock = Clock()
    monkeypatch.setattr(training.time, "time", clock)
    meter = training.Meter(8)
    for _ in range(2):
        clock.t += 1.0
        meter.add(1.0, 1.0, 4.0)
    clock.t += 5.0
    meter.exclude(5.0)
    for _ in range(2):
        clock.t += 1.0
        meter.add(1.0, 1.0, 4.0)
    assert meter.images_per_sec() == pytest.approx(8.0)
