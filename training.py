"""The training loop, one for every script: hw2_train.py (the default tf.distribute strategy),
hw2_multi_gpu_train.py (Mirrored / MultiWorkerMirrored) and hw2_experiment.py.

`train()` reads top to bottom; the pieces it is made of are named for their job:
`create_train_state` (model, optimizer, moving average, run state: also used by the benches
and tests), `Checkpoints` (restore-or-init, saves, best copy, NaN rollback), `Validator`,
`Meter` (log windows) and `set_learning_rate`.
"""
from __future__ import annotations

import atexit
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import tensorflow as tf

import hw2
import hw2_input
import pace
import precision as precisions
import schedules
import run_dir
from run_dir import BEST
import utils
from utils import UserError

# What a checkpoint holds beyond the weights, the optimizer and the moving averages: the plateau
# policy's counters, the replica LR scale in force, the factor the policy and the NaN guard have
# applied to the LR, how many NaN retries were used, the seconds trained so far (a time budget
# counts them), the step the LR schedule is laid out to end at, and which kind of optimizer (an
# index in OPTIMIZER_KINDS) filled the optimizer's slots.
STATE_FIELDS = {**{f: 0.0 for f in schedules.PlateauPolicy.FIELDS}, "best": -math.inf, "ref": -math.inf,
                "best_step": -1.0, "lr_scale": 1.0, "lr_multiplier": 1.0, "nan_retries": 0.0,
                "train_seconds": 0.0, "horizon": 0.0, "optimizer_kind": 0.0}
OPTIMIZER_KINDS = ("adam", "sgd with momentum", "sgd")  # each has its own slot variables


@dataclass
class TrainState:
    """Everything a checkpoint holds, and the precision the model computes in."""
    model: object
    optimizer: object
    ema: hw2.EMA
    vars: dict  # name -> scalar float64 tf.Variable (STATE_FIELDS)
    precision: str

    def checkpoint(self, with_optimizer: bool = True, saved_by: str = "") -> tf.train.Checkpoint:
        """The objects a checkpoint holds; saved_by="0.1.0" restores one written by hw2 0.1.0,
        which had neither the named run state nor averaged batch-norm statistics."""
        parts = {"model": hw2.variables_by_path(self.model), "ema": self.ema.shadow}
        if saved_by != "0.1.0":
            parts.update(ema_stats=self.ema.stats_shadow, state=self.vars)
        return tf.train.Checkpoint(**parts, **({"optimizer": self.optimizer} if with_optimizer else {}))

    def get(self, name: str) -> float:
        return float(self.vars[name].numpy())

    def set(self, **values: float) -> None:
        for name, value in values.items():
            self.vars[name].assign(value)


def optimizer_kind(cfg: Mapping) -> str:
    """What decides the optimizer's slot variables: a checkpoint of another kind cannot fill them."""
    if cfg["optimizer"] == "sgd":
        return "sgd with momentum" if cfg["momentum"] > 0 else "sgd"
    return "adam"  # adamw keeps Adam's slots: either resumes the other's checkpoint


def create_train_state(cfg: Mapping, num_classes: int, strategy=None, precision: str | None = None) -> TrainState:
    """Model, optimizer, moving average and run state, created under `strategy`, computing in
    `precision` (default: what --precision auto picks for this machine, logged)."""
    strategy = strategy or tf.distribute.get_strategy()
    precision = precision or precisions.for_this_machine(cfg["precision"], timed=may_time(cfg, strategy))[0]
    with strategy.scope():
        with precisions.policy(precision):  # the model keeps it; the loss stays fp32
            model = hw2.create_model(cfg, num_classes)
        if cfg["sync_bn"]:
            hw2.synchronize_batch_norm(model)
        optimizer = hw2.make_optimizer(cfg, model)
        ema = hw2.EMA(model, cfg["ema_decay"])
        initial = {**STATE_FIELDS, "optimizer_kind": OPTIMIZER_KINDS.index(optimizer_kind(cfg))}
        variables = {name: tf.Variable(value, dtype=tf.float64, trainable=False, name=name)
                     for name, value in initial.items()}
    return TrainState(model, optimizer, ema, variables, precision)


@dataclass
class Plan:
    """The sizes of a run: batches, steps, classes, replicas."""
    replicas: int
    global_batch: int
    steps_per_epoch: int
    max_steps: int
    num_classes: int
    top_k: int
    lr_scale: float


def check_replicas(cfg: Mapping, replicas: int) -> None:
    """What one replica alone supports, refused before anything is built."""
    if cfg["sam_rho"] > 0 and replicas > 1:
        raise UserError(f"sam_rho needs one replica (this run has {replicas}): each would step its weights "
                        "by its own gradient; train on one device or set --sam_rho 0")


