"""The run directory (RUN, a hw2_train.py --train_dir): what lands in it, and how to read it back.

    RUN/config.json      the resolved config, section and class names (eval rebuilds the model from it)
    RUN/split.json       the train/val split
    RUN/bad_images.txt   files the scan skipped and train/val duplicates
    RUN/ckpt-N.*         the last keep_checkpoints checkpoints; RUN/best/best-N.* the best one
    RUN/run.json, summary.csv, curves.png, train/, val/, eval/   records, logs and evaluations
    RUN/.lock            held by the process training RUN (who and since when, inside)

Every file written here is written whole or not at all (`atomic_write_text`). This module is
the only one that knows these names; it imports TensorFlow only inside the functions that
restore checkpoints, so the data tools stay quick to start.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import logging
import math
import os
import re
import socket
import tempfile
from typing import Any, Sequence

import file_lock
import utils
from utils import UserError

CONFIG, SPLIT, BAD_IMAGES = "config.json", "split.json", "bad_images.txt"
RUN_RECORD, SUMMARY, CURVES = "run.json", "summary.csv", "curves.png"
BEST, EVAL = "best", "eval"
LOCK = ".lock"


# ---------------------------------------------------------------------------- atomic writes

def atomic_write_text(path: str, text: str) -> None:
    """Write then rename: a kill or a full disk mid-write never leaves half a file where a good one was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(valid_utf8(text))
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def valid_utf8(text: str) -> str:
    """A file name that is not UTF-8 (Latin-1 from an old camera or a Windows zip) reaches us as
    a str with surrogates, which UTF-8 cannot encode: it is written as caf\\xe9.png instead."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that no byte decoded to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def save_json(path: str, obj: Any) -> None:
    text = json.dumps(obj, indent=1, default=list, ensure_ascii=False)
    # Surrogates (names that are not UTF-8) only occur inside JSON strings: as \udce9 escapes they
    # read back as the same str, so the name still finds its file.
    atomic_write_text(path, _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n")


_SURROGATE = re.compile("[\ud800-\udfff]")


def load_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    buffer = io.StringIO()
    w = csv.writer(buffer)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


# ---------------------------------------------------------------------------- config and split

def find(checkpoint_dir: str) -> str:
    """The run directory of a checkpoint dir: RUN itself or RUN/best (it holds config.json)."""
    if not os.path.isdir(checkpoint_dir):
        raise UserError(f"checkpoint_dir not found: {checkpoint_dir}")
    check_run_path(checkpoint_dir, "--checkpoint_dir")
    for d in (checkpoint_dir, os.path.dirname(os.path.abspath(checkpoint_dir))):
        if os.path.isfile(os.path.join(d, CONFIG)):
            return d
    if os.path.isfile(os.path.join(checkpoint_dir, "saved_model.pb")):
        raise UserError(f"{checkpoint_dir} is an exported SavedModel, not a hw2 run directory: point "
                        "--checkpoint_dir at the hw2_train.py --train_dir it came from (hw2_predict.py --model "
                        "takes the export)")
    raise UserError(f"{checkpoint_dir} is not a hw2 run directory (no {CONFIG}): "
                    "point --checkpoint_dir at a hw2_train.py --train_dir")


def save_config(run: str, section: str, cfg: dict, class_names: Sequence[str]) -> None:
    save_json(os.path.join(run, CONFIG), {"section": section, "config": cfg, "class_names": list(class_names)})


def read_config(run: str) -> tuple[utils.Config, list[str]]:
    """(config, class names) the run was trained with."""
    saved = load_json(os.path.join(run, CONFIG), "run config")
    return utils.config_from_json(saved["config"], os.path.join(run, CONFIG)), saved["class_names"]


def resolve_config(train_dir: str, section: str, overrides: dict, config_path: str = utils.DEFAULT_CONFIG,
                   fresh: bool = False) -> utils.Config:
    """The config of a new or resumed run. On resume the keys that shape the network must not
    change (its checkpoints would not fit); anything else may."""
    import config_keys
    cfg = utils.load_config(section, overrides, config_path)
    if fresh or not os.path.isfile(os.path.join(train_dir, CONFIG)):
        return cfg
    saved, _ = read_config(train_dir)
    # An auto value (0) means whatever the run resolved it to.
    changed = [k for k in config_keys.MODEL_KEYS if saved[k] != cfg[k] and not (k == "image_size" and cfg[k] == 0)]
    # fp16 wraps the optimizer in a loss scaler: its checkpoints don't restore into fp32/bf16 runs.
    if "fp16" in (saved.precision, cfg.precision) and saved.precision != cfg.precision:
        changed.append("precision")
    if changed:
        k = changed[0]
        raise UserError(f"{train_dir} was trained with {k}={_show(saved[k])}, now {k}={_show(cfg[k])}: "
                        "use the same --section/flags, --fresh, or a new --train_dir")
    return cfg


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def check_run_path(run: str, flag: str = "--train_dir") -> None:
    """TensorFlow finds checkpoints by file pattern (tf.train.latest_checkpoint), so in a run
    folder named `runs/[a]` it finds none: a resume would start over at step 0 and sweep the old
    checkpoints away, and eval would find nothing."""
    bad = sorted(set("[]*?") & set(os.path.abspath(run)))
    if bad:
        raise UserError(f"{flag} {run}: TensorFlow reads {' '.join(bad)} in a checkpoint's path as a file pattern "
                        "and would not find the run's checkpoints again; use a path without them")


def check_apart(run: str, data_dir: str | None, flag: str = "--train_dir") -> None:
    """A run folder inside the data would become a class folder of it (best/, train/, val/), and
    data inside a run would move with it on --fresh: either way the user's images are at stake."""
    if not data_dir:
        return
    run_real, data_real = os.path.realpath(run), os.path.realpath(data_dir)
    if os.path.commonpath([run_real, data_real]) == data_real:
        where = "is" if run_real == data_real else "is inside"
        raise UserError(f"{flag} {run} {where} --data_dir {data_dir}: its checkpoints and logs would "
                        f"become class folders; put runs beside the data, e.g. {flag} runs/NAME")
    if os.path.commonpath([run_real, data_real]) == run_real:
        raise UserError(f"--data_dir {data_dir} is inside {flag} {run}: --fresh would move it aside with "
                        "the run; keep the data outside the run folder")


