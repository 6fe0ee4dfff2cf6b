"""Train hw2 on a class-folder dataset, on CPU or one GPU.

    python hw2_train.py --data_dir DIR --train_dir RUN [--section S] [--<config key> V ...]

This is the one training loop: hw2_multi_gpu_train.py runs the same `train()` under another
tf.distribute strategy.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import sys
import time

import utils
from utils import UserError

# Keys that define the network's variables: changing one makes old checkpoints unusable.
MODEL_KEYS = ("model", "image_size", "conv_stack", "conv2", "inception_version", "inception2",
              "inception2_bottleneck", "inception3", "inception3_bottleneck", "dense_units",
              "channels", "norm", "residual", "stem", "stem_pool", "width", "fc_units")


class PlateauPolicy:
    """Lower the LR after `lr_patience` validations without a gain, stop after `stop_patience`.

    A gain means beating the reference metric by more than `min_delta`; the best checkpoint
    follows any strict improvement. Every lr_patience-th stale validation lowers the LR again.
    State is a plain dict so it round-trips through checkpoints (see `state`/`load`).
    """

    def __init__(self, lr_patience: int, stop_patience: int, min_delta: float):
        self.lr_patience, self.stop_patience, self.min_delta = lr_patience, stop_patience, min_delta
        self.best, self.best_step, self.ref, self.stale, self.lowered = -math.inf, -1, -math.inf, 0, 0

    def update(self, metric: float, step: int) -> tuple[bool, str]:
        """Returns (is_new_best, action) with action in 'gain' | 'wait' | 'lower_lr' | 'stop'."""
        is_best = metric > self.best
        if is_best:
            self.best, self.best_step = metric, step
        if metric > self.ref + self.min_delta:
            self.ref, self.stale = metric, 0
            return is_best, "gain"
        self.stale += 1
        if self.stale >= self.stop_patience:
            return is_best, "stop"
        if self.stale % self.lr_patience == 0:
            self.lowered += 1
            return is_best, "lower_lr"
        return is_best, "wait"

    def state(self) -> list[float]:
        return [self.best, self.best_step, self.ref, self.stale, self.lowered]

    def load(self, values) -> None:
        best, best_step, ref, stale, lowered = (float(v) for v in values)
        self.best, self.best_step, self.ref = best, int(best_step), ref
        self.stale, self.lowered = int(stale), int(lowered)


def build_parser(prog: str = "hw2_train.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train hw2 on DATA_DIR/<class>/<image>. "
                                "Any config key can be given as --key value (see config.cfg).")
    p.add_argument("--data_dir", help="class-folder dataset (not needed to resume an existing RUN)")
    p.add_argument("--train_dir", required=True, help="run directory: checkpoints, logs, config")
    p.add_argument("--section", default="default", help="config.cfg section (default: default)")
    p.add_argument("--config", default=utils.DEFAULT_CONFIG, help="config file")
    p.add_argument("--split", help="an existing split file (hw2_dataset.py --out) instead of a new split")
    p.add_argument("--fresh", action="store_true",
                   help="start over: an existing RUN is moved aside to RUN-old-<time>, never deleted")
    return p


def resolve_config(args, overrides: dict) -> utils.Config:
    """Config for this run; on resume the saved model keys must match, other keys may change."""
    cfg = utils.load_config(args.section, overrides, args.config)
    saved_path = os.path.join(args.train_dir, "config.json")
    if not args.fresh and os.path.isfile(saved_path):
        saved = utils.config_from_json(utils.load_json(saved_path, "run config")["config"])
        changed = [k for k in MODEL_KEYS if saved.get(k) != cfg.get(k)]
        # fp16 wraps the optimizer in a loss scaler: its checkpoints don't restore into fp32/bf16 runs.
        if "fp16" in (saved.get("precision"), cfg.get("precision")) and saved.get("precision") != cfg.get("precision"):
            changed.append("precision")
        if changed:
            k = changed[0]
            raise UserError(f"{args.train_dir} was trained with {k}={saved.get(k)}, now {k}={cfg.get(k)}: "
                            "use the same --section/flags, --fresh, or a new --train_dir")
    return cfg


def prepare_run_dir(train_dir: str, fresh: bool) -> None:
    if fresh and os.path.isdir(train_dir) and os.listdir(train_dir):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        old = f"{train_dir.rstrip('/')}-old-{stamp}"
        os.rename(train_dir, old)
        logging.info("--fresh: moved the previous run to %s", old)
    try:
        os.makedirs(train_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create train_dir {train_dir}: {e.strerror}") from None
    if not os.access(train_dir, os.W_OK):
        raise UserError(f"train_dir {train_dir} is not writable")


def prepare_split(args, cfg) -> dict:
    """The run's split: RUN/split.json if resuming, else --split, else a new split of --data_dir."""
    import hw2_dataset
    run_split = os.path.join(args.train_dir, "split.json")
    if os.path.isfile(run_split):
        split = hw2_dataset.load_split(run_split)
        if args.data_dir and os.path.abspath(args.data_dir) != os.path.abspath(split["data_dir"]):
            raise UserError(f"{args.train_dir} was trained on {split['data_dir']}, not {args.data_dir}: "
                            "use --fresh or a new --train_dir")
        return split
    if args.split:
        split = hw2_dataset.load_split(args.split)
        utils.save_json(run_split, split)  # RUN keeps its own copy: eval and resume need no flags
    else:
        if not args.data_dir:
            raise UserError("--data_dir is required for a new run")
        scan = hw2_dataset.scan_dataset(args.data_dir)
        train, val = hw2_dataset.make_split(scan.items, cfg.val_fraction, cfg.seed)
        _report_bad_images(scan, train, val, args.train_dir, cfg.on_bad_image)
        hw2_dataset.write_split(run_split, scan, train, val, cfg.seed, cfg.val_fraction)
        split = hw2_dataset.load_split(run_split, check_files=False)  # the scan just read every file
    if not split["val"]:
        raise UserError("the split has no validation images: every class needs at least 2 images")
    return split