def make_plan(cfg: Mapping, split: Mapping, strategy) -> Plan:
    replicas = strategy.num_replicas_in_sync
    check_replicas(cfg, replicas)
    global_batch = cfg["batch_size"] * replicas  # batch_size is per replica
    steps_per_epoch = max(1, len(split["train"]) // global_batch)
    # max_epochs counts epochs of the global batch: the same data on any replica count.
    max_steps = cfg["max_epochs"] * steps_per_epoch if cfg["max_epochs"] > 0 else cfg["max_steps"]
    num_classes = len(split["class_names"])
    lr_scale = {"none": 1.0, "linear": float(replicas), "sqrt": math.sqrt(replicas)}[cfg["lr_scaling"]]
    return Plan(replicas, global_batch, steps_per_epoch, max_steps, num_classes, min(cfg["top_k"], num_classes),
                lr_scale)


def set_learning_rate(state: TrainState, cfg: Mapping, plan: Plan, step: int, horizon: int | None = None) -> float:
    """The LR for `step`: the schedule (laid over `horizon` steps, default max_steps) x the replica
    scaling x what the plateau policy and the NaN guard applied."""
    lr = schedules.lr_at(cfg, step, plan.steps_per_epoch, horizon or plan.max_steps) * plan.lr_scale \
        * state.get("lr_multiplier")
    state.optimizer.learning_rate.assign(lr)
    return lr


# ------------------------------------------------------------------------------ checkpoints

class Checkpoints:
    """RUN's regular checkpoints and best/ copy. Every worker takes part in a save (it is a
    collective); only the chief's land in RUN, the others write to a temporary folder."""

    def __init__(self, state: TrainState, train_dir: str, strategy, keep: int, cfg: Mapping | None = None):
        self.state, self.train_dir, self.cfg = state, train_dir, cfg
        self.chief, self.write_dir = _chief_and_write_dir(strategy, train_dir)
        resolver = getattr(strategy, "cluster_resolver", None)
        self.single_process = resolver is None or not resolver.task_type  # a save needs no other worker
        ckpt = state.checkpoint()
        self.manager = tf.train.CheckpointManager(ckpt, self.write_dir, max_to_keep=keep, checkpoint_name="ckpt")
        self.best_dir = os.path.join(self.write_dir, BEST)

    def restore_or_init(self, strategy, resume: bool = True) -> int:
        """Resume from RUN's newest readable checkpoint (workers read the chief's), else save ckpt-0
        so a NaN in the first steps has a state to return to. Returns the step to start from."""
        latest = tf.train.latest_checkpoint(self.train_dir) if resume else None
        start = self.restore(latest) if latest else 0
        _check_workers_agree(strategy, start, self.train_dir)
        if start:
            logging.info("resuming from step %d (%s)", start, latest)
            # The run stopped between the checkpoint and its best/ link. Only the chief's RUN has
            # both: other workers resume from the chief's files and keep no best/ of their own.
            if self.chief and int(self.state.get("best_step")) == start \
                    and not self.best_checkpoint().endswith(f"-{start}"):
                self.save_best(start)
        elif not self.manager.latest_checkpoint:
            self.save(0)
        return start

    def restore(self, path: str) -> int:
        path = run_dir.readable_checkpoint(path)
        reader = tf.train.load_checkpoint(path)
        if not reader.has_tensor("state/optimizer_kind/.ATTRIBUTES/VARIABLE_VALUE"):
            return self._restore_0_1_0(path, reader)
        kind = self.state.get("optimizer_kind")
        saved_kind = reader.get_tensor("state/optimizer_kind/.ATTRIBUTES/VARIABLE_VALUE")
        if saved_kind == kind:
            self.state.checkpoint().restore(path).assert_existing_objects_matched()
        else:  # fresh slots for the new optimizer; weights, step, averages and policy carry over
            self.state.checkpoint(with_optimizer=False).restore(path).expect_partial() \
                .assert_existing_objects_matched()
            self.state.optimizer.iterations.assign(run_dir.checkpoint_step(path))
            self.state.set(optimizer_kind=kind)
            logging.info("optimizer changed from %s to %s: its state starts fresh (weights, step, moving "
                         "averages and LR policy carry over)", OPTIMIZER_KINDS[int(saved_kind)],
                         OPTIMIZER_KINDS[int(kind)])
        return int(self.state.optimizer.iterations.numpy())

    def restore_weights(self, path: str) -> None:
        """The weights, averages and run state of `path`, not the optimizer (to measure it)."""
        if tf.train.load_checkpoint(path).has_tensor("state/optimizer_kind/.ATTRIBUTES/VARIABLE_VALUE"):
            self.state.checkpoint(with_optimizer=False).restore(path).expect_partial().assert_existing_objects_matched()
        else:
            self.state.checkpoint(with_optimizer=False, saved_by="0.1.0").restore(path).expect_partial() \
                .assert_nontrivial_match()

    def _restore_0_1_0(self, path: str, reader) -> int:
        """A checkpoint of hw2 0.1.0: its policy vector and LR become the run state; the averaged
        batch-norm statistics start from the model's."""
        self.state.checkpoint(saved_by="0.1.0").restore(path).expect_partial().assert_nontrivial_match()
        best, best_step, ref, stale, lowered, lr_scale = reader.get_tensor("policy/.ATTRIBUTES/VARIABLE_VALUE")
        multiplier = 1.0  # 0.1.0 kept the plateau policy's LR in the optimizer; a schedule recomputes its own
        if self.cfg and self.cfg["lr_schedule"] == "plateau":
            multiplier = float(self.state.optimizer.learning_rate.numpy()) / (self.cfg["learning_rate"] * lr_scale)
        self.state.set(best=best, best_step=best_step, ref=ref, stale=stale, since_drop=0 if lowered else stale,
                       lowered=lowered, lr_scale=lr_scale, lr_multiplier=multiplier)
        for s, v in zip(self.state.ema.stats_shadow, self.state.ema._stats):
            s.assign(v)
        logging.info("resumed a checkpoint of hw2 0.1.0 (%s)", path)
        return int(self.state.optimizer.iterations.numpy())

    def save(self, step: int) -> None:
        _save(self.manager, step)

    def save_best(self, step: int) -> None:
        """best/ becomes the regular checkpoint of `step` (saved just before): hard links to its
        files, not a second write of the same state (that took 90-150 ms an epoch on 196 photos)."""
        _link_checkpoint(os.path.join(self.write_dir, f"ckpt-{step}"), self.best_dir, f"best-{step}")

    def best_checkpoint(self) -> str:
        return tf.train.latest_checkpoint(self.best_dir) or ""

    def finish(self) -> None:
        if not self.chief:
            shutil.rmtree(self.write_dir, ignore_errors=True)


def _check_workers_agree(strategy, start: int, train_dir: str) -> None:
    """Several workers must resume from the same step. A worker whose RUN is not the chief's
    (a local folder, not a shared one) would otherwise wait forever in a save the others never
    join; here every worker stops with the same one line instead."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return
    total = _sum_over_workers(strategy)([float(start)])[0]
    if total != start * strategy.num_replicas_in_sync:
        raise UserError(f"the workers found different checkpoints in {train_dir} (this one, {resolver.task_type} "
                        f"{resolver.task_id}, would resume at step {start}): --train_dir must be one folder "
                        "that every worker sees (a shared file system), not a local folder on each machine")


def _sum_over_workers(strategy):
    """values -> their sums over every replica of every worker (an all-reduce all workers must join)."""
    def agree(values: list[float]) -> list[float]:
        per_replica = strategy.run(lambda: tf.constant(values, tf.float64))
        return [float(v) for v in strategy.reduce("SUM", per_replica, axis=None).numpy()]
    return agree


def _save(manager, step: int) -> None:
    """CheckpointManager writes the files, then atomically updates `checkpoint`: a kill or a
    full disk mid-save leaves the previous checkpoint the newest readable one."""
    try:
        manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as e:
        previous = manager.latest_checkpoint or "none"
        raise UserError(f"could not save checkpoint at step {step} in {manager.directory} "
                        f"({str(e).strip().splitlines()[0][:120]}); the last saved one is intact: {previous}") from None


def _link_checkpoint(source: str, directory: str, name: str) -> None:
    """DIRECTORY/NAME.* become links to SOURCE.* (copies where the file system has no hard
    links), then DIRECTORY's state file names it (an atomic write) and older files go. A kill at
    any point leaves the previous NAME readable, or the new one complete."""
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, name)
    source_dir, stem = os.path.split(source)
    suffixes = [f[len(stem):] for f in os.listdir(source_dir) if f.startswith(stem + ".")]
    if not suffixes:
        raise UserError(f"could not write {target}: the checkpoint {source} is missing")
    try:
        for suffix in suffixes:
            if os.path.lexists(target + suffix):
                os.remove(target + suffix)
            try:
                os.link(source + suffix, target + suffix)
            except OSError:
                shutil.copyfile(source + suffix, target + suffix)
        # CheckpointManager's state file, which tf.train.latest_checkpoint reads (TensorFlow's
        # own writer for it is deprecated and says so in the log).
        run_dir.atomic_write_text(os.path.join(directory, "checkpoint"),
                                  f'model_checkpoint_path: "{name}"\nall_model_checkpoint_paths: "{name}"\n')
    except OSError as e:
        raise UserError(f"could not write {target} ({str(e).strip().splitlines()[0][:120]}); "
                        f"the checkpoint itself is saved: {source}") from None
    for f in os.listdir(directory):
        path = os.path.join(directory, f)
        if os.path.isfile(path) and f != "checkpoint" and not f.startswith(name + "."):
            try:
                os.remove(path)
            except OSError as e:  # on Windows: open in another process (hw2_eval reading it); next time
                logging.warning("could not remove the old %s (%s)", path, e.strerror or e)


def is_chief(strategy) -> bool:
    """Whether this process writes RUN: the only one, or worker 0 / the chief of a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "chief" or (not has_chief and resolver.task_type == "worker"
                                             and resolver.task_id == 0)


def _chief_and_write_dir(strategy, train_dir: str) -> tuple[bool, str]:
    """(is this the chief, where this worker's checkpoints go): non-chiefs write to a temp dir."""
    if is_chief(strategy):
        return True, train_dir
    resolver = strategy.cluster_resolver
    write_dir = tempfile.mkdtemp(prefix=f"hw2-{resolver.task_type}{resolver.task_id}-")
    # finish() removes it on a normal end; this, when the worker stops on an error, an interrupt
    # or a preemption (the suite's multi-worker tests left one behind in /tmp per run).
    atexit.register(shutil.rmtree, write_dir, True)
    return False, write_dir


# ------------------------------------------------------------------------------ validation

class Validator:
    """Validation with the averaged weights, and its TensorBoard scalars."""

    def __init__(self, state: TrainState, split: Mapping, cfg: Mapping, plan: Plan, strategy, writers: dict):
        self.state, self.strategy, self.writers, self.top_k = state, strategy, writers, plan.top_k
        self.dataset = hw2_input.eval_dataset(split["data_dir"], split["val"], cfg, cfg["eval_batch_size"])
        self.eval_step = hw2.make_eval_step(state.model, strategy, plan.top_k)
        self.per_pass, self._iterator, self._images = 0, None, None

    def measure(self) -> dict:
        self.state.ema.swap()  # validation and the best checkpoint judge the averaged weights
        try:
            result = hw2.evaluate(self.eval_step, self._one_pass())
        finally:
            self.state.ema.swap()
        if self._images is None:
            self._images = result["n"]
        elif result["n"] != self._images:
            # A val file became unreadable mid-run (files are read again where the set is too big
            # to cache), so passes may no longer hold per_pass batches: count again.
            self._iterator, self._images = None, None
        return result

    def _one_pass(self):
        """The val set's distributed batches, once. The first pass counts them; later passes take
        that many from one iterator over the set repeated, because a new iterator each validation
        cost ~31 ms (tf.data builds its pipeline anew), ~2% of a 12-step epoch on 196 photos."""
        if self._iterator is None:
            self.per_pass = 0
            for batch in self.strategy.experimental_distribute_dataset(self.dataset):
                self.per_pass += 1
                yield batch
            if self.per_pass:  # an empty set repeated would never yield
                self._iterator = iter(self.strategy.experimental_distribute_dataset(self.dataset.repeat()))
            return
        taken = 0
        try:
            for _ in range(self.per_pass):
                yield next(self._iterator)
                taken += 1
        finally:
            if taken < self.per_pass:  # a pass cut short: the next one starts a new iterator
                self._iterator = None

    def __call__(self, step: int) -> dict:
        result = self.measure()
        with self.writers["val"].as_default(step=step):
            tf.summary.scalar("loss", result["loss"])
            tf.summary.scalar("top1", result["top1"])
            tf.summary.scalar(f"top{self.top_k}", result["topk"])
        return result


class Meter:
    """Sums of loss and top-1 hits over a window of steps, with its img/s (the first step after a
    start traces the graph and is left out of the timing)."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.reset()

    def reset(self) -> None:
        self.loss, self.ce, self.correct, self.steps, self.untimed, self.t = 0.0, 0.0, 0.0, 0, 0, time.time()

    def add(self, loss: float, ce: float, correct: float, untimed: bool = False) -> None:
        if untimed:
            self.untimed, self.t = self.untimed + 1, time.time()
        self.loss += loss
        self.ce += ce
        self.correct += correct
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        """Leave time spent between steps (a validation, its save) out of img/s: the rate is the
        training's, and the time to the next validation and the end (pace.py) counts those apart."""
        self.t += seconds

    def means(self) -> tuple[float, float, float]:
        """Mean loss (cross-entropy + L2), mean cross-entropy, top-1."""
        n = max(self.steps, 1)
        return self.loss / n, self.ce / n, self.correct / (n * self.global_batch)

    def images_per_sec(self) -> float:
        timed, dt = self.steps - self.untimed, time.time() - self.t
        return timed * self.global_batch / dt if timed > 0 and dt > 0 else float("nan")


# ------------------------------------------------------------------------------ the loop

def train(cfg: Mapping, split: Mapping, train_dir: str, strategy=None, hooks: Sequence = (),
          resume: bool = True, clock=time.monotonic, started: float | None = None) -> dict:
    """Train (or resume) a run in train_dir. Returns the best validation {'top1', 'topk', 'step', 'checkpoint'}.

    resume=False starts at step 0 whatever train_dir holds (a --fresh worker that is not the
    chief: the chief may not have moved the old run aside yet). `hooks` observe the run without
    changing it: each may define on_start(info), on_validation(row) and on_end(best), all taking
    plain dicts. Ctrl-C or SIGTERM: the current step ends, a checkpoint is saved, and
    `Interrupted` is raised with the command that resumes. `started`: the clock's reading when the
    command began, so that a time budget counts its start-up (None: from here).
    """
    run = Session(cfg, split, train_dir, strategy or tf.distribute.get_strategy(), hooks, resume, clock, started)
    step, stop_reason = run.start, None
    with Interrupts(enabled=run.ckpts.single_process) as interrupts:
        while step < run.plan.max_steps and not stop_reason:
            if interrupts.requested:
                run.save_and_raise_interrupted(step)
            out_of_time, horizon = run.pace.decide(step)
            if out_of_time:
                stop_reason = f"the time budget of {cfg['time_budget']:g} min is spent"
                if step == run.start and run.policy.best_step < 0:
                    run.finish(stop_reason)
                    raise utils.UserError(f"{stop_reason} before the first step: starting took "
                                          f"{run.pace.spent():.0f} s (imports, image checks, decoding, and on a "
                                          f"first run the autotune); give --time_budget more minutes")
                if step == run.start:  # a finished budgeted run started again with the same budget
                    stop_reason += (f" ({run.pace.spent_before / 60:.1f} min by this run's earlier starts): "
                                    f"a larger --time_budget trains on")
                break
            lr = run.set_learning_rate(step, horizon)
            total, ce, correct = (float(t) for t in run.train_step(run.iterator))
            step += 1
            if not math.isfinite(total):
                step = run.recover_from_nan(total, step)  # back to the last checkpoint, lower LR
                continue
            run.after_step(step, lr, total, ce, correct)  # meters, pace, histograms, progress
            run.save_if_preempted(step)  # several workers: SIGTERM to any, all save and stop here
            if run.pace.validation_due(step) and run.validate_and_save(step, lr) == "stop":
                stop_reason = f"no val top-1 gain for {run.policy.stale} validations"
        if stop_reason and stop_reason.startswith("the time budget") and run.last_validated != step:
            run.validate_and_save(step, run.lr)  # the budget ends with a validation of the last step
    return run.finish(stop_reason or f"reached max_steps={run.plan.max_steps}")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM after the run saved its state; the message says how to resume."""


class Interrupts:
    """While active, the first Ctrl-C or SIGTERM only asks the loop to stop after the current
    step (and save); a second one quits at once. Nothing is lost either way: a checkpoint only
    becomes the newest once its files are complete."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.requested, self.saved = enabled, False, None

    def __enter__(self):
        self.previous = {}
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            print("\ninterrupted again: quitting now (the newest checkpoint on disk is intact)",
                  file=sys.stderr, flush=True)
            os._exit(130)
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving (press Ctrl-C again "
              "to quit at once)", file=sys.stderr, flush=True)


def resume_command(argv: Sequence[str] | None = None, windows: bool = os.name == "nt") -> str:
    """The command this process was started with, without --fresh: what resumes the run."""
    argv = [a for a in (sys.argv if argv is None else argv) if a != "--fresh"]
    return utils.shell_join(["python", *argv] if argv and argv[0].endswith(".py") else argv, windows)


def may_time(cfg: Mapping, strategy) -> bool:
    """Whether timings on this machine may choose the forms and the precision: not under
    --deterministic, in the tests (HW2_CONV_AUTOTUNE=0), or with several workers (each would time
    its own and could choose otherwise)."""
    return utils.timings_may_choose(cfg) and not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def _choose_conv_forms(state: TrainState, cfg: Mapping, plan: Plan, strategy) -> None:
    """Each convolution's form (conv_forms.py): the fastest for its shape on this machine, timed
    once and cached (conv_autotune), or the fixed defaults where timing must not decide (may_time)."""
    import conv_autotune
    shape = (plan.global_batch // plan.replicas, cfg["image_size"], cfg["image_size"], cfg["channels"])
    logging.info("%s", conv_autotune.choose_conv_forms(
        state.model, shape, state.model.dtype_policy.compute_dtype, training=True, autotune=may_time(cfg, strategy)))


class Session:
    """One start of a run: everything the loop works with, and the loop's named steps."""

    def __init__(self, cfg, split, train_dir, strategy, hooks, resume, clock, started=None):
        self.cfg, self.split, self.strategy, self.clock = cfg, split, strategy, clock
        self.plan = plan = make_plan(cfg, split, strategy)
        _seed(cfg)
        self.state = create_train_state(cfg, plan.num_classes, strategy)
        _choose_conv_forms(self.state, cfg, plan, strategy)
        self.ckpts = Checkpoints(self.state, train_dir, strategy, cfg["keep_checkpoints"], cfg)
        self.hooks = hooks if self.ckpts.chief else ()  # hooks write files: one writer per run
        self.start = _start(self.state, self.ckpts, plan, strategy, resume)
        self.writers = {name: tf.summary.create_file_writer(os.path.join(train_dir, name)) if self.ckpts.chief
                        else tf.summary.create_noop_writer() for name in ("train", "val")}
        self.validate = Validator(self.state, split, cfg, plan, strategy, self.writers)
        self.train_step = hw2.make_train_step(self.state.model, self.state.optimizer, self.state.ema, strategy,
                                              plan.global_batch, cfg["label_smoothing"],
                                              _class_weights(cfg, split, plan),
                                              (cfg["mix"], cfg["mix_alpha"], cfg["seed"]), cfg["sam_rho"])
        self.iterator = _train_iterator(cfg, split, plan, strategy, self.start)
        self.policy = schedules.PlateauPolicy(cfg["lr_patience"], cfg["stop_patience"], cfg["min_delta"])
        self.policy.load({f: self.state.get(f) for f in self.policy.FIELDS})
        histograms = cfg["summary_every_steps"] and self.ckpts.chief and plan.replicas == 1
        self.probe = _probe_batch(split, cfg) if histograms or (self.start == 0 and self.ckpts.chief) else None
        if self.start == 0 and self.ckpts.chief:
            _write_sample_images(self.writers["train"], self.probe[0])
        self.summarize = hw2.make_summary_step(self.state.model, self.writers["train"], int(self.probe[1].shape[0]),
                                               cfg["label_smoothing"]) if histograms else None
        self.pace = pace.Pace(cfg, plan.steps_per_epoch, plan.max_steps, self.start, self.state.get("train_seconds"),
                              clock, agree=None if self.ckpts.single_process else _sum_over_workers(strategy),
                              started=started)
        self.window, self.since_val = Meter(plan.global_batch), Meter(plan.global_batch)
        self.bar = _progress_bar(self.start, plan.max_steps)
        self.log = self.bar.write if self.bar else logging.info
        self.last_validated, self.lr, self.planned = self.start, 0.0, False
        self.preemption = None if self.ckpts.single_process else self._preemption_handler()
        _log_start(cfg, split, plan, self.state)
        _call(self.hooks, "on_start", {
            "cfg": cfg, "split": split, "train_dir": train_dir, "model": self.state.model, "replicas": plan.replicas,
            "global_batch": plan.global_batch, "start_step": self.start, "steps_per_epoch": plan.steps_per_epoch,
            "params": _params(self.state.model), "precision": self.state.precision})

    def set_learning_rate(self, step: int, horizon: int | None) -> float:
        """The schedule's LR for `step`, laid over the horizon (with a time budget: what fits)."""
        if horizon is None:  # the budget's pace is not measured yet: keep the last estimate
            horizon = int(self.state.get("horizon")) or self.plan.max_steps
        elif self.cfg["time_budget"] and not self.planned:
            self._log_plan(step, horizon)
        self.state.set(horizon=horizon)
        self.lr = set_learning_rate(self.state, self.cfg, self.plan, step, horizon)
        return self.lr

    def _log_plan(self, step: int, horizon: int) -> None:
        self.planned = True
        self.log(f"time budget {self.cfg['time_budget']:g} min: at {self.pace.step_seconds():.2f} s/step, "
                 f"~{horizon:,} steps fit (~{horizon / self.plan.steps_per_epoch:.1f} epochs); "
                 f"{pace.clock_text(self.pace.budget - self.pace.spent())} left")

    def after_step(self, step: int, lr: float, total: float, ce: float, correct: float) -> None:
        self.pace.step_done(step)
        for meter in (self.window, self.since_val):
            meter.add(total, ce, correct, untimed=step == self.start + 1)
        if self.summarize and step % self.cfg["summary_every_steps"] == 0 and self.pace.histograms_due():
            t = self.clock()
            self.summarize(*self.probe, tf.constant(step, tf.int64))
            self.pace.histograms_written(self.clock() - t)
        to_val, to_end = self.pace.eta(step)
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{self.window.images_per_sec():.0f} img/s, next val "
                                     f"{pace.clock_text(to_val)}, end {pace.clock_text(to_end)}", refresh=False)
        if step % self.cfg["log_every_steps"] == 0 or step == self.plan.max_steps:
            _log_window(self.window, step, self.plan, lr, self.writers["train"], self.log,
                        f"; next validation in {pace.clock_text(to_val)}, end in {pace.clock_text(to_end)}")

    def _preemption_handler(self):
        """TensorFlow's own preemption support for several workers: a SIGTERM to any worker makes
        every worker save the same step (a save is a collective), then stop."""
        saved = []

        def save(step):
            self.state.set(train_seconds=self.pace.spent())
            self.ckpts.save(step)
            saved.append(step)

        def stop():
            raise Interrupted(f"preempted at step {saved[-1] if saved else '?'}: every worker saved it (the chief in "
                              f"{self.ckpts.train_dir}). Resume with the same command on each:\n  {resume_command()}")

        config = tf.distribute.experimental.TerminationConfig(exit_fn=stop, save_fn=save)
        return tf.distribute.experimental.PreemptionCheckpointHandler(self.strategy.cluster_resolver,
                                                                     self.ckpts.manager, termination_config=config)

    def save_if_preempted(self, step: int) -> None:
        if self.preemption is not None:
            self.preemption.save_checkpoint_if_preempted(step)

    def recover_from_nan(self, total: float, step: int) -> int:
        restored = _recover_from_nan(self.state, self.ckpts, self.cfg, total, step, self.log)
        self.iterator = _train_iterator(self.cfg, self.split, self.plan, self.strategy, restored)  # rewinds too
        return restored

    def validate_and_save(self, step: int, lr: float) -> str:
        t, wall = self.clock(), time.time()
        self.state.set(train_seconds=self.pace.spent())
        action = _validate_and_save(self.state, self.ckpts, self.policy, self.validate, self.cfg, self.plan, step,
                                    lr, self.since_val, self.hooks, self.log)
        self.pace.validated(self.clock() - t)
        self.window.exclude(time.time() - wall)
        self.last_validated = step
        return action

    def save_and_raise_interrupted(self, step: int) -> None:
        if step != self.last_validated:
            self.state.set(train_seconds=self.pace.spent())
            self.ckpts.save(step)
        self._close()
        _call(self.hooks, "on_end", {"interrupted": True, "step": step})
        raise Interrupted(f"interrupted at step {step}: saved {self.ckpts.manager.latest_checkpoint}. "
                          f"Resume with the same command:\n  {resume_command()}")

    def finish(self, stop_reason: str) -> dict:
        self._close()
        return _finish(self.state, self.ckpts, self.policy, self.validate, self.plan, stop_reason, self.hooks)

    def _close(self) -> None:
        if self.bar:
            self.bar.close()
        for w in self.writers.values():
            w.flush()


def _seed(cfg: Mapping) -> None:
    import keras
    keras.utils.set_random_seed(cfg["seed"])  # initial weights and dropout masks follow the seed
    if cfg["deterministic"]:
        tf.config.experimental.enable_op_determinism()


def _start(state: TrainState, ckpts: Checkpoints, plan: Plan, strategy, resume: bool) -> int:
    """Restore or init. The LR follows the replica count of this start (set_learning_rate), so a
    run resumed on another number of devices is rescaled; the log says so."""
    start = ckpts.restore_or_init(strategy, resume)
    if start and state.get("lr_scale") != plan.lr_scale:
        logging.info("resumed on %d replica(s): LR scale %.3g instead of %.3g", plan.replicas, plan.lr_scale,
                     state.get("lr_scale"))
    state.set(lr_scale=plan.lr_scale)
    return start


def _class_weights(cfg: Mapping, split: Mapping, plan: Plan):
    """Inverse-frequency loss weights for --class_balance weights; else None, with a hint when the
    classes are 3x apart or more."""
    import hw2_dataset
    counts = hw2_dataset.class_counts(split["train"], plan.num_classes)
    if cfg["class_balance"] == "weights":
        weights = hw2_dataset.class_weights(split["train"], plan.num_classes)
        logging.info("class_balance weights: %s", ", ".join(f"{n} {w:.2f}" for n, w in zip(split["class_names"], weights)))
        return weights
    note = hw2_dataset.imbalance_note(counts, split["class_names"])
    if note and cfg["class_balance"] == "none":
        logging.warning(note)
    return None


def _train_iterator(cfg: Mapping, split: Mapping, plan: Plan, strategy, step: int):
    """The training stream from `step` on: a pure function of the seed and the step."""
    dataset = strategy.distribute_datasets_from_function(
        lambda ctx: hw2_input.train_dataset(split["data_dir"], split["train"], cfg, plan.global_batch, ctx,
                                            start_example=step * plan.global_batch))
    return iter(dataset)


def _recover_from_nan(state: TrainState, ckpts: Checkpoints, cfg: Mapping, total: float, step: int, log) -> int:
    """A NaN/Inf loss: back to the newest checkpoint with a lower LR, or stop when retries run out.
    Returns the step restored; nothing saved is touched."""
    retries = state.get("nan_retries") + 1
    lr_now = float(state.optimizer.learning_rate.numpy())
    if retries > cfg["nan_retries"] or not ckpts.manager.latest_checkpoint:
        raise UserError(f"loss became {total} at step {step}{' again' if retries > 1 else ''}: lower "
                        f"--learning_rate (now {lr_now:g}); saved checkpoints are intact")
    multiplier = state.get("lr_multiplier") * cfg["lr_factor"]
    restored = ckpts.restore(ckpts.manager.latest_checkpoint)
    state.set(lr_multiplier=multiplier, nan_retries=retries)  # kept by the next checkpoint
    log(f"loss became {total} at step {step}: restored step {restored}, lr lowered to {lr_now * cfg['lr_factor']:g}")
    return restored


def _validate_and_save(state, ckpts, policy, validate, cfg, plan, step, lr, since_val, hooks, log) -> str:
    """Validate the averaged weights, apply the plateau policy, save best/ (first) and the checkpoint."""
    val = validate(step)
    previous_top = policy.top
    is_best, action = policy.update(val["top1"], step, val["n"])
    plateau = cfg["lr_schedule"] == "plateau"
    if not plateau and action in ("lower_lr", "stop"):
        action = "wait"  # another schedule owns the LR and runs to its end (max_steps or the budget)
    if action == "lower_lr":
        state.set(lr_multiplier=state.get("lr_multiplier") * cfg["lr_factor"])
    state.set(**policy.state())
    # The checkpoint first, then best/ links to it: a kill between the two resumes from this
    # checkpoint, and restore_or_init makes the link that is missing.
    ckpts.save(step)
    if is_best:
        ckpts.save_best(step)
    next_lr = schedules.lr_at(cfg, step, plan.steps_per_epoch, int(state.get("horizon")) or plan.max_steps) \
        * plan.lr_scale * state.get("lr_multiplier")
    # The stale count only acts under the plateau schedule; elsewhere it would only read as if it did.
    note = {"gain": "", "wait": f" (no gain for {policy.stale})" if plateau else "",
            "lower_lr": f" (no gain for {policy.stale}: lr -> {next_lr:g})",
            "stop": f" (no gain for {policy.stale}: stopping)"}[action]
    best = ""
    if is_best:
        best = " best" if val["top1"] > previous_top else f" best (within the noise of {previous_top:.4f})"
    log(f"step {step}: val loss {val['loss']:.4f} top-1 {val['top1']:.4f} top-{plan.top_k} "
        f"{val['topk']:.4f} n={val['n']} (EMA){best}{note}")
    train_loss, _, train_top1 = since_val.means()
    _call(hooks, "on_validation", {
        "step": step, "epoch": step / plan.steps_per_epoch, "lr": lr, "train_loss": train_loss,
        "train_top1": train_top1, "val_loss": val["loss"], "val_top1": val["top1"], "val_topk": val["topk"],
        "top_k": plan.top_k, "is_best": is_best, "seconds": time.time() - since_val.t})
    since_val.reset()
    return action


def _finish(state, ckpts, policy, validate, plan, stop_reason, hooks) -> dict:
    """Re-measure the best checkpoint (cheap, and exact even after a resume) and report it."""
    if policy.best_step < 0:
        logging.info("no validation ran (%s)", stop_reason)
        ckpts.finish()
        return {"top1": float("nan"), "topk": float("nan"), "step": -1}
    path = ckpts.best_checkpoint()
    ckpts.restore_weights(path)
    result = validate.measure()
    ckpts.finish()
    logging.info("stopped: %s", stop_reason)
    best = {"top1": result["top1"], "topk": result["topk"], "step": policy.best_step, "checkpoint": path}
    _call(hooks, "on_end", best)
    print(f"best val top-1 {best['top1']:.4f} top-{plan.top_k} {best['topk']:.4f} at step {best['step']} "
          f"({best['checkpoint']})", flush=True)
    return best


# ------------------------------------------------------------------------------ logging

def _params(model) -> int:
    return sum(int(tf.size(v)) for v in model.trainable_variables)


def _log_start(cfg: Mapping, split: Mapping, plan: Plan, state: TrainState) -> None:
    import models
    ignored = models.ignored_settings(cfg)
    if ignored:
        logging.warning("model %s does not use %s (set, but without effect)", cfg["model"], ", ".join(ignored))
    if plan.replicas > 1 or cfg["lr_scaling"] != "none":
        logging.info("%d replicas x batch %d = global batch %d; lr_scaling=%s: lr %g x %.3g = %g; sync_bn=%s",
                     plan.replicas, cfg["batch_size"], plan.global_batch, cfg["lr_scaling"], cfg["learning_rate"],
                     plan.lr_scale, cfg["learning_rate"] * plan.lr_scale, cfg["sync_bn"])
    logging.info("model %s: %d classes, %s parameters, input %dx%d, conv_impl=%s, %d replica(s), "
                 "batch %d, %d train / %d val images", cfg["model"], plan.num_classes, f"{_params(state.model):,}",
                 cfg["image_size"], cfg["image_size"], cfg["conv_impl"], plan.replicas, plan.global_batch,
                 len(split["train"]), len(split["val"]))


def _log_window(window: Meter, step: int, plan: Plan, lr: float, writer, log, eta: str = "") -> None:
    if window.steps == 0:
        return
    loss, ce, top1 = window.means()
    ips = window.images_per_sec()
    log(f"step {step} (epoch {step / plan.steps_per_epoch:.1f}): loss {loss:.4f} train top-1 {top1:.4f} "
        f"lr {lr:.2e} {ips:.0f} img/s{eta}")
    with writer.as_default(step=step):
        tf.summary.scalar("loss", loss)
        tf.summary.scalar("cross_entropy", ce)
        tf.summary.scalar("top1", top1)
        tf.summary.scalar("learning_rate", lr)
        tf.summary.scalar("images_per_sec", ips)
    window.reset()


def _probe_batch(split: Mapping, cfg: Mapping):
    """A fixed batch of up to 32 augmented training images (the first of a stream over the first
    64 files): the sample images in TensorBoard and the batch the histograms (summary_every_steps)
    are computed on. Histograms are written on one device only: the probe batch runs outside
    the replicas, which several devices would each write."""
    items = split["train"][:64]
    return next(iter(hw2_input.train_dataset(split["data_dir"], items, cfg, min(32, len(items)))))


def _write_sample_images(writer, images) -> None:
    """A few augmented training inputs in TensorBoard, rescaled from standardized to [0, 1]."""
    images = images[:8]
    lo = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
    hi = tf.reduce_max(images, axis=[1, 2, 3], keepdims=True)
    with writer.as_default(step=0):
        tf.summary.image("input_images", (images - lo) / tf.maximum(hi - lo, 1e-6), max_outputs=8)


def _progress_bar(start: int, total: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)


def _call(hooks, event: str, payload) -> None:
    for hook in hooks:
        fn = getattr(hook, event, None)
        if fn is not None:
            fn(payload)
