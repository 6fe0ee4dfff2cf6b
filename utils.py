"""Small helpers shared by every hw2 module: loading the config (config.cfg + flags, checked
against config_keys), the one-line user errors, logging, the command-line wrapper, the CPU line.

Kept free of TensorFlow at import time so that `hw2_dataset.py` and `--help` stay fast.
"""
from __future__ import annotations

import atexit
import configparser
import contextlib
import difflib
import logging
import os
import platform
import re
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import config_keys

# TensorFlow prints pages of C++ start-up noise; users need our lines, not those.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's default CPU allocator is malloc, and glibc maps every block over 32 MiB afresh: each
# step's big tensors (im2col's patch matrices most of all) are new pages, zero-filled by a page
# fault every 4 KiB on first touch. In a VM a fault costs ~3.5 us: on a 2-core AMD EPYC (Zen 3)
# the seed step at batch 128 (11.3 s on its 2 cores) spent 8 of its 21 CPU-seconds in the kernel.
# TensorFlow's BFC allocator keeps its memory and reuses it: 11.2-11.4 -> 6.2-6.8 s a step
# (oneDNN's convolutions 7.0 -> 5.4-5.9; bench/README.md, AMD EPYC Zen 3).
# Read at the first allocation, so it holds wherever utils is imported before TensorFlow runs an
# op. TF_CPU_ALLOCATOR_USE_BFC=false restores malloc, except where TensorFlow turns its oneDNN ops
# on by default (CPUs with AVX-512 VNNI/bf16 or AVX-VNNI; not the Zen 3): there oneDNN's own
# allocator, a pool as well, serves CPU tensors whatever this variable says.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

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


def _coerce(key: str, value: Any, where: str) -> Any:
    """`value` (text from config.cfg or a flag, or a JSON value) as the declared type of `key`."""
    kind = config_keys.KEYS[key].type
    text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
    t = text.strip()
    try:
        if kind is bool:
            if t.lower() in ("true", "1", "yes"):
                return True
            if t.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
            return int(t)
        if kind is float:
            return float(t)
        if kind is config_keys.IntList:
            return tuple(int(p) for p in t.strip("[]()").split(","))
    except ValueError:
        what = {bool: "true or false", int: "an integer", float: "a number",
                config_keys.IntList: "a comma-separated list of integers"}[kind]
        raise UserError(f"{where}: '{key}' must be {what}, got '{text}'") from None
    return t


_CHECKS = {">0": (lambda v: v > 0, "> 0"), ">=0": (lambda v: v >= 0, ">= 0"), ">=1": (lambda v: v >= 1, ">= 1"),
           "(0,1]": (lambda v: 0 < v <= 1, "in (0, 1]"), "(0,1)": (lambda v: 0 < v < 1, "in (0, 1)"),
           "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"), "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]")}


MIN_IMAGE_SIZE = 8  # as the scan's smallest usable image


def _check(cfg: Config) -> None:
    """Each value against its declaration, then the rules that tie keys together."""
    for name, key in config_keys.KEYS.items():
        value = cfg[name]
        if key.check:
            ok, text = _CHECKS[key.check]
            if not ok(value):
                raise UserError(f"'{name}' must be {text}, got {value}")
        choices = config_keys.choices_of(key)
        if choices is not None and value not in choices:
            raise UserError(f"'{name}' must be one of {'|'.join(str(c) for c in choices)}, got '{value}'")
        if key.type is config_keys.IntList and (not value or any(v <= 0 for v in value)):
            raise UserError(f"'{name}' must list positive integers, got {','.join(map(str, value))}")
    if 0 < cfg.image_size < MIN_IMAGE_SIZE:  # a typo (3 for 32) would train for hours on noise
        raise UserError(f"'image_size' must be 0 (from the images) or at least {MIN_IMAGE_SIZE}, got {cfg.image_size}")
    if cfg.scale_min > cfg.scale_max:
        raise UserError(f"scale_min ({cfg.scale_min}) must be <= scale_max ({cfg.scale_max})")
    for name in ("inception2", "inception3"):
        if len(cfg[name]) != 4:
            raise UserError(f"'{name}' must list 4 tower widths (1x1, 3x3, 5x5, pool), got {cfg[name]}")


