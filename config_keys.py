"""Every config key, declared once: its type, default, allowed values and what it does.

config.cfg is the file users read and edit; its [default] section must list exactly these keys
with these defaults (tests/test_config.py checks it). `utils.load_config` reads a key's type
from here, never from the text of its default, and checks the value against `check`. Choices
owned by another module (the model zoo, LR schedules, precisions, conv impls, norms) are named
as "module.NAME" and read from that module, so a new model or schedule is added in one place.

Kept free of TensorFlow at import time: `choices_of` imports an owner module only when a
config is checked.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


class IntList(tuple):
    """A comma-separated list of positive integers in config.cfg ("64, 64"); a tuple in the config."""


@dataclass(frozen=True)
class Key:
    type: type  # bool, int, float, str or IntList
    default: Any
    help: str
    choices: tuple | str | None = None  # the allowed values, or "module.NAME" of the owner's tuple
    check: str | None = None  # ">0", ">=0", ">=1", "(0,1]", "[0,1)", "[0,1]"
    model: bool = False  # defines the network's variables: changing it makes old checkpoints unusable


def _k(type_, default, help_, choices=None, check=None, model=False) -> Key:
    return Key(type_, IntList(default) if type_ is IntList else default, help_, choices, check, model)


# What augment = strong raises these keys to (at least). augment = auto leaves a key alone that
# the user set (a [section] or a flag): it then resolves to base.
STRONG_AUGMENT = {"scale_max": 1.5, "rotate_deg": 20.0}


KEYS: dict[str, Key] = {
    # ---- model
    "model": _k(str, "hw2_inception", "hw2_inception (the seed network) or a zoo model (models.py)",
                "hw2.MODELS", model=True),
    "image_size": _k(int, 0, "network input: image_size x image_size (0: from the images, 24-64)",
                     check=">=0", model=True),
    "conv_stack": _k(IntList, (64,), "widths of the 3x3 convs at full resolution (conv_stack1)", model=True),
    "conv2": _k(int, 128, "width of the 3x3 stride-2 conv after the stack", check=">0", model=True),
    "inception_version": _k(int, 2, "1: 5x5 tower; 2: two 3x3 instead (BN-Inception)", (1, 2), model=True),
    "inception2": _k(IntList, (64, 96, 96, 64), "tower widths 1x1, 3x3, 5x5, pool-proj", model=True),
    "inception2_bottleneck": _k(int, 64, "1x1 bottleneck width of inception2", check=">0", model=True),
    "inception3": _k(IntList, (32, 64, 64, 32), "tower widths 1x1, 3x3, 5x5, pool-proj", model=True),
    "inception3_bottleneck": _k(int, 96, "1x1 bottleneck width of inception3", check=">0", model=True),
    "dense_units": _k(int, 256, "width of dense1", check=">0", model=True),
    "keep_prob_1": _k(float, 0.75, "spatial dropout keep probability after pool2", check="(0,1]"),
    "keep_prob_2": _k(float, 0.75, "spatial dropout keep probability after pool3", check="(0,1]"),
    "keep_prob_dense": _k(float, 0.5, "dropout keep probability after dense1", check="(0,1]"),
    "weight_decay": _k(float, 0.0005, "adam, sgd: L2 factor (keras L2: weight_decay * sum(w^2)); "
                      "adamw: decoupled, each step scales the kernels by 1 - weight_decay * lr", check=">=0"),
    "l2_on": _k(str, "all", "which kernels get L2: all (every conv and dense) or dense (the seed's: dense only)",
                ("all", "dense")),
    "conv_impl": _k(str, "im2col", "im2col (our convolution) or native (tf.nn.conv2d)", "layers.CONV_IMPLS"),
    "precision": _k(str, "auto", "auto | fp32 | bf16 | fp16 (GPU only)", "precision.PRECISIONS"),
    "channels": _k(int, 3, "input channels: 3 (RGB) or 1 (grayscale)", (1, 3), model=True),
    "norm": _k(str, "batch", "zoo: normalization after every conv", "models.NORMS", model=True),
    "residual": _k(bool, True, "zoo resnets: identity/projection shortcuts", model=True),
    "stem": _k(str, "7x7", "zoo resnets: 7x7/2 or 3x3/1 stem", ("7x7", "3x3"), model=True),
    "stem_pool": _k(bool, True, "zoo resnets: 3x3/2 max-pool after the stem", model=True),
    "width": _k(float, 1.0, "zoo resnets and vggs: conv width multiplier", check=">0", model=True),
    "fc_units": _k(int, 4096, "zoo simple_cnn and vgg: hidden fully connected width", check=">0", model=True),
    "dropout": _k(float, 0.0, "zoo: dropout rate before the classifier / after hidden fc layers", check="[0,1)"),
    # ---- augmentation
    "scale_min": _k(float, 1.0, "train: short side resized to image_size * U(scale_min, scale_max)", check=">=1"),
    "scale_max": _k(float, 1.25, "see scale_min", check=">=1"),
    "eval_scale": _k(float, 1.14, "eval: short side to image_size * eval_scale, central crop", check=">=1"),
    "crop_mode": _k(str, "center", "center: resize the short side, crop the middle; squash: the whole "
                    "image to a square, aspect changed", "augmentation.CROP_MODES"),
    "flip_lr": _k(bool, True, "random left-right flips"),
    "flip_ud": _k(float, 0.0, "probability of a vertical flip", check="[0,1]"),
    "brightness": _k(float, 0.25, "max brightness delta on a 0..1 scale (0: off)", check=">=0"),
    "contrast": _k(float, 0.3, "contrast factor in [1-c, 1+c] (0: off)", check=">=0"),
    "rotate_deg": _k(float, 0.0, "max rotation in degrees", check=">=0"),
    "shift_frac": _k(float, 0.0, "max shift as a fraction of image_size", check=">=0"),
    "noise_std": _k(float, 0.0, "std of added Gaussian noise on a 0..1 scale", check=">=0"),
    "mix": _k(str, "none", "train batches: none, mixup (blend each image with a partner) or cutmix "
              "(paste a box of the partner); the target mixes the labels alike", "mixing.MODES"),
    "mix_alpha": _k(float, 1.0, "mix: the mixed share is Beta(mix_alpha, mix_alpha), folded to <= 0.5",
                    check=">0"),
    "augment": _k(str, "auto", "auto: strong below 1,000 training images (run_dir.AUTO_STRONG_BELOW), else base; "
                  "base: the values as set; strong: scale_max >= 1.5, rotate_deg >= 20", ("auto", "base", "strong")),
    # ---- input
    "val_fraction": _k(float, 0.2, "share of each class held out for validation", check="(0,1)"),
    "seed": _k(int, 0, "seeds the split, weights, shuffle and augmentation", check=">=0"),
    "deterministic": _k(bool, False, "bit-identical runs for a seed (slower)"),
    "on_bad_image": _k(str, "skip", "a file the scan cannot use: skip (listed) or fail", ("skip", "fail")),
    "cache_images_mb": _k(int, 1024, "decoded images stay in RAM when they fit in this many MiB", check=">=0"),
    "decode_cache": _k(bool, True, "keep decoded images on disk between runs (~/.cache/hw2/decoded)"),
    "class_balance": _k(str, "none", "unequal classes: none, weights (loss) or sampler (tf.data)",
                        ("none", "weights", "sampler")),
    # ---- training
    "batch_size": _k(int, 0, "per replica (0: ~16 steps per epoch, 16-128)", check=">=0"),
    "eval_batch_size": _k(int, 256, "validation and eval batch", check=">0"),
    "optimizer": _k(str, "adam", "adam, adamw (decoupled weight decay) or sgd", ("adam", "adamw", "sgd")),
    "learning_rate": _k(float, 0.003, "for one replica's batch_size (see lr_scaling)", check=">0"),
    "momentum": _k(float, 0.9, "sgd only", check=">=0"),
    "nesterov": _k(bool, False, "sgd only: Nesterov momentum"),
    "lr_schedule": _k(str, "onecycle", "plateau (the policy below) or a function of the step",
                      "schedules.SCHEDULES"),
    "lr_step_epochs": _k(float, 7.0, "step/exponential: epochs per lr_gamma", check=">0"),
    "lr_gamma": _k(float, 0.1, "step/exponential: LR factor per lr_step_epochs", check="(0,1]"),
    "sam_rho": _k(float, 0.0, "sharpness-aware minimization: each step's gradient is taken rho away along "
                  "the normalized gradient (0 = off; one more forward and backward a step)", check=">=0"),
    "label_smoothing": _k(float, 0.1, "share of the target spread over all classes", check="[0,1)"),
    "lr_scaling": _k(str, "none", "several replicas: LR x replicas (linear), x sqrt, or none",
                     ("none", "linear", "sqrt")),
    "sync_bn": _k(bool, False, "batch-norm statistics over the global batch"),
    "ema_decay": _k(float, 0.999, "moving average of the weights, used for validation and best/", check="(0,1]"),
    "max_steps": _k(int, 20000, "stop after this many steps", check=">0"),
    "max_epochs": _k(int, 0, "> 0: train this many epochs instead of max_steps", check=">=0"),
    "save_checkpoint_steps": _k(int, 0, "validate and checkpoint every this many steps (0: every epoch)",
                                check=">=0"),
    "checkpoint_minutes": _k(float, 10.0, "also validate and checkpoint when this long has passed (0: off)",
                             check=">=0"),
    "validation_share": _k(float, 0.0, "at most this share of the time validates at epoch ends (0: every "
                           "epoch end; 0.1 skips ends until 9x a validation's time has trained)", check="[0,1)"),
    "time_budget": _k(float, 0.0, "minutes for the whole run, validations included (0: off)", check=">=0"),
    "warmup_epochs": _k(float, 1.0, "LR rises linearly from 0 over this many epochs", check=">=0"),
    "warmup_fraction": _k(float, 0.3, "onecycle: LR rises over this share of the run's steps",
                          check="[0,1)"),
    "keep_checkpoints": _k(int, 3, "regular checkpoints kept (best/ apart)", check=">0"),
    "lr_patience": _k(int, 7, "plateau: validations without gain before the LR drops", check=">0"),
    "stop_patience": _k(int, 15, "plateau: validations without gain before training stops", check=">0"),
    "lr_factor": _k(float, 0.5, "plateau and NaN recovery: LR multiplier", check="(0,1]"),
    "min_delta": _k(float, 0.001, "a val top-1 gain smaller than this is no gain", check=">=0"),
    "nan_retries": _k(int, 3, "NaN/Inf loss: restore and lower the LR at most this many times", check=">=0"),
    "log_every_steps": _k(int, 50, "a train log line every this many steps", check=">0"),
    "summary_every_steps": _k(int, 100, "TensorBoard histograms every this many steps, at most 2% of the time (0: off)",
                              check=">=0"),
    "top_k": _k(int, 5, "k of top-k accuracy", check=">0"),
    "eval_timeout_secs": _k(int, 600, "hw2_eval --run_once 0: give up after this long without a checkpoint",
                            check=">0"),
}

MODEL_KEYS = tuple(name for name, key in KEYS.items() if key.model)

# The first key of each group of KEYS (the "# ----" comments above), for help_text.
_GROUP_STARTS = {"model": "model", "scale_min": "augmentation", "val_fraction": "input", "batch_size": "training"}


def default_text(key: Key) -> str:
    """A key's default as a command-line value: true/false, 64,96 for a list."""
    if key.type is bool:
        return str(key.default).lower()
    return ",".join(map(str, key.default)) if key.type is IntList else str(key.default)


def help_text(width: int = 100) -> str:
    """Every key as `--key DEFAULT  what it does`, by group: the --help epilog of the scripts
    that take config keys, so that --help shows what the command line can set."""
    import textwrap
    indent = 34
    lines = ["config keys, each settable as --key value (default: config.cfg's [default]; a --section",
             "replaces some; a run resumed keeps what it trained with):"]
    for name, key in KEYS.items():
        if name in _GROUP_STARTS:
            lines.append(f"\n{_GROUP_STARTS[name]}:")
        flag = f"  --{name} {default_text(key)}"
        text = textwrap.wrap(key.help, width - indent) or [""]
        if len(flag) < indent:
            lines.append(flag.ljust(indent) + text[0])
            text = text[1:]
        else:
            lines.append(flag)
        lines += [" " * indent + t for t in text]
    return "\n".join(lines)


def choices_of(key: Key) -> tuple | None:
    """The allowed values, reading "module.NAME" from the module that owns the list."""
    if isinstance(key.choices, str):
        module, name = key.choices.rsplit(".", 1)
        return tuple(getattr(importlib.import_module(module), name))
    return key.choices
