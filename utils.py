"""Config, errors and small helpers shared by every hw2 script.

Kept free of TensorFlow so that `hw2_dataset.py` and `--help` stay fast.
"""
from __future__ import annotations

import configparser
import json
import logging
import os
import re
import sys
import tempfile
from typing import Any, Callable, Sequence

# TensorFlow prints pages of C++ start-up noise; users need our lines, not those.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))


def _default_config() -> str:
    """config.cfg beside this file (a checkout, or `pip install -e .`), else where `pip install .`
    puts it (pyproject's data-files: PREFIX/share/hw2)."""
    beside = os.path.join(HERE, "config.cfg")
    installed = os.path.join(sys.prefix, "share", "hw2", "config.cfg")
    return beside if os.path.exists(beside) or not os.path.exists(installed) else installed


DEFAULT_CONFIG = _default_config()


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing folder, ...): printed as one line, no traceback."""


# ---------------------------------------------------------------- config

class Config(dict):
    """The resolved config: a dict whose keys also read as attributes (cfg.batch_size)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


# Values that would make a run meaningless; checked once so every script fails the same way.
POSITIVE = {"image_size", "batch_size", "eval_batch_size", "max_steps", "save_checkpoint_steps",
            "keep_checkpoints", "lr_patience", "stop_patience", "log_every_steps", "top_k",
            "dense_units", "conv2", "inception2_bottleneck", "inception3_bottleneck",
            "learning_rate", "eval_timeout_secs", "width", "fc_units", "lr_step_epochs"}
NON_NEGATIVE = {"brightness", "contrast", "rotate_deg", "shift_frac", "noise_std", "weight_decay",
                "min_delta", "momentum", "cache_images_mb", "seed", "nan_retries",
                "summary_every_steps", "max_epochs"}
UNIT_INTERVAL = {"keep_prob_1", "keep_prob_2", "keep_prob_dense", "lr_factor", "ema_decay",
                 "val_fraction", "lr_gamma"}
# Probabilities and rates where 1 would leave nothing (every input dropped, every label uniform).
HALF_OPEN_UNIT = {"dropout", "label_smoothing"}
PROBABILITY = {"flip_ud"}
CHOICES = {"optimizer": ("adam", "sgd"), "conv_impl": ("im2col", "native"),
           "lr_scaling": ("none", "linear", "sqrt"), "on_bad_image": ("skip", "fail"),
           "model": ("hw2_inception", "cifar10_tutorial", "simple_cnn", "resnet14", "resnet18", "resnet34",
                     "vgg10", "vgg12", "vgg15", "vgg18"),
           "norm": ("batch", "instance", "none"), "stem": ("7x7", "3x3"), "channels": (1, 3),
           "lr_schedule": ("plateau", "step", "exponential", "cosine", "constant"),
           "inception_version": (1, 2), "precision": ("auto", "fp32", "bf16", "fp16"),
           "class_balance": ("none", "weights", "sampler")}