def load_config(section: str = "default", overrides: dict[str, str] | None = None,
                path: str = DEFAULT_CONFIG) -> Config:
    """Declared defaults, then config.cfg's [default], then [section], then command-line overrides;
    an unknown key, a wrong type or a value out of range stops the run with one line naming it."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    parser = configparser.ConfigParser(default_section="__none__", inline_comment_prefixes=("#", ";"))
    try:
        parser.read(path)
    except configparser.Error as e:
        raise UserError(f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if section not in parser and section != "default":
        known = ", ".join(s for s in parser.sections())
        raise UserError(f"unknown section '{section}' in {path} (known: {known})")
    cfg = Config((name, key.default) for name, key in config_keys.KEYS.items())
    name = os.path.basename(path)
    layers = [(f"[default] in {name}", dict(parser["default"]) if "default" in parser else {})]
    if section != "default":
        layers.append((f"[{section}] in {name}", dict(parser[section])))
    layers.append(("command line", overrides or {}))
    for where, values in layers:
        _apply(cfg, values, where)
    # A scale or rotation the user chose (a section or a flag, an ablation grid's cell) is kept.
    chosen = {k for _, values in layers[1:] for k in values}
    if cfg.augment == "auto" and chosen & config_keys.STRONG_AUGMENT.keys():
        cfg["augment"] = "base"
    _check(cfg)
    cfg["section"] = section
    return cfg


def _apply(cfg: Config, values: dict, where: str) -> None:
    for key, value in values.items():
        if key not in config_keys.KEYS:
            close = difflib.get_close_matches(key, [*config_keys.KEYS, *SCRIPT_FLAGS], n=1, cutoff=0.75)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"{where}: unknown config key '{key}' ({hint}see [default] in config.cfg)")
        cfg[key] = _coerce(key, value, where)


# The scripts' own flags, not config keys: a typo of one lands among the overrides, and the hint
# for it should name the flag.
SCRIPT_FLAGS = ("data_dir", "train_dir", "checkpoint_dir", "test_data_path", "export_dir", "images",
                "section", "config", "split", "fresh")


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


def config_from_json(obj: dict, where: str = "config.json") -> Config:
    """A config saved in a run directory: declared types back, and the declared default for a key
    that an older hw2 did not have yet."""
    cfg = Config((name, key.default) for name, key in config_keys.KEYS.items())
    _apply(cfg, {k: v for k, v in obj.items() if k != "section"}, where)
    cfg["section"] = obj.get("section", "default")
    return cfg


# ---------------------------------------------------------------- command-line glue

@contextlib.contextmanager
def quieted(logger_name: str):
    """Logger `logger_name` at ERROR for the block: a library's warning that says nothing to a user."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    # absl (pulled in by TensorFlow) otherwise duplicates warnings.
    logging.getLogger("absl").setLevel(logging.ERROR)
    # tf.distribute logs every all-reduce plan at INFO; TensorFlow's notes that one of its own
    # internals is deprecated are for its developers, not for users.
    tf_logger = logging.getLogger("tensorflow")
    tf_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _NoDeprecationNotes) for f in tf_logger.filters):
        tf_logger.addFilter(_NoDeprecationNotes())


class _NoDeprecationNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "is deprecated and will be removed" not in record.getMessage()


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


def count(n: int, noun: str) -> str:
    """n and the noun, plural unless n is 1: 1 image, 2 images, 3 classes."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("s") else f"{n} {noun}s"


def shell_join(argv: Sequence[str], windows: bool = os.name == "nt") -> str:
    """A command line to paste, quoted for the shell it will be pasted into: cmd and PowerShell take
    double quotes, not POSIX single ones."""
    import shlex
    import subprocess
    return subprocess.list2cmdline(argv) if windows else shlex.join(argv)


def run_cli(main: Callable[[list[str]], int], argv: list[str] | None = None, tensorflow: bool = True) -> int:
    """Run a script's main: a UserError becomes one `error:` line and exit 2, an OSError (a file the
    OS refused) one line and exit 1 (tracebacks with --debug)."""
    argv = underscored(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):
        # Class and file names in any script, printed where the encoding cannot show them (on
        # Windows, output redirected to a file is cp1252): escaped, where they raised and ended the run.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
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
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a file the OS refused: a full disk, a read-only folder, on Windows a CSV open in Excel
        if debug:
            raise
        path = e.filename2 or e.filename  # a rename's target is the file the user knows
        where = f"{path}: " if path else ""
        print(f"error: {where}{e.strerror or e} (--debug shows where)", file=sys.stderr)
        return 1


def exit_now(code: int) -> None:
    """End a script's process with `code` once its work is written, without the interpreter's
    teardown: Python's exit handlers run (logging's flush, temporary files), then os._exit.

    TensorFlow's teardown (every tensor, traced function and thread pool of the run freed one by
    one, in C++ after Python's last line) took 1.1-1.6 s after a 4-step tiny run, and presumably
    the 27-44 s that some 10-minute photo runs took after their last line (bench/README.md): time
    a --time_budget user waits past the budget with every file already saved. Only for a
    command's own end: never from a library function or a test's in-process call, and not for
    several workers (their shutdown meets).
    """
    atexit._run_exitfuncs()  # what a normal exit runs first; os._exit would skip them
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing left to save
            stream.flush()
    os._exit(code)


# time.monotonic() when this process started, once it runs as a command (console, command_start):
# a --time_budget counts the Python and TensorFlow imports too, what the user waits through.
COMMAND_STARTED: float | None = None


def process_age(proc: str = "/proc") -> float:
    """Seconds since this process started: from /proc on Linux, the kernel's process times on
    Windows, `ps` on macOS; 0.0 where none answers."""
    try:
        with open(os.path.join(proc, "self", "stat")) as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open(os.path.join(proc, "uptime")) as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return _windows_process_age() if sys.platform == "win32" else _ps_elapsed(os.getpid())
    except Exception:  # an answer we cannot read: the budget counts from hw2's first line instead
        return 0.0


def _ps_elapsed(pid: int) -> float:
    """How long `pid` has run, from `ps` (macOS has no /proc)."""
    import subprocess
    return etime_seconds(subprocess.run(["ps", "-o", "etime=", "-p", str(pid)], capture_output=True, text=True,
                                        timeout=5).stdout)


def etime_seconds(etime: str) -> float:
    """`ps -o etime`'s [[days-]hours:]minutes:seconds in seconds."""
    days, _, clock = etime.strip().rpartition("-")
    seconds = 0.0
    for part in clock.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds + 86400 * int(days or 0)