def _report_bad_images(scan, train, val, train_dir: str, on_bad_image: str) -> None:
    """Skipped files and train/val duplicates go to RUN/bad_images.txt; `fail` stops instead."""
    import hw2_dataset
    lines = [f"{path}\t{why}" for path, why in scan.bad]
    val_paths = {p for p, _ in val}
    train_paths = {p for p, _ in train}
    for group in hw2_dataset.find_duplicates(scan):
        if any(p in val_paths for p in group) and any(p in train_paths for p in group):
            lines.append(f"{group[0]}\tsame content as {', '.join(group[1:])} (in both train and val)")
    if not lines:
        return
    bad_path = os.path.join(train_dir, "bad_images.txt")
    with open(bad_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    if on_bad_image == "fail":
        raise UserError(f"{len(lines)} unusable or duplicate files, e.g. {lines[0].replace(chr(9), ': ')} "
                        f"(all in {bad_path}; --on_bad_image skip to train without them)")
    logging.warning("%d files skipped or duplicated across train/val (listed in %s), e.g. %s",
                    len(lines), bad_path, lines[0].replace("\t", ": "))


def train(cfg: utils.Config, split: dict, train_dir: str, strategy=None, hooks=()) -> dict:
    """The training loop. Returns the best validation result {'top1', 'topk', 'step'}.

    `hooks` observe the run without changing it: each may define on_start(info),
    on_validation(row) and on_end(best), all taking and returning plain dicts/None.
    """
    import tensorflow as tf

    import hw2
    import hw2_input
    import precision
    import schedules

    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    global_batch = cfg.batch_size * replicas  # batch_size is per replica
    num_classes = len(split["class_names"])
    top_k = min(cfg.top_k, num_classes)
    data_dir, train_items = split["data_dir"], split["train"]
    steps_per_epoch = max(1, len(train_items) // global_batch)
    if cfg.get("max_epochs", 0) > 0:  # epochs of the global batch: the same data on any replica count
        cfg = utils.Config({**cfg, "max_steps": cfg.max_epochs * steps_per_epoch})
    import keras
    keras.utils.set_random_seed(cfg.seed)  # initial weights and dropout masks follow the seed
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()

    chief, write_dir = _chief_and_write_dir(strategy, train_dir)
    hooks = hooks if chief else ()  # hooks write files: one writer per run
    lr_scale = {"none": 1.0, "linear": float(replicas), "sqrt": math.sqrt(replicas)}[cfg.lr_scaling]
    chosen_precision, _ = precision.for_this_machine(cfg.get("precision", "auto"))  # logs which and why
    with strategy.scope():
        with precision.policy(chosen_precision):  # the model keeps it; the loss stays fp32
            model = hw2.build_model(cfg, num_classes)
        if cfg.sync_bn:
            hw2.synchronize_batch_norm(model)
        optimizer = hw2.make_optimizer(cfg, model)
        optimizer.learning_rate.assign(cfg.learning_rate * lr_scale)
        ema = hw2.EMA(model, cfg.ema_decay)
        # best, best_step, ref, stale, lowered (PlateauPolicy.state) and the LR scale in force
        policy_vars = tf.Variable([-math.inf, -1, -math.inf, 0, 0, lr_scale], dtype=tf.float64, trainable=False)
    policy = PlateauPolicy(cfg.lr_patience, cfg.stop_patience, cfg.min_delta)
    ckpt = tf.train.Checkpoint(model=hw2.variables_by_path(model), optimizer=optimizer, ema=ema.shadow,
                               policy=policy_vars)
    # Every worker must take part in a save (it is a collective); only the chief's lands in RUN.
    manager = tf.train.CheckpointManager(ckpt, write_dir, max_to_keep=cfg.keep_checkpoints,
                                         checkpoint_name="ckpt")
    best_manager = tf.train.CheckpointManager(ckpt, os.path.join(write_dir, "best"), max_to_keep=1,
                                              checkpoint_name="best")
    latest = tf.train.latest_checkpoint(train_dir)  # workers resume from the chief's checkpoint

    def restore(path) -> int:
        if path:
            path = _readable_checkpoint(path)
            ckpt.restore(path).assert_existing_objects_matched()
            state = policy_vars.numpy()
            policy.load(state[:5])
            if state[5] != lr_scale:  # resumed on another number of replicas
                optimizer.learning_rate.assign(float(optimizer.learning_rate.numpy()) / state[5] * lr_scale)
                policy_vars.assign(list(state[:5]) + [lr_scale])
        return int(optimizer.iterations.numpy())

    start = restore(latest)
    if start == 0 and not manager.latest_checkpoint:
        _save(manager, 0)  # a NaN in the first steps has a good state to return to
    params = sum(int(tf.size(v)) for v in model.trainable_variables)
    if start:
        logging.info("resuming from step %d (%s)", start, latest)
    if replicas > 1 or cfg.lr_scaling != "none":
        logging.info("%d replicas x batch %d = global batch %d; lr_scaling=%s: lr %g x %.3g = %g; sync_bn=%s",
                     replicas, cfg.batch_size, global_batch, cfg.lr_scaling, cfg.learning_rate, lr_scale,
                     float(optimizer.learning_rate.numpy()), cfg.sync_bn)
    logging.info("model %s: %d classes, %s parameters, input %dx%d, conv_impl=%s, %d replica(s), "
                 "batch %d, %d train / %d val images", cfg.model, num_classes, f"{params:,}",
                 cfg.image_size, cfg.image_size, cfg.conv_impl, replicas, global_batch,
                 len(train_items), len(split["val"]))

    train_ds = strategy.distribute_datasets_from_function(
        lambda ctx: hw2_input.train_dataset(data_dir, train_items, cfg, global_batch, ctx,
                                            start_example=start * global_batch))
    val_ds = hw2_input.eval_dataset(data_dir, split["val"], cfg, cfg.eval_batch_size)
    train_step = hw2.make_train_step(model, optimizer, ema, strategy, global_batch,
                                     cfg.get("label_smoothing", 0.0))
    eval_step = hw2.make_eval_step(model, strategy, top_k)
    writers = {name: tf.summary.create_file_writer(os.path.join(train_dir, name)) if chief
               else tf.summary.create_noop_writer() for name in ("train", "val")}
    if start == 0 and chief:
        _write_sample_images(writers["train"], data_dir, train_items, cfg)

    def validate(step: int) -> dict:
        ema.swap()  # validation and the best checkpoint judge the averaged weights
        try:
            result = hw2.evaluate(eval_step, val_ds, strategy)
        finally:
            ema.swap()
        with writers["val"].as_default(step=step):
            tf.summary.scalar("loss", result["loss"])
            tf.summary.scalar("top1", result["top1"])
            tf.summary.scalar(f"top{top_k}", result["topk"])
        with writers["train"].as_default(step=step):
            for v in model.trainable_variables:
                tf.summary.histogram(v.path, v.value)
        return result

    _call(hooks, "on_start", {"cfg": cfg, "split": split, "train_dir": train_dir, "model": model,
                              "replicas": replicas, "global_batch": global_batch, "start_step": start,
                              "steps_per_epoch": steps_per_epoch, "params": params})
    bar = _progress_bar(start, cfg.max_steps)
    log = bar.write if bar else logging.info
    iterator = iter(train_ds)
    step, nan_retries = start, 0
    window = {"loss": 0.0, "correct": 0.0, "steps": 0, "t": time.time()}
    since_val = {"loss": 0.0, "correct": 0.0, "steps": 0, "t": time.time()}
    stop_reason = f"reached max_steps={cfg.max_steps}"
    while step < cfg.max_steps:
        if cfg.get("lr_schedule", "plateau") != "plateau":  # a function of the step; plateau: the policy
            optimizer.learning_rate.assign(schedules.lr_at(cfg, step, steps_per_epoch) * lr_scale)
        total, ce, correct = (float(t) for t in train_step(iterator))
        step += 1
        if not math.isfinite(total):
            nan_retries += 1
            if nan_retries > cfg.nan_retries or not manager.latest_checkpoint:
                raise UserError(f"loss became {total} at step {step}"
                                f"{' again' if nan_retries > 1 else ''}: lower --learning_rate "
                                f"(now {float(optimizer.learning_rate.numpy()):g}); saved checkpoints are intact")
            step = restore(manager.latest_checkpoint)
            lr = float(optimizer.learning_rate.numpy()) * cfg.lr_factor
            optimizer.learning_rate.assign(lr)
            log(f"loss became {total} at step {step + 1}: restored step {step}, lr lowered to {lr:g}")
            continue
        for acc in (window, since_val):
            acc["loss"] += total
            acc["correct"] += correct
            acc["steps"] += 1
        if step == start + 1:  # the first step traces the graph: keep it out of img/s
            window["t"], window["untimed"] = time.time(), 1
        if bar:
            bar.update(1)
        if step % cfg.log_every_steps == 0 or step == cfg.max_steps:
            _log_window(window, step, steps_per_epoch, global_batch, optimizer, writers["train"], log, bar)
        if step % cfg.save_checkpoint_steps == 0 or step == cfg.max_steps:
            lr_used = float(optimizer.learning_rate.numpy())
            val = validate(step)
            is_best, action = policy.update(val["top1"], step)
            if action == "lower_lr" and cfg.get("lr_schedule", "plateau") == "plateau":
                lr = float(optimizer.learning_rate.numpy()) * cfg.lr_factor
                optimizer.learning_rate.assign(lr)
            policy_vars.assign(policy.state() + [lr_scale])
            # Best first: a kill between the two saves then resumes from the previous checkpoint
            # and replays this validation, instead of trusting a best copy that was never written.
            if is_best:
                _save(best_manager, step, manager.latest_checkpoint)
            _save(manager, step)
            note = {"gain": "", "wait": f" (no gain for {policy.stale})",
                    "lower_lr": f" (no gain for {policy.stale}: lr -> {float(optimizer.learning_rate.numpy()):g})",
                    "stop": f" (no gain for {policy.stale}: stopping)"}[action]
            log(f"step {step}: val loss {val['loss']:.4f} top-1 {val['top1']:.4f} top-{top_k} "
                f"{val['topk']:.4f} n={val['n']} (EMA){' best' if is_best else ''}{note}")
            n = max(since_val["steps"], 1)
            _call(hooks, "on_validation", {
                "step": step, "epoch": step / steps_per_epoch, "lr": lr_used,
                "train_loss": since_val["loss"] / n, "train_top1": since_val["correct"] / (n * global_batch),
                "val_loss": val["loss"], "val_top1": val["top1"], "val_topk": val["topk"], "top_k": top_k,
                "is_best": is_best, "seconds": time.time() - since_val["t"]})
            since_val.update(loss=0.0, correct=0.0, steps=0, t=time.time())
            if action == "stop":
                stop_reason = f"no val top-1 gain for {policy.stale} validations"
                break
    if bar:
        bar.close()
    for w in writers.values():
        w.flush()
    if policy.best_step < 0:
        logging.info("no validation ran (max_steps=%d already reached)", cfg.max_steps)
        if not chief:
            import shutil
            shutil.rmtree(write_dir, ignore_errors=True)
        return {"top1": float("nan"), "topk": float("nan"), "step": -1}
    best = _best_result(best_manager, policy, val_ds, eval_step, ckpt, ema, strategy)
    if not chief:
        import shutil
        shutil.rmtree(write_dir, ignore_errors=True)
    logging.info("stopped: %s", stop_reason)
    best["checkpoint"] = best_manager.latest_checkpoint
    _call(hooks, "on_end", best)
    print(f"best val top-1 {best['top1']:.4f} top-{top_k} {best['topk']:.4f} at step {best['step']} "
          f"({best_manager.latest_checkpoint})", flush=True)
    return best


def _save(manager, step: int, last_good: str | None = None) -> None:
    """CheckpointManager writes the files, then atomically updates `checkpoint`: a kill or a
    full disk mid-save leaves the previous checkpoint the newest readable one."""
    try:
        manager.save(checkpoint_number=step)
    except (OSError, __import__("tensorflow").errors.OpError) as e:
        previous = last_good or manager.latest_checkpoint or "none"
        raise UserError(f"could not save checkpoint at step {step} in {manager.directory} "
                        f"({str(e).strip().splitlines()[0][:120]}); the last saved one is intact: {previous}") from None


def _readable_checkpoint(path: str) -> str:
    """`path` if it reads, else the newest older checkpoint that does (with a warning)."""
    import tensorflow as tf
    directory = os.path.dirname(path)
    state = tf.train.get_checkpoint_state(directory)
    candidates = [path] + [p for p in reversed(list(state.all_model_checkpoint_paths if state else []))
                           if p != path]
    for p in candidates:
        try:
            tf.train.load_checkpoint(p).get_variable_to_shape_map()
            if p != path:
                logging.warning("checkpoint %s is unreadable: falling back to %s", path, p)
            return p
        except (tf.errors.OpError, ValueError):
            continue
    raise UserError(f"no readable checkpoint in {directory} (newest: {path}): use --fresh to start over")


def _chief_and_write_dir(strategy, train_dir: str) -> tuple[bool, str]:
    """(is this the chief worker, where this worker's checkpoints go): non-chiefs write to a temp dir."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True, train_dir
    task_type, task_id = resolver.task_type, resolver.task_id
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    chief = task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)
    if chief:
        return True, train_dir
    import tempfile
    return False, tempfile.mkdtemp(prefix=f"hw2-{task_type}{task_id}-")


def _call(hooks, event: str, payload) -> None:
    for hook in hooks:
        fn = getattr(hook, event, None)
        if fn is not None:
            fn(payload)


def _best_result(best_manager, policy, val_ds, eval_step, ckpt, ema, strategy) -> dict:
    """Re-measure the best checkpoint (cheap, and exact even after a resume)."""
    import hw2
    ckpt.restore(best_manager.latest_checkpoint).assert_existing_objects_matched()
    ema.swap()
    result = hw2.evaluate(eval_step, val_ds, strategy)
    ema.swap()
    return {"top1": result["top1"], "topk": result["topk"], "step": policy.best_step}


def _log_window(window, step, steps_per_epoch, global_batch, optimizer, writer, log, bar) -> None:
    import tensorflow as tf
    n = window["steps"]
    if n == 0:
        return
    dt = time.time() - window["t"]
    loss, top1 = window["loss"] / n, window["correct"] / (n * global_batch)
    lr = float(optimizer.learning_rate.numpy())
    timed = n - window.get("untimed", 0)
    ips, spb = (timed * global_batch / dt, dt / timed) if timed > 0 and dt > 0 else (float("nan"),) * 2
    log(f"step {step} (epoch {step / steps_per_epoch:.1f}): loss {loss:.4f} train top-1 {top1:.4f} "
        f"lr {lr:.2e} {ips:.0f} img/s {spb:.3f} sec/batch")
    if bar:
        bar.set_postfix(loss=f"{loss:.3f}", top1=f"{top1:.3f}", refresh=False)
    with writer.as_default(step=step):
        tf.summary.scalar("loss", loss)
        tf.summary.scalar("top1", top1)
        tf.summary.scalar("learning_rate", lr)
        tf.summary.scalar("images_per_sec", ips)
    window.update(loss=0.0, correct=0.0, steps=0, untimed=0, t=time.time())


def _write_sample_images(writer, data_dir, items, cfg) -> None:
    """A few augmented training inputs in TensorBoard, rescaled from standardized to [0, 1]."""
    import tensorflow as tf

    import hw2_input
    images, _ = next(iter(hw2_input.train_dataset(data_dir, items[:64], cfg, min(8, len(items)))))
    lo = tf.reduce_min(images, axis=[1, 2, 3], keepdims=True)
    hi = tf.reduce_max(images, axis=[1, 2, 3], keepdims=True)
    with writer.as_default(step=0):
        tf.summary.image("input_images", (images - lo) / tf.maximum(hi - lo, 1e-6), max_outputs=8)


def _progress_bar(start: int, total: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)


def run(argv: list[str], strategy_fn=None, prog: str = "hw2_train.py") -> int:
    """Parse flags, prepare RUN, train. `strategy_fn(args_rest)` lets the multi-device script pick a strategy."""
    args, rest = build_parser(prog).parse_known_args(argv)
    utils.setup_logging()
    overrides = utils.parse_overrides(rest)
    cfg = resolve_config(args, overrides)
    prepare_run_dir(args.train_dir, args.fresh)
    split = prepare_split(args, cfg)
    if "top_k" in overrides and cfg.top_k > len(split["class_names"]):
        raise UserError(f"--top_k {cfg.top_k} is larger than the number of classes ({len(split['class_names'])})")
    if cfg.top_k > len(split["class_names"]):
        logging.info("top_k %d > %d classes: reporting top-%d", cfg.top_k, len(split["class_names"]),
                     len(split["class_names"]))
    utils.save_json(os.path.join(args.train_dir, "config.json"),
                    {"section": args.section, "config": cfg, "class_names": split["class_names"]})
    strategy = strategy_fn() if strategy_fn else None
    import report  # run.json, summary.csv, curves.png
    train(cfg, split, args.train_dir, strategy, hooks=[report.RunRecord(args.train_dir)])
    return 0


def main(argv: list[str] | None = None) -> int:
    return utils.run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
