"""kill -9 a training run at seeded random points, resume it each time, then let it finish.

    python tests/killed_runs.py DATA REF_RUN RUN KILLS SEED   (run by test_resume.py)

TensorFlow is imported once here and every run is a fork of this process: a fresh `python`
costs seconds of imports per kill on a slow CPU, a fork costs nothing. Forking is safe because
this process imports TensorFlow but runs no op before forking (TensorFlow starts its thread
pools on the first op, in the child).

The kill points are moments of the run that the file system shows, so they land inside the run
whatever the CPU's speed: the reference run (uninterrupted) is watched for every checkpoint file
it writes, in order. Rounds alternate: one draws among the files of the next saves after the
point the run resumes from and kills when the run writes it anew (a data file before its index:
in the middle of a save), after a random delay of 0 to 50 ms; the next kills 0 to 400 ms after
the run has started training (often in the middle of a step).
Prints one JSON line: the kill points and how many kills landed before the run exited.
"""
import json
import os
import random
import re
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import hw2_train  # noqa: E402
import utils  # noqa: E402

# hw2_train imports TensorFlow only inside main: import it here, once, before any fork, or every
# run pays the import again (~6 s of the ~8 s a run costs).
utils.quiet_tensorflow_import()

MAX_STEPS = 20
RUN_JSON = "run.json"  # written when a run has restored its checkpoint and starts training


def start(data: str, run: str) -> int:
    """Fork a child that trains RUN to MAX_STEPS with the exact same command each time."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = hw2_train.main(["--data_dir", data, "--train_dir", run, "--section", "tiny", "--model", "simple_cnn",
                                   "--fc_units", "8",
                                   "--max_steps", str(MAX_STEPS), "--save_checkpoint_steps", "2",
                                   "--deterministic", "true"])
        finally:
            sys.stdout.flush()
            os._exit(code)
    return pid


def files(run: str) -> dict[str, float]:
    """Every file under RUN with its modification time."""
    out = {}
    for d, _, names in os.walk(run):
        for name in names:
            path = os.path.join(d, name)
            try:
                out[os.path.relpath(path, run)] = os.stat(path).st_mtime
            except FileNotFoundError:  # replaced by an atomic rename between listing and stat
                pass
    return out


def watch(pid: int, run: str, trigger: str | None = None, delay: float = 0.0) -> tuple[bool, list[str]]:
    """Poll RUN every 2 ms until the child exits, or until `trigger` is written anew (then SIGKILL
    it after `delay`). Returns (killed, files in the order they first appeared)."""
    before = files(run)
    seen, order = set(before), []
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"a run exited with {os.waitstatus_to_exitcode(status)}")
            return False, order
        now = files(run)
        for name in sorted(now, key=now.get):
            if name not in seen:
                seen.add(name)
                order.append(name)
        if trigger is not None and trigger in now and now[trigger] != before.get(trigger):
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return True, order
        time.sleep(0.002)


def saved_step(name: str) -> int | None:
    """The step of a checkpoint file (ckpt-4.index, best/best-2_temp/...), None for other files."""
    m = re.search(r"(?:ckpt|best)-(\d+)", name)
    return int(m.group(1)) if m else None


def resume_step(run: str) -> int:
    """The step the next run resumes from (-1: none), read from RUN/checkpoint without TensorFlow."""
    try:
        with open(os.path.join(run, "checkpoint")) as f:
            return int(re.search(r'model_checkpoint_path: "ckpt-(\d+)"', f.read()).group(1))
    except (FileNotFoundError, AttributeError):
        return -1


def main() -> None:
    data, ref, run, kills, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    _, events = watch(start(data, ref), ref)
    # Checkpoint files of every save but the last (after those there is always more to do).
    # TensorFlow's temporary files (RUN/ckpt-N_temp/..., *.tempstate<random>) live for a few ms or
    # get new names each time: only the final files are kill points.
    events = [(saved_step(e), e) for e in events
              if saved_step(e) is not None and saved_step(e) < MAX_STEPS and "temp" not in e]
    rng, points, landed = random.Random(seed), [], 0
    while len(points) < kills and resume_step(run) < MAX_STEPS - 2:
        # Only files of saves after the resume point are written again: draw among the next ones,
        # or kill some time after the run has started training (it writes run.json then); near
        # the end, only soon after that start, so the kill always lands before the run is over.
        resumes = resume_step(run)
        ahead = [e for step, e in events if step > resumes][:4]
        if resumes > MAX_STEPS - 8:
            trigger, delay = RUN_JSON, rng.uniform(0.0, 0.02)
        elif len(points) % 2:
            trigger, delay = RUN_JSON, rng.uniform(0.0, 0.4)
        else:
            # The two kinds alternate, so a few kills (each a run: ~10 s on a slow CPU) cover both;
            # the first lands in the middle of a save (its data file written, its index not yet).
            first = [e for e in ahead if ".data-" in e] if not points else []
            trigger, delay = rng.choice(first or ahead), rng.uniform(0.0, 0.05)
        killed, _ = watch(start(data, run), run, trigger, delay)
        points.append(f"{trigger} +{delay * 1000:.0f} ms{'' if killed else ' (ran to the end)'}")
        landed += killed
    watch(start(data, run), run)  # the same command, to the end
    print(json.dumps({"points": points, "killed": landed}), flush=True)


if __name__ == "__main__":
    main()