class RunInUse(UserError):
    """RUN/.lock is held by another process (`holder` says which)."""

    def __init__(self, train_dir: str, holder: str):
        super().__init__(f"{train_dir} is in use by {holder}: wait for it to end, or use another --train_dir")
        self.holder = holder


@contextlib.contextmanager
def prepare(train_dir: str, fresh: bool, chief: bool = True):
    """Create RUN and hold RUN/.lock (the chief) while the block trains; with `fresh`, the chief
    first moves an old RUN aside (never deletes it). A second process on the same RUN stops with
    one line, before --fresh can move the first one's run away under it: two runs sharing a
    folder resume from each other's checkpoints and overwrite each other's best/."""
    if fresh and chief and os.path.isdir(train_dir):  # without --fresh, the lock below is the check
        probe = _lock(train_dir)
        if probe is not None:
            probe.close()
    _create(train_dir, fresh, chief)
    held = _lock(train_dir) if chief else None
    try:
        yield
    finally:
        if held is not None:
            held.close()  # closing the file releases the lock (so does the process's end, even kill -9)


def _lock(train_dir: str):
    """RUN/.lock, opened and locked by this process; UserError naming the holder if it is taken."""
    try:
        f = open(os.path.join(train_dir, LOCK), "a+", encoding="utf-8")
    except OSError:
        return None  # an unwritable RUN: _create says so
    locked = file_lock.try_lock(f.fileno())
    if locked is False:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunInUse(train_dir, holder) from None
    if locked is None:  # a file system without locks (some network mounts): unguarded, as before
        return f
    f.seek(0)
    f.truncate()
    f.write(f"hw2 (pid {os.getpid()} on {socket.gethostname()}, since "
            f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S})\n")
    f.flush()
    return f


def _create(train_dir: str, fresh: bool, chief: bool) -> None:
    if fresh and chief and os.path.isdir(train_dir) and set(os.listdir(train_dir)) - {LOCK}:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        old = f"{train_dir.rstrip('/')}-old-{stamp}"
        os.rename(train_dir, old)
        logging.info("--fresh: moved the previous run to %s", old)
    writable_folder(train_dir, f"train_dir {train_dir}")


