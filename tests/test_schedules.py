"""LR schedules on scripted steps, and the training loop following one."""
import math

import pytest

import schedules
import utils


def cfg(kind, **extra):
    # No warm-up unless a test asks for one: the schedules' own shapes are the subject here.
    return utils.load_config("default", {"lr_schedule": kind, "learning_rate": "0.1", "warmup_epochs": "0", **extra})


def lrs(c, steps, steps_per_epoch=10, max_steps=None):
    return [schedules.lr_at(c, s, steps_per_epoch, max_steps) for s in steps]


def test_constant():
    assert lrs(cfg("constant"), [0, 5, 1000]) == [0.1, 0.1, 0.1]


def test_step_drops_by_gamma_every_lr_step_epochs():
    # 10 steps per epoch, x0.1 every 7 epochs: the ResNet report's schedule
    got = lrs(cfg("step", lr_step_epochs="7", lr_gamma="0.1"), [0, 69, 70, 139, 140])
    assert got == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_exponential_is_the_smooth_step():
    c = cfg("exponential", lr_step_epochs="2", lr_gamma="0.5")
    assert lrs(c, [0, 10, 20, 40]) == pytest.approx([0.1, 0.1 * 0.5 ** 0.5, 0.05, 0.025])


def test_cosine_falls_to_zero_at_max_steps_and_stays():
    got = lrs(cfg("cosine", max_steps="100"), [0, 50, 100, 150])
    assert got == pytest.approx([0.1, 0.05, 0.0, 0.0], abs=1e-12)
    assert lrs(cfg("cosine"), [25], max_steps=100)[0] == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))


def test_onecycle_rises_over_its_share_of_the_horizon_then_follows_the_cosine():
    c = cfg("onecycle", warmup_fraction="0.3", warmup_epochs="5")  # warmup_epochs does not apply
    cosine = [schedules.lr_at(cfg("cosine"), s, 10, 100) for s in range(101)]
    got = lrs(c, range(101), max_steps=100)
    # 30 steps of a linear rise, multiplied into the cosine; the cosine alone from there on
    assert got[:30] == pytest.approx([(s + 1) / 30 * cosine[s] for s in range(30)])
    assert got[29:] == pytest.approx(cosine[29:])
    assert max(range(101), key=got.__getitem__) == 29 and got[29] == pytest.approx(0.1 * 0.5 * (1 + math.cos(0.29 * math.pi)))
    assert got[100] == pytest.approx(0.0, abs=1e-12)


def test_onecycle_warm_up_scales_with_the_run_not_the_epoch():
    # the same share of a 1,000-step horizon (a budget's estimate) and of max_steps 200
    c = cfg("onecycle", warmup_fraction="0.3", max_steps="200")
    assert lrs(c, [299], max_steps=1000) == pytest.approx([0.1 * 0.5 * (1 + math.cos(0.299 * math.pi))])
    assert lrs(c, [149], max_steps=1000) == pytest.approx([0.1 * 150 / 300 * 0.5 * (1 + math.cos(0.149 * math.pi))])
    assert lrs(c, [29, 59]) == pytest.approx([0.1 * 30 / 60 * 0.5 * (1 + math.cos(0.145 * math.pi)),
                                              0.1 * 0.5 * (1 + math.cos(0.295 * math.pi))])
    assert lrs(cfg("onecycle", warmup_fraction="0"), [0], max_steps=100) == pytest.approx([0.1])


def test_plateau_is_constant_until_the_policy_lowers_it():
    assert lrs(cfg("plateau"), [0, 5, 500]) == pytest.approx([0.1] * 3)


def test_unknown_schedule_is_one_config_line():
    with pytest.raises(utils.UserError, match="'lr_schedule' must be one of"):
        cfg("linear")


def test_the_loop_follows_the_step_schedule(tmp_path):
    import hw2_dataset
    import training
    from helpers import make_image_folder

    make_image_folder(tmp_path / "data", classes=("0", "1"), per_class=10, sizes=((16, 16),), formats=("png",))
    scan = hw2_dataset.scan_dataset(str(tmp_path / "data"))
    train, val = hw2_dataset.make_split(scan.items, 0.2, 0)
    hw2_dataset.write_split(str(tmp_path / "split.json"), scan, train, val, 0, 0.2)
    split = hw2_dataset.load_split(str(tmp_path / "split.json"))
    # 16 train images / batch 8 = 2 steps per epoch; halve every epoch; validate every 2 steps.
    # A plateau policy on a hair trigger must not touch another schedule's LR, nor stop its run.
    c = utils.load_config("tiny", {"model": "simple_cnn", "fc_units": "8", "lr_schedule": "step",
                                   "lr_step_epochs": "1", "lr_gamma": "0.5", "learning_rate": "0.01",
                                   "max_epochs": "3", "lr_patience": "1", "stop_patience": "1",
                                   "min_delta": "0.9"})

    class Rows:
        rows = []

        def on_validation(self, row):
            self.rows.append(row)

    hook = Rows()
    training.train(c, split, str(tmp_path / "run"), hooks=[hook])
    # the LR in force at each validation is the last step's: steps 1, 3, 5 (0-based) of 6
    assert [r["step"] for r in hook.rows] == [2, 4, 6]
    assert [r["lr"] for r in hook.rows] == pytest.approx([0.01, 0.005, 0.0025])
