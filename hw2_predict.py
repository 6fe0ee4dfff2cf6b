"""Predict the classes of image files with an exported model or a training run.

    python hw2_predict.py --model saved_model/NAME --images DIR_OR_FILES... [--out predictions.csv] [--top_k K]
    python hw2_predict.py --model saved_model/NAME/model.tflite --images DIR_OR_FILES...
    python hw2_predict.py --checkpoint_dir RUN --images DIR_OR_FILES... [--raw]

Writes one CSV line per image: path, then class and probability for each of the top k, and an
error column. Folders are searched recursively for image files. A file that cannot be read or
decoded gets a line with its error (and a warning on stderr); the others are still predicted.
A .tflite model (hw2_export.py --tflite) runs in tf.lite.Interpreter, each image read and
prepared by hw2's own eval preprocessing first, as model.tflite.json describes.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

import run_dir
import utils
from utils import UserError, count

from hw2_dataset import CONVERT_FIRST, IMAGE_EXTENSIONS, unsupported

# TIFF's magic numbers (little- and big-endian), and the ISO box HEIC and AVIF files open with
# (at byte 4): the training formats TensorFlow cannot decode.
_TIFF = (b"II*\x00", b"MM\x00*")
_ISO_BOX = b"ftyp"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hw2_predict.py", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a SavedModel written by hw2_export.py, or its model.tflite (--tflite)")
    src.add_argument("--checkpoint_dir", "--train_dir",
                     help="a training run (RUN) or RUN/best: its best checkpoint (--train_dir: the same)")
    p.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    p.add_argument("--out", default="predictions.csv", help="CSV to write (default: predictions.csv)")
    p.add_argument("--top_k", type=int, help="classes per image (default: the model's top_k)")
    p.add_argument("--raw", action="store_true", help="with --checkpoint_dir: raw weights instead of the EMA")
    p.add_argument("--tta", help="with --checkpoint_dir: test-time augmentation, flip, none or auto (the default: "
                                 "flip if the run trained with flip_lr); an export keeps what hw2_export chose")
    p.add_argument("--batch_size", type=int, default=32)
    return p


def list_images(inputs: list[str]) -> list[str]:
    """Files as given; folders expanded (recursively, sorted) to their image files."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            # Photos in a format this installation cannot read (HEIC without pillow-heif) are listed
            # too, so that their rows say to convert them (not "no image files").
            found = sorted(os.path.join(d, f) for d, _, files in _walk_visible(item) for f in files
                           if f.lower().endswith(IMAGE_EXTENSIONS + tuple(CONVERT_FIRST)) and not f.startswith("."))
            if not found:
                logging.warning("no image files in %s", item)
            paths += found
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise UserError(f"not found: {item}")
    if not paths:
        raise UserError(f"no image files in {' '.join(inputs)}")
    return paths


def _walk_visible(root: str):
    """os.walk without dot-folders, as the training scan: macOS's ._IMG_1.jpg resource forks and
    .thumbnails/ are not the user's photos."""
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        yield d, dirs, files


def load_model(args):
    """(predict(paths, batch_size) -> [(probabilities or None, error)] per path, class names, default k)."""
    import tensorflow as tf

    import serving
    if args.model and (args.model.lower().endswith(".tflite") or os.path.isfile(args.model)):
        tflite = serving.TFLiteModel(args.model)
        return tflite.predict_files, tflite.class_names, tflite.top_k
    if args.model:
        if not os.path.isfile(os.path.join(args.model, "saved_model.pb")):
            if os.path.isfile(os.path.join(args.model, run_dir.CONFIG)) or \
                    os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(args.model)), run_dir.CONFIG)):
                raise UserError(f"{args.model} is a training run, not a SavedModel: predict from it with "
                                f"{utils.shell_join(['--checkpoint_dir', args.model])}")
            raise UserError(f"{args.model} is not a SavedModel (no saved_model.pb): export one with hw2_export.py")
        module = tf.saved_model.load(args.model)
        names = [n.decode() for n in module.class_names.numpy()]
        k = int(module.top_k.numpy())
        # Exports made before short_side was saved: TIFF and HEIC at full size, as then.
        short_side = int(module.short_side.numpy()) if hasattr(module, "short_side") else None
    else:
        module = serving.build_serving_module(run_dir.find(args.checkpoint_dir),
                                              run_dir.pick_checkpoint(args.checkpoint_dir, prefer_best=True),
                                              raw=args.raw, tta=args.tta or "auto")
        names, k = module.info["class_names"], module.info["top_k"]
        short_side = int(module.short_side.numpy())
    # The closure keeps the module alive: its serve() holds only weak references to its variables.
    return (lambda paths, batch_size: predict_files(module, paths, batch_size, short_side)), names, k