def writable_folder(path: str, name: str) -> None:
    """Create `path` if need be and check it can be written, before any long work: `name` says
    what it is in the user's words ("train_dir RUN")."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {name}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{name} is not writable")


def prepare_split(train_dir: str, cfg, data_dir: str | None = None, split_file: str | None = None,
                  folds: int = 0, fold: int = 0, scan=None) -> dict:
    """The run's split: RUN/split.json when resuming, else a copy of `split_file`, else a new
    split of `data_dir` (its skipped files and train/val duplicates listed in RUN/bad_images.txt).
    `scan` reuses a scan of data_dir already made (hw2_experiment scans once for all its runs)."""
    import hw2_dataset
    run_split = os.path.join(train_dir, SPLIT)
    if os.path.isfile(run_split):
        split = hw2_dataset.load_split(run_split, check_files=False)
        if data_dir and os.path.realpath(data_dir) != os.path.realpath(split["data_dir"]):
            if os.path.isdir(split["data_dir"]):  # both folders exist: another dataset
                raise UserError(f"{train_dir} was trained on {split['data_dir']}, not {data_dir}: "
                                "use --fresh or a new --train_dir")
            split = _moved(split, data_dir, run_split)
        if not os.path.isdir(split["data_dir"]):
            hw2_dataset.check_split_files(split, run_split)  # says the folder is gone
        split = _without_gone_files(split, run_split, train_dir)
        if data_dir:
            _note_new_files(split, data_dir)
    elif split_file:
        split = hw2_dataset.load_split(split_file)
        save_json(run_split, split)  # RUN keeps its own copy: eval and resume need no flags
    else:
        if not data_dir and scan is None:
            raise UserError("--data_dir is required for a new run")
        scan = scan or hw2_dataset.scan_dataset(data_dir)
        if len(scan.class_names) < 2:  # before split.json is written, so adding a class fixes it
            only = scan.class_names[0]
            raise UserError(f"{scan.data_dir} has one class folder ({only}): a classifier needs at least 2, one "
                            f"per class{hw2_dataset.subfolders_hint(os.path.join(scan.data_dir, only))}")
        lookalike = hw2_dataset.lookalike_note(scan.class_names)
        if lookalike:
            logging.warning(lookalike)
        train, val = hw2_dataset.make_split(scan.items, cfg.val_fraction, cfg.seed, folds, fold)
        report_bad_images(scan, train, val, train_dir, cfg.on_bad_image)
        hw2_dataset.write_split(run_split, scan, train, val, cfg.seed, cfg.val_fraction, folds, fold)
        split = hw2_dataset.load_split(run_split, check_files=False)  # the scan just read every file
    if not split["val"]:
        raise UserError("the split has no validation images: every class needs at least 2 images")
    return split


def _moved(split: dict, data_dir: str, run_split: str) -> dict:
    """The split's folder is gone and `data_dir` was given: the data moved (another disk, another
    machine). Where every train/val file is there too, the run goes on and split.json records the
    new place; hw2_eval then finds the val images without flags."""
    import hw2_dataset
    moved = {**split, "data_dir": os.path.abspath(data_dir)}
    try:
        hw2_dataset.check_split_files(moved, run_split)
    except UserError as e:
        raise UserError(f"{split['data_dir']} (this run's data) is gone, and {data_dir} is not it: {e}") from None
    with open(run_split, encoding="utf-8") as f:
        text = f.read()
    doc = json.loads(text)
    field = f'"data_dir": {json.dumps(doc["data_dir"])}'
    if text.count(field) == 1:  # only that line changes: the file stays one entry per line
        atomic_write_text(run_split, text.replace(field, f'"data_dir": {json.dumps(moved["data_dir"])}'))
    else:
        save_json(run_split, {**doc, "data_dir": moved["data_dir"]})
    logging.info("data moved: %s -> %s (all %d train/val files are there); split.json now says so",
                 split["data_dir"], moved["data_dir"], len(split["train"]) + len(split["val"]))
    return moved


# A resumed run goes on without images deleted from its folder since it began (junk found in the
# error gallery, say) up to this share of its split; more is more likely the wrong folder or a
# half-copied one, and stops.
GONE_SHARE = 0.05


def too_many_gone(gone: int, total: int) -> bool:
    """Whether `gone` of `total` split images missing is past what a run or its evaluation goes on without."""
    return gone > max(1, GONE_SHARE * total)


def _without_gone_files(split: dict, run_split: str, train_dir: str) -> dict:
    """The split less the train/val files gone from its folder since the run began, written back
    to split.json (and listed in bad_images.txt) so that evaluation finds the same set; a
    UserError where too many are gone or a class would lose all its train or val images."""
    import hw2_dataset
    gone = hw2_dataset.missing_files(split)
    if not gone:
        return split
    lost = set(gone)
    train = [item for item in split["train"] if item[0] not in lost]
    val = [item for item in split["val"] if item[0] not in lost]
    in_train, in_val = {label for _, label in train}, {label for _, label in val}
    emptied = [name for i, name in enumerate(split["class_names"]) if i not in in_train or i not in in_val]
    total = len(split["train"]) + len(split["val"])
    example = f"{utils.count(len(gone), 'image')} of this run's {total} train/val images " \
              f"{'is' if len(gone) == 1 else 'are'} gone from {split['data_dir']} (e.g. {gone[0]})"
    if too_many_gone(len(gone), total) or emptied:
        why = f"class(es) {', '.join(emptied)} would have no train or val image left" if emptied else \
            f"more than {GONE_SHARE:.0%} (the wrong folder?)"
        raise UserError(f"{example}; {why}: --fresh starts a new run on the folder as it is now")
    split = {**split, "train": train, "val": val, "bad": [*split["bad"], *((rel, "gone since the run began")
                                                                          for rel in gone)]}
    hw2_dataset.save_split(run_split, split)
    bad_path = os.path.join(train_dir, BAD_IMAGES)
    with open(bad_path, "a", encoding="utf-8") as f:
        f.writelines(f"{rel}\tgone since the run began\n" for rel in gone)
    logging.warning("%s since it began: it goes on without %s (split.json and %s updated)", example,
                    "it" if len(gone) == 1 else "them", bad_path)
    return split


def _note_new_files(split: dict, data_dir: str) -> None:
    """A resumed run trains on its split as written; images or classes added to data_dir since
    would otherwise be ignored without a word (listing the folder costs no decoding)."""
    import hw2_dataset
    try:
        scan = hw2_dataset.scan_dataset(data_dir, check_images=False)
    except UserError:
        return  # a folder that no longer scans: the split's own file checks speak for it
    known = {p for p, _ in split["train"]} | {p for p, _ in split["val"]} | {p for p, *_ in split["bad"]}
    new = sorted(p for p, _ in scan.items if p not in known)
    classes = sorted(set(scan.class_names) - set(split["class_names"]))
    if new:
        added = utils.count(len(new), "image") + (f" and class(es) {', '.join(classes)}" if classes else "")
        logging.warning("%s has %s not in this run's split (e.g. %s), added since the run began: it goes on "
                        "with its split; --fresh starts a new run with them", data_dir, added, new[0])


def report_bad_images(scan, train, val, train_dir: str, on_bad_image: str) -> None:
    """Skipped files, train/val duplicates and files in two classes go to RUN/bad_images.txt;
    `fail` stops instead."""
    import hw2_dataset
    lines = [f"{path}\t{why}" for path, why in scan.bad]
    val_paths, train_paths = {p for p, _ in val}, {p for p, _ in train}
    label = dict(scan.items)
    for group in hw2_dataset.find_duplicates(scan):
        classes = sorted({scan.class_names[label[p]] for p in group})
        where = []
        if len(classes) > 1:  # the same photo under two labels: one of them is wrong, wherever it lands
            where.append(f"in classes {' and '.join(classes)}: one label is wrong")
        if any(p in val_paths for p in group) and any(p in train_paths for p in group):
            where.append("in both train and val")
        if where:
            lines.append(f"{group[0]}\tsame content as {', '.join(group[1:])} ({'; '.join(where)})")
    if not lines:
        return
    bad_path = os.path.join(train_dir, BAD_IMAGES)
    atomic_write_text(bad_path, "\n".join(lines) + "\n")
    example = lines[0].replace("\t", ": ")
    if on_bad_image == "fail":
        raise UserError(f"{len(lines)} unusable or duplicate files, e.g. {example} "
                        f"(all in {bad_path}; --on_bad_image skip to train without them)")
    logging.warning("%d files skipped, or duplicated across train/val or classes (listed in %s), e.g. %s",
                    len(lines), bad_path, example)


def trained_precision(run: str) -> str | None:
    """The precision the run's newest start trained in (run.json), None if it does not say."""
    path = os.path.join(run, RUN_RECORD)
    try:
        return load_json(path, "run record").get("precision") if os.path.isfile(path) else None
    except UserError:
        return None