def _windows_process_age() -> float:
    import ctypes
    from ctypes import wintypes
    kernel32 = ctypes.WinDLL("kernel32")
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE
    kernel32.GetProcessTimes.argtypes = [wintypes.HANDLE] + [ctypes.POINTER(wintypes.FILETIME)] * 4
    created, exited, in_kernel, in_user, now = (wintypes.FILETIME() for _ in range(5))
    if not kernel32.GetProcessTimes(kernel32.GetCurrentProcess(), *map(ctypes.byref, (created, exited, in_kernel, in_user))):
        return 0.0
    kernel32.GetSystemTimeAsFileTime(ctypes.byref(now))

    def ticks(t):  # 100 ns units
        return t.dwHighDateTime << 32 | t.dwLowDateTime
    return max(0.0, (ticks(now) - ticks(created)) / 1e7)


def command_start() -> None:
    """Mark this process as a command: its --time_budget counts from the process's start."""
    global COMMAND_STARTED
    COMMAND_STARTED = time.monotonic() - process_age()


def console(main: Callable[[], int]) -> Callable[[], None]:
    """A command's entry point (`python hw2_x.py`, the installed `hw2-x`): main(), then exit_now;
    one of several workers (TF_CONFIG set, by the user or by --worker_hosts during main) keeps the
    normal exit, where the workers' shutdown meets."""
    def command() -> None:
        command_start()
        code = main()
        if "TF_CONFIG" in os.environ:
            sys.exit(code)
        exit_now(code)
    return command


def underscored(argv: Sequence[str]) -> list[str]:
    """--data-dir=x -> --data_dir=x: every flag and config key is spelled with underscores, and
    argparse would take --data-dir for an unknown config key."""
    def one(arg: str) -> str:
        m = re.match(r"--[A-Za-z][A-Za-z0-9_-]*", arg)
        return "--" + m.group(0)[2:].replace("-", "_") + arg[m.end():] if m else arg
    return [one(a) for a in argv]


def progress(iterable, total: int, unit: str, what: str, at_least: int = 1000):
    """`iterable`, with a tqdm bar on a terminal and a log line first when it is long: checking
    or decoding 10,000 phone photos takes a minute or two on 2 cores, which would pass in silence."""
    if total < at_least:
        return iterable
    logging.info("%s: %d %s ...", what, total, unit)
    if not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, total=total, unit=unit, dynamic_ncols=True, leave=False)


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display on training machines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def timings_may_choose(cfg) -> bool:
    """False under --deterministic and in the tests (HW2_CONV_AUTOTUNE=0): there the convolution
    forms and the precision are fixed, not timed on this machine."""
    return not cfg["deterministic"] and os.environ.get("HW2_CONV_AUTOTUNE", "1") != "0"


def user_cache_dir() -> str:
    """hw2's folder in the user's cache ($XDG_CACHE_HOME or ~/.cache): autotune timings, decoded images."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "hw2")


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """(model name, instruction-set flags) of the first CPU listed; off Linux, the name the OS gives
    and no flags (unknown)."""
    model, flags = "unknown CPU", set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        model = platform.processor() or platform.machine() or model
    return model, flags


def cpu_line(cpuinfo: str = "/proc/cpuinfo") -> str:
    """CPU model and the instruction-set flags that decide our speed (printed by every bench)."""
    model, flags = cpu_info(cpuinfo)
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    # oneDNN (TensorFlow's CPU matmuls and convolutions) runs no wider kernels than this cap, so a
    # capped run measures an AVX2-only laptop on an AVX-512 machine.
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    malloc = os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "").lower() not in ("true", "1")
    return (f"{model} ({os.cpu_count()} cores; {' '.join(wanted) or ('no avx2' if flags else 'flags unknown')}"
            f"{f'; ONEDNN_MAX_CPU_ISA={cap}' if cap else ''}{'; malloc allocator' if malloc else ''})")
