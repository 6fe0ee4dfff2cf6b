"""Export a trained hw2 run as a TensorFlow SavedModel that takes encoded images.

    python hw2_export.py --checkpoint_dir RUN --export_dir saved_model/NAME [--checkpoint P] [--raw] [--top_k K]
                         [--tta auto|none|flip] [--tflite [none|dynamic|float16]]

The SavedModel's `serving_default` signature takes a batch of encoded image files (tf.string:
JPEG, PNG, BMP or GIF bytes) and returns `probabilities` [N, classes], `top_k_indices`,
`top_k_classes` and `top_k_probabilities` [N, K]. The eval preprocessing runs inside, so a user
needs only TensorFlow:

    m = tf.saved_model.load("saved_model/NAME")
    out = m.serve(tf.constant([open("a.png", "rb").read()]))   # or m.signatures["serving_default"]

By default the weights are the best checkpoint's exponential moving average, the ones that
validation judged. Preprocessing differs from hw2's PIL decoding in small ways (see
`preprocess_bytes`); outputs match hw2_eval.py's to a small tolerance. The graph averages the
probabilities of each image and its mirror where the run trained with mirrored images (`--tta
auto`, as hw2_eval.py's default); `--tta none` halves its work.

`--tflite` also writes export_dir/model.tflite for phones: float32 [N, S, S, C] input of RGB values
0-255, already resized and center-cropped as hw2's eval does; per-image standardization inside;
probabilities out; builtin TFLite ops only. export_dir/model.tflite.json holds the class names
and the preprocessing to apply; `hw2_predict.py --model export_dir/model.tflite` runs it.
`--tflite dynamic` stores its weights in 8 bits (a quarter of the size, 2-3x as fast on a CPU,
probabilities within ~0.01 of the float model's), `--tflite float16` in 16.
"""
from __future__ import annotations

import argparse
import logging
import os

import run_dir
import utils
from utils import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hw2_export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_dir", "--train_dir", required=True,
                   help="a training run (RUN) or RUN/best (--train_dir: the same, as hw2_train names it)")
    p.add_argument("--export_dir", required=True, help="where the SavedModel goes, e.g. saved_model/NAME")
    p.add_argument("--checkpoint", help="one checkpoint prefix (default: RUN/best's, else the newest)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of their moving average")
    p.add_argument("--top_k", type=int, help="how many classes to return (default: the run's top_k)")
    p.add_argument("--tta", default="auto", help="test-time augmentation: flip (mean of image and mirror), none "
                                                 "(half the work), or auto (flip if the run trained with flip_lr)")
    p.add_argument("--tflite", nargs="?", const="none", metavar="QUANTIZE",
                   help="also write export_dir/model.tflite (+ model.tflite.json) for mobile runtimes; QUANTIZE: "
                        "none (float32 weights, the default), dynamic (8-bit weights: a quarter of the size, "
                        "2-3x faster on a CPU) or float16")
    p.add_argument("--force", action="store_true", help="replace an existing export_dir")
    return p


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    utils.setup_logging()
    run = run_dir.find(args.checkpoint_dir)
    import evaluation
    evaluation.check_tta(args.tta)
    import serving
    if args.tflite is not None and args.tflite not in serving.TFLITE_QUANTIZE:
        raise UserError(f"--tflite {args.tflite}: the weights can be {', '.join(serving.TFLITE_QUANTIZE)}")
    if os.path.exists(args.export_dir) and not args.force:
        raise UserError(f"{args.export_dir} exists: pass --force to replace it, or pick another --export_dir")
    parent = os.path.dirname(os.path.abspath(args.export_dir))
    os.makedirs(parent, exist_ok=True)
    checkpoint = run_dir.pick_checkpoint(args.checkpoint_dir, args.checkpoint, prefer_best=True)
    logging.info("exporting %s (%s weights)", checkpoint, "raw" if args.raw else "EMA")
    info = serving.export(run, checkpoint, args.export_dir, args.raw, args.top_k, args.tta, args.tflite)
    tta = f", tta {info['tta']}" if info["tta"] != "none" else ""
    print(f"wrote {args.export_dir} ({dir_size(args.export_dir) / 2**20:.1f} MiB): {len(info['class_names'])} "
          f"classes, top-{info['top_k']}, {info['weights']} weights of {checkpoint}{tta}", flush=True)
    if args.tflite:
        tflite = os.path.join(args.export_dir, serving.TFLITE)
        weights = "" if args.tflite == "none" else f", {args.tflite} weights"
        print(f"wrote {tflite} ({os.path.getsize(tflite) / 2**20:.1f} MiB{weights}) and {tflite}.json", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return utils.run_cli(run, argv)


console = utils.console(main)  # the installed command: exits without TensorFlow's teardown

if __name__ == "__main__":
    console()