# image_size 0: the images' median short side, within these bounds (upscaling adds no detail and
# costs time; above the top, a 5-10 minute run on 2 CPU cores gets too few epochs: hymenoptera
# photos reached test top-1 0.67 at 64 px against 0.61 at 100 px, bench/README.md).
# batch_size 0: about 16 steps per epoch, within these bounds (a small folder still gets many
# updates per epoch).
AUTO_IMAGE_SIZE, AUTO_BATCH_SIZE = (24, 64), (16, 128)
# augment auto: strong (config_keys.STRONG_AUGMENT) below this many training images. A time budget
# buys a small folder hundreds of epochs, and at the base scale and no rotation the network
# memorizes it: on 196 hymenoptera photos train top-1 reached 1.00 by epoch ~300 of 625 while val
# top-1 stayed at 0.82 (bench/README.md). On CIFAR-10 (6,400 training images) rotation cost 5.5
# points: big folders keep base. CIFAR folders of 496 and 2,000 images gained nothing from strong
# either (-1.3, -0.7 points): small 32 px objects do not want it, photos do; a small folder gets it.
AUTO_STRONG_BELOW = 1000


def resolve_auto(cfg, split: dict, train_dir: str | None = None):
    """cfg with its auto values resolved from the data (logged): what config.json records is the
    value the run trained with."""
    out = _resolve_sizes(cfg, split, train_dir)
    import config_keys
    if cfg.augment == "auto":
        n = len(split["train"])
        out["augment"] = "strong" if n < AUTO_STRONG_BELOW else "base"
        logging.info("augment auto: %s (%d training images, strong below %d)", out.augment, n, AUTO_STRONG_BELOW)
    if out.augment == "strong":
        out.update({k: max(out[k], v) for k, v in config_keys.STRONG_AUGMENT.items()})
        logging.info("augment strong: %s", ", ".join(f"{k} {out[k]:g}" for k in config_keys.STRONG_AUGMENT))
    return out