def predict_files(module, paths: list[str], batch_size: int,
                  short_side: int | None = None) -> list[tuple[np.ndarray | None, str]]:
    """(probabilities or None, error) per path. A batch that fails to decode is retried one by one.
    Files are read one batch at a time: a folder of 10,000 phone photos is ~40 GB of JPEG bytes.
    short_side: the module's (see _read)."""
    import tensorflow as tf
    results: list[tuple[np.ndarray | None, str]] = [(None, "")] * len(paths)

    def run(blobs):
        return module.serve(tf.constant(blobs))["probabilities"].numpy()

    for start in range(0, len(paths), batch_size):
        blobs = {}
        for i in range(start, min(start + batch_size, len(paths))):
            blob, error = _read(paths[i], short_side)
            if blob is None:
                results[i] = (None, error)
            else:
                blobs[i] = blob
        if not blobs:
            continue
        try:
            for i, p in zip(blobs, run(list(blobs.values()))):
                results[i] = (p, "")
        except tf.errors.InvalidArgumentError:
            for i, blob in blobs.items():
                try:
                    results[i] = (run([blob])[0], "")
                except tf.errors.InvalidArgumentError as e:
                    results[i] = (None, "not a decodable image: " + _op_words(e.message))
    return results


def _read(path: str, short_side: int | None = None) -> tuple[bytes | None, str]:
    """(the bytes the model decodes for path, "") or (None, why not). A TIFF, HEIC or AVIF is
    decoded here, by PIL, at `short_side` where given, as training decodes it: the model then
    resizes nothing, and a HEIC's thumbnail can stand in for its photo (read_image)."""
    ext = os.path.splitext(path)[1]
    if ext.lower() in CONVERT_FIRST:
        return None, unsupported(ext)
    try:
        with open(path, "rb") as f:
            blob = f.read()
        if not blob:
            return None, "empty file"
        # PIL reads a scan or an iPhone photo as training did.
        return (_as_png(path, short_side) if blob.startswith(_TIFF) or blob[4:8] == _ISO_BOX else blob), ""
    except OSError as e:
        return None, f"cannot read: {e.strerror}"
    except ValueError as e:  # read_image's message starts with the path
        return None, str(e).removeprefix(f"{os.fsdecode(path)}: ")


def _op_words(message: str) -> str:
    """The failing op's own words ("Unknown image file format. ...") from a TensorFlow error,
    whose first line is only "Graph execution error:"."""
    frame = ("Graph execution error", "Detected at node", "<stack traces", "[[", "File ")
    lines = [line.strip() for line in message.splitlines()]
    words = [line for line in lines if line and not line.startswith(frame)]
    return (words[0] if words else lines[0])[:120]


def _as_png(path: str, short_side: int | None = None) -> bytes:
    """The image at path, decoded by PIL (upright, RGB; resized to short_side where given) and
    re-encoded losslessly as PNG."""
    import io

    from PIL import Image

    from hw2_dataset import read_image
    out = io.BytesIO()
    Image.fromarray(read_image(path, short_side=short_side)).save(out, "PNG", compress_level=1)
    return out.getvalue()


def check_out(path: str) -> None:
    """Before predicting: a folder of phone photos takes minutes, and an --out that cannot be
    written would lose them all at the end."""
    if os.path.isdir(path):
        raise UserError(f"--out {path} is a folder: give a file, e.g. --out {os.path.join(path, 'predictions.csv')}")
    run_dir.writable_folder(os.path.dirname(os.path.abspath(path)), f"the folder of --out {path}")


def write_predictions(path: str, paths: list[str], results, class_names: list[str], k: int) -> None:
    header = ["path"] + [f"{kind}_{j}" for j in range(1, k + 1) for kind in ("class", "prob")] + ["error"]
    rows = []
    for p, (probs, error) in zip(paths, results):
        if probs is None:
            rows.append([p] + [""] * (2 * k) + [error])
            continue
        top = np.argsort(-probs, kind="stable")[:k]
        rows.append([p] + [v for j in top for v in (class_names[j], f"{probs[j]:.6f}")] + [""])
    run_dir.write_csv(path, header, rows)  # whole or not at all: an older predictions.csv survives a kill


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    utils.setup_logging()
    if args.batch_size <= 0:
        raise UserError(f"--batch_size must be > 0, got {args.batch_size}")
    if args.model and args.tta:
        raise UserError("--tta applies to --checkpoint_dir: an export's test-time augmentation is fixed when it "
                        "is made (hw2_export.py --tta)")
    paths = list_images(args.images)
    check_out(args.out)
    predict, class_names, default_k = load_model(args)
    k = args.top_k or default_k
    run_dir.check_top_k(k, len(class_names))
    results = predict(paths, args.batch_size)
    bad = [(p, e) for p, (probs, e) in zip(paths, results) if probs is None]
    for p, e in bad:
        print(f"warning: {run_dir.valid_utf8(p)}: {e}", file=sys.stderr)
    write_predictions(args.out, paths, results, class_names, k)
    print(f"predicted {count(len(paths) - len(bad), 'image')}{f', {len(bad)} unreadable' if bad else ''} -> {args.out}",
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return utils.run_cli(run, argv)


console = utils.console(main)  # the installed command: exits without TensorFlow's teardown

if __name__ == "__main__":
    console()
