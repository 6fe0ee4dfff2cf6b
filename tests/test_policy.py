"""The plateau policy on scripted validation sequences."""
from hw2_train import PlateauPolicy


def run(seq, lr_patience=3, stop_patience=7, min_delta=0.01):
    p = PlateauPolicy(lr_patience, stop_patience, min_delta)
    actions = []
    for step, metric in enumerate(seq, 1):
        is_best, action = p.update(metric, step)
        actions.append(("B" if is_best else "") + action)
        if action == "stop":
            break
    return p, actions


def test_gains_never_lower_the_lr():
    p, actions = run([0.1, 0.2, 0.3, 0.4])
    assert actions == ["Bgain"] * 4 and p.lowered == 0 and p.best_step == 4


def test_lowers_every_patience_then_stops():
    p, actions = run([0.5] + [0.4] * 10)
    assert actions == ["Bgain", "wait", "wait", "lower_lr", "wait", "wait", "lower_lr", "stop"]
    assert p.lowered == 2 and p.best == 0.5 and p.best_step == 1


def test_gain_below_min_delta_is_best_but_not_progress():
    p, actions = run([0.5, 0.505, 0.509, 0.52, 0.52])
    # 0.505 and 0.509 beat the best (new best checkpoint) but not by min_delta: patience counts on.
    assert actions == ["Bgain", "Bwait", "Bwait", "Bgain", "wait"]
    assert p.best == 0.52 and p.best_step == 4


def test_gain_resets_the_stale_count():
    p, actions = run([0.5, 0.4, 0.4, 0.6, 0.4, 0.4, 0.4])
    assert actions[3] == "Bgain" and actions[-1] == "lower_lr" and p.stale == 3


def test_state_round_trip_continues_identically():
    seq = [0.5, 0.4, 0.4, 0.45, 0.4, 0.4, 0.4, 0.4, 0.4]
    _, whole = run(seq)
    p, first = run(seq[:4])
    q = PlateauPolicy(3, 7, 0.01)
    q.load(p.state())
    rest = []
    for step, m in enumerate(seq[4:], 5):
        b, a = q.update(m, step)
        rest.append(("B" if b else "") + a)
        if a == "stop":
            break
    assert first + rest == whole