def auto_batch_size(n_train: int) -> int:
    """batch_size 0's choice for n_train training images: about 16 steps per epoch, in bounds."""
    lo, hi = AUTO_BATCH_SIZE
    return max(lo, min(hi, 2 ** max(0, math.floor(math.log2(max(1, n_train // 16))))))


def _resolve_sizes(cfg, split: dict, train_dir: str | None):
    """image_size 0 and batch_size 0 resolved from the data, or from config.json on a resume."""
    auto = [k for k in ("image_size", "batch_size") if cfg[k] == 0]
    n_train = len(split["train"])
    if cfg.batch_size > n_train:  # a batch from another dataset's config, or a typo: one step an epoch
        logging.warning("batch_size %d is more than the %d training images: every step repeats images, an "
                        "epoch is one step (--batch_size 0 picks %d for this folder)", cfg.batch_size, n_train,
                        auto_batch_size(n_train))
    if not auto:
        return utils.Config(cfg)
    if train_dir and os.path.isfile(os.path.join(train_dir, CONFIG)):
        saved, _ = read_config(train_dir)
        return utils.Config({**cfg, **{k: saved[k] for k in auto}})
    import hw2_dataset
    out = utils.Config(cfg)
    if cfg.image_size == 0:
        side = hw2_dataset.median_short_side(split["data_dir"], split["train"], seed=cfg.seed)
        lo, hi = AUTO_IMAGE_SIZE
        out["image_size"] = max(lo, min(hi, side // 8 * 8))
        logging.info("image_size auto: %d (the images' median short side is %d px)", out.image_size, side)
    if cfg.batch_size == 0:
        out["batch_size"] = auto_batch_size(n_train)
        logging.info("batch_size auto: %d (%d training images)", out.batch_size, n_train)
    return out


def check_top_k(k: int, num_classes: int, flag: str = "--top_k") -> None:
    if not 1 <= k <= num_classes:
        raise UserError(f"{flag} {k} must be between 1 and the number of classes ({num_classes})")


# ---------------------------------------------------------------------------- checkpoints

def pick_checkpoint(checkpoint_dir: str, checkpoint: str | None = None, prefer_best: bool = False) -> str:
    """--checkpoint, else (with prefer_best) RUN/best's, else the newest in checkpoint_dir."""
    import tensorflow as tf
    run = find(checkpoint_dir)
    path = checkpoint or (prefer_best and tf.train.latest_checkpoint(os.path.join(run, BEST))) \
        or tf.train.latest_checkpoint(checkpoint_dir)
    if not path:
        raise UserError(f"no checkpoint in {checkpoint_dir} (train first, or pass RUN/best)")
    if not tf.io.gfile.glob(path + ".index"):
        raise UserError(f"checkpoint not found: {path}")
    return path


def readable_checkpoint(path: str) -> str:
    """`path` if it reads, else the newest older checkpoint that does (with a warning)."""
    import tensorflow as tf
    directory = os.path.dirname(path)
    state = tf.train.get_checkpoint_state(directory)
    older = [p for p in reversed(list(state.all_model_checkpoint_paths if state else [])) if p != path]
    for p in [path] + older:
        try:
            tf.train.load_checkpoint(p).get_variable_to_shape_map()
        except (tf.errors.OpError, ValueError):
            continue
        if p != path:
            logging.warning("checkpoint %s is unreadable: falling back to %s", path, p)
        return p
    raise UserError(f"no readable checkpoint in {directory} (newest: {path}): use --fresh to start over")


def checkpoint_step(path: str) -> int:
    """The training step a checkpoint was written at (-1 if it does not say)."""
    import tensorflow as tf
    reader = tf.train.load_checkpoint(path)
    key = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"
    return int(reader.get_tensor(key)) if reader.has_tensor(key) else -1


class RunModel:
    """A run's network, rebuilt from config.json, into which any of its checkpoints restores.

    `restore(path, averaged=True)` leaves the moving-average weights (or the raw ones) in
    `model`, each time from the checkpoint itself, so a sequence of restores never mixes them.
    """

    def __init__(self, run: str, precision_name: str | None = None):
        import hw2
        import precision
        self.cfg, self.class_names = read_config(run)
        # The run's precision on this machine by default, so a checkpoint scores what training measured.
        self.precision = precision_name or precision.for_this_machine(
            self.cfg.precision, timed=utils.timings_may_choose(self.cfg))[0]
        with precision.policy(self.precision):
            self.model = hw2.create_model(self.cfg, len(self.class_names))
        self.ema = hw2.EMA(self.model, self.cfg.ema_decay)

    def restore(self, path: str, averaged: bool = True) -> int:
        """Load `path`; returns its step."""
        import tensorflow as tf

        import hw2
        # Checkpoints of hw2 0.1.0 have no averaged batch-norm statistics: the model's own apply.
        stats = tf.train.load_checkpoint(path).has_tensor("ema_stats/0/.ATTRIBUTES/VARIABLE_VALUE")
        parts = {"model": hw2.variables_by_path(self.model), "ema": self.ema.shadow,
                 **({"ema_stats": self.ema.stats_shadow} if stats else {})}
        try:
            tf.train.Checkpoint(**parts).restore(path).expect_partial().assert_existing_objects_matched()
        except (ValueError, AssertionError, tf.errors.OpError) as e:
            first = str(e).strip().splitlines()[0][:200]
            raise UserError(f"checkpoint {path} does not match the network in {CONFIG}: {first}") from None
        if averaged:
            self.ema.copy_to_model(stats=stats)
        return checkpoint_step(path)