def _infer(text: str) -> Any:
    """Type of a [default] value decides the type every override must have."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if re.fullmatch(r"[+-]?\d+", t):
        return int(t)
    if re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?", t):
        return float(t)
    if re.fullmatch(r"\d+(\s*,\s*\d+)+", t):
        return tuple(int(p) for p in t.split(","))
    return t


def _coerce(key: str, text: Any, like: Any, where: str) -> Any:
    """Parse `text` as the type of `like`; one clear line on mismatch."""
    if not isinstance(text, str):
        text = str(text)
    t = text.strip()
    try:
        if isinstance(like, bool):
            if t.lower() in ("true", "1", "yes"):
                return True
            if t.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(like, int):
            return int(t)
        if isinstance(like, float):
            return float(t)
        if isinstance(like, tuple):
            return tuple(int(p) for p in t.split(","))
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number",
                tuple: "a comma-separated list of integers"}[type(like)]
        raise UserError(f"{where}: '{key}' must be {kind}, got '{text}'") from None
    return t


def _check_ranges(cfg: Config) -> None:
    for key, value in cfg.items():
        if key in POSITIVE and not value > 0:
            raise UserError(f"'{key}' must be > 0, got {value}")
        if key in NON_NEGATIVE and value < 0:
            raise UserError(f"'{key}' must be >= 0, got {value}")
        if key in UNIT_INTERVAL and not 0 < value <= 1:
            raise UserError(f"'{key}' must be in (0, 1], got {value}")
        if key in HALF_OPEN_UNIT and not 0 <= value < 1:
            raise UserError(f"'{key}' must be in [0, 1), got {value}")
        if key in PROBABILITY and not 0 <= value <= 1:
            raise UserError(f"'{key}' must be in [0, 1], got {value}")
        if key in CHOICES and value not in CHOICES[key]:
            options = "|".join(str(c) for c in CHOICES[key])
            raise UserError(f"'{key}' must be one of {options}, got '{value}'")
        if isinstance(value, tuple) and any(v <= 0 for v in value):
            raise UserError(f"'{key}' must list positive integers, got {value}")
    if cfg.get("scale_min", 1) > cfg.get("scale_max", 1):
        raise UserError(f"scale_min ({cfg.scale_min}) must be <= scale_max ({cfg.scale_max})")
    if cfg.get("scale_min", 1) < 1:
        raise UserError(f"scale_min must be >= 1 (crops never upsample past the image), got {cfg.scale_min}")
    for key in ("inception2", "inception3"):
        if key in cfg and len(cfg[key]) != 4:
            raise UserError(f"'{key}' must list 4 tower widths (1x1, 3x3, 5x5, pool), got {cfg[key]}")


def load_config(section: str = "default", overrides: dict[str, str] | None = None,
                path: str = DEFAULT_CONFIG) -> Config:
    """[default], then [section], then command-line overrides; unknown keys and bad types stop the run."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    parser = configparser.ConfigParser(default_section="__none__", inline_comment_prefixes=("#", ";"))
    try:
        parser.read(path)
    except configparser.Error as e:
        raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if "default" not in parser:
        raise UserError(f"{path} has no [default] section")
    if section not in parser:
        known = ", ".join(s for s in parser.sections())
        raise UserError(f"unknown section '{section}' in {path} (known: {known})")
    cfg = Config((k, _infer(v)) for k, v in parser["default"].items())
    layers = [(f"[{section}] in {os.path.basename(path)}", dict(parser[section]))] if section != "default" else []
    layers.append(("command line", overrides or {}))
    for where, values in layers:
        for key, text in values.items():
            if key not in cfg:
                raise UserError(f"{where}: unknown config key '{key}' (see [default] in {os.path.basename(path)})")
            cfg[key] = _coerce(key, text, cfg[key], where)
    cfg["section"] = section
    _check_ranges(cfg)
    return cfg


def parse_overrides(args: Sequence[str]) -> dict[str, str]:
    """`--key value` / `--key=value` pairs left over by argparse become config overrides."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise UserError(f"unexpected argument '{arg}' (flags look like --key value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
                raise UserError(f"flag --{key} needs a value")
            value = args[i + 1]
            i += 1
        out[key.replace("-", "_")] = value
        i += 1
    return out


def save_json(path: str, obj: Any) -> None:
    """Write then rename, so a kill mid-write never leaves a half file where a good one was."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=list)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None


def config_from_json(obj: dict) -> Config:
    """A config saved in a run directory, with lists turned back into tuples."""
    return Config((k, tuple(v) if isinstance(v, list) else v) for k, v in obj.items())


# ---------------------------------------------------------------- command-line glue

def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    # absl (pulled in by TensorFlow) otherwise duplicates warnings.
    logging.getLogger("absl").setLevel(logging.ERROR)
    # tf.distribute logs every all-reduce plan at INFO.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)


# TensorFlow's C++ start-up banner: printed before its logging is set up, so TF_CPP_MIN_LOG_LEVEL
# cannot silence it, and it buries our first lines.
_TF_BANNER = ("All log messages before absl::InitializeLog", "] oneDNN custom operations are on",
              "cpu_feature_guard.cc", "To enable the following instructions:")


def quiet_tensorflow_import() -> None:
    """Import TensorFlow with its start-up banner filtered out; any other line it prints passes."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if line.strip() and not any(b in line for b in _TF_BANNER):
                    print(line, file=sys.stderr)


def run_cli(main: Callable[[list[str]], int], argv: list[str] | None = None, tensorflow: bool = True) -> int:
    """Run a script's main: a UserError becomes one `error:` line and exit 2 (traceback with --debug)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if tensorflow and not {"-h", "--help"} & set(argv):
        quiet_tensorflow_import()
    try:
        return main(argv) or 0
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cpu_line() -> str:
    """CPU model and the instruction-set flags that decide our speed (printed by every bench)."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    # oneDNN (TensorFlow's CPU matmuls and convolutions) runs no wider kernels than this cap, so a
    # capped run measures an AVX2-only laptop on an AVX-512 machine.
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"{model} ({os.cpu_count()} cores; {' '.join(wanted) or 'no avx2'}"
            f"{f'; ONEDNN_MAX_CPU_ISA={cap}' if cap else ''})")
