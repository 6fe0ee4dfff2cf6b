"""Find, check, split and decode class-folder image datasets laid out as DATA_DIR/<class>/<image>.

Kept free of TensorFlow so that scanning and splitting are quick to import and test; the tf.data
pipeline calls `read_image` through tf.numpy_function.

    python hw2_dataset.py --make_demo demo_data
    python hw2_dataset.py --data_dir demo_data --out split.json [--val_fraction 0.2 --seed 0]
    python hw2_dataset.py --data_dir demo_data --check
    python hw2_dataset.py --data_dir demo_data --report dataset_report   # report.md + samples.png

Layout: the label is the top-level folder; images at any depth below it belong to it. Hidden files
and dot-folders are skipped; symlinks are followed, except to a folder already walked (a loop).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import random
import sys
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from utils import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")  # matched case-insensitively
# Written by Windows Explorer into image folders, and by macOS into the zips it makes.
JUNK_FILES = ("thumbs.db", "desktop.ini", "__macosx")
SPLIT_VERSION = 1
_REQUIRED_SPLIT_KEYS = ("data_dir", "class_names", "train", "val")

Item = tuple[str, int]


class ImageInfo(NamedTuple):
    """What the scan learnt about one file: stored size, PIL format and mode, and why it cannot be
    used (None: usable). Fields stay at their zero values when the file never opened."""
    width: int = 0
    height: int = 0
    format: str = ""
    mode: str = ""
    problem: str | None = None


@dataclass
class Scan:
    data_dir: str  # absolute path
    class_names: list[str]  # sorted
    items: list[Item]  # (path relative to data_dir with '/' separators, label index), sorted
    bad: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    # Left out on purpose, not bad: hidden and system files, links to a folder already walked.
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)
    info: dict[str, ImageInfo] = field(default_factory=dict)  # relative path -> ImageInfo, when checked

    def empty_classes(self) -> list[str]:
        """Names of classes left without a single usable image."""
        used = {label for _, label in self.items}
        return [name for i, name in enumerate(self.class_names) if i not in used]


# ----------------------------------------------------------------------------------------- scan

def scan_dataset(data_dir: str, check_images: bool = True, min_size: int = 8, workers: int = 8) -> Scan:
    """List the usable images under data_dir; with check_images, decode each one to catch bad files."""
    scan = _scan(data_dir, check_images, min_size, workers)
    for name in scan.empty_classes():
        skipped = sum(1 for rel, _ in scan.bad if rel.startswith(name + "/"))
        if skipped:
            raise UserError(f"class '{name}' has no usable images ({skipped} skipped: see "
                            f"python hw2_dataset.py --data_dir {scan.data_dir} --check)")
        raise UserError(f"class '{name}' has no images: {os.path.join(scan.data_dir, name)} is empty")
    return scan


def _scan(data_dir: str, check_images: bool, min_size: int, workers: int) -> Scan:
    """scan_dataset without the empty-class check, so --check can still list every bad file."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.exists(data_dir):
        raise UserError(f"data_dir {data_dir} does not exist")
    if not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir} is not a folder")

    class_names, stray, skipped = [], [], []
    for entry in _list_dir(data_dir, skipped):
        if _is(entry.is_dir):
            class_names.append(entry.name)
        elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
            stray.append(entry.name)
    class_names.sort()
    if not class_names:
        found = f" (found {len(stray)} images directly inside it)" if stray else ""
        raise UserError(f"data_dir {data_dir} has no class folders{found}: expected DATA_DIR/<class>/<image>")

    # Images beside the class folders have no label; other loose files (README, LICENSE) are fine.
    bad = [(name, "not inside a class folder") for name in stray]
    candidates: list[Item] = []
    for label, name in enumerate(class_names):
        for rel, is_file in _walk(data_dir, name, skipped):
            ext = os.path.splitext(rel)[1]
            if not is_file:
                bad.append((rel, "broken link or not a regular file"))
            elif ext.lower() in IMAGE_EXTENSIONS:
                candidates.append((rel, label))
            else:
                bad.append((rel, f"unsupported format ({ext or 'no extension'})"))

    items, info = candidates, {}
    if check_images:
        paths = [os.path.join(data_dir, rel) for rel, _ in candidates]
        infos = _map(lambda p: inspect_image(p, min_size), paths, workers)
        info = {rel: i for (rel, _), i in zip(candidates, infos)}
        items = [item for item, i in zip(candidates, infos) if i.problem is None]
        bad += [(rel, i.problem) for (rel, _), i in zip(candidates, infos) if i.problem is not None]
    return Scan(data_dir, class_names, sorted(items), sorted(bad), sorted(skipped), info)


def _list_dir(path: str, skipped: list[tuple[str, str]] | None = None, rel: str = "") -> list[os.DirEntry]:
    """Non-hidden, non-junk entries of a folder; the others go to `skipped` as (rel path, why)."""
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError as e:
        raise UserError(f"cannot read folder {path}: {e.strerror}") from None
    kept = []
    for e in entries:
        if e.name.startswith(".") or e.name.lower() in JUNK_FILES:
            if skipped is not None:
                why = "hidden" if e.name.startswith(".") else "system file"
                skipped.append((f"{rel}/{e.name}" if rel else e.name, why))
        else:
            kept.append(e)
    return kept


def _walk(data_dir: str, class_name: str, skipped: list[tuple[str, str]]) -> Iterator[tuple[str, bool]]:
    """Yield (path relative to data_dir, is a regular file) for everything below one class folder,
    at any depth; symlinks are followed, but a folder already walked is not walked again."""
    seen = set()
    pending = [class_name]
    while pending:
        rel = pending.pop()
        full = os.path.join(data_dir, rel)
        st = os.stat(full)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop would otherwise recurse forever
            skipped.append((rel, "link to a folder already scanned"))
            continue
        seen.add((st.st_dev, st.st_ino))
        for entry in _list_dir(full, skipped, rel):
            child = f"{rel}/{entry.name}"
            if _is(entry.is_dir):
                pending.append(child)
            else:
                yield child, _is(entry.is_file)


def _is(test) -> bool:
    """DirEntry.is_dir / is_file, following symlinks; False for a link that cannot be resolved,
    including a cycle of links (where Python raises ELOOP instead of answering)."""
    try:
        return test()
    except OSError:
        return False


def _map(fn, values: Sequence, workers: int) -> list:
    """fn over values in a thread pool: PIL decoding and hashing release the GIL."""
    if workers <= 1 or len(values) < 2:
        return [fn(v) for v in values]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, values, chunksize=16))


def check_image(path: str, min_size: int = 8) -> str | None:
    """Why the image file at path cannot be used, or None when it decodes and is big enough."""
    return inspect_image(path, min_size).problem


def inspect_image(path: str, min_size: int = 8) -> ImageInfo:
    """Size, format and mode of the image file at path, and why it cannot be used (or None)."""
    info = ImageInfo()
    try:
        if os.path.getsize(path) == 0:
            return info._replace(problem="empty file")
        with Image.open(path) as img:
            w, h = img.size
            info = ImageInfo(w, h, img.format or "", img.mode)
            if min(w, h) < min_size:
                return info._replace(problem=f"too small ({w}x{h})")
            if img.format == "JPEG":
                # Decode at 1/8 DCT scale: libjpeg still entropy-decodes every block, so truncated and
                # most corrupt files still fail, but it skips most of the IDCT and colour work, which
                # is what makes checking a folder of 24-megapixel photos take seconds, not minutes.
                # The trade-off: damage that only shows in the full-resolution pixels goes unnoticed.
                img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
            img.load()
    except UnidentifiedImageError:
        return info._replace(problem="not an image")
    except Image.DecompressionBombError as e:
        return info._replace(problem=f"too large: {_short(e)}")
    except OSError as e:
        if e.errno is not None:  # a real I/O error (permissions, disk), not a decoder complaint
            return info._replace(problem=f"unreadable: {e.strerror}")
        return info._replace(problem=f"corrupt: {_short(e)}")
    except Exception as e:  # plugins raise SyntaxError, ValueError, struct.error on broken headers
        return info._replace(problem=f"corrupt: {_short(e)}")
    return info


def _short(error: BaseException, limit: int = 80) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def median_short_side(data_dir: str, items: Sequence[Item], sample: int = 256, seed: int = 0) -> int:
    """The median short side (pixels) of up to `sample` of the images, read from their headers."""
    chosen = random.Random(f"{seed}/sizes").sample(list(items), min(sample, len(items)))
    sides = []
    for rel, _ in chosen:
        try:
            with Image.open(os.path.join(data_dir, rel)) as img:
                sides.append(min(img.size))
        except (OSError, ValueError):  # a file that broke since the scan: the others decide
            continue
    return int(np.median(sides)) if sides else 0


# -------------------------------------------------------------------------------- class balance

# From this largest/smallest class ratio on, training suggests --class_balance (and the report flags it).
IMBALANCE_WARNING_RATIO = 3.0


def class_counts(items: Iterable[Item], num_classes: int) -> np.ndarray:
    """Number of items of each label, int64 [num_classes]."""
    counts = np.zeros(num_classes, np.int64)
    for _, label in items:
        counts[label] += 1
    return counts


def class_weights(items: Iterable[Item], num_classes: int) -> np.ndarray:
    """Inverse-frequency loss weights for --class_balance weights, float32 [num_classes].

    weight[c] is proportional to 1 / count[c], so every class adds the same total weight to an
    epoch's loss, and the weights average 1 over the classes that have items. A class without items
    gets 0: it never appears in the loss.
    """
    counts = class_counts(items, num_classes).astype(np.float64)
    present = counts > 0
    if not present.any():
        raise UserError("no images to compute class weights from")
    inverse = np.where(present, 1.0 / np.maximum(counts, 1.0), 0.0)
    return (inverse * (present.sum() / inverse.sum())).astype(np.float32)


def imbalance_ratio(counts: Sequence[int]) -> float:
    """Largest class count / smallest class count; inf when a class has none."""
    counts = np.asarray(counts)
    return float("inf") if counts.min() == 0 else float(counts.max() / counts.min())


def imbalance_note(counts: Sequence[int], class_names: Sequence[str]) -> str | None:
    """One line saying that the largest class is IMBALANCE_WARNING_RATIO x the smallest or more, with
    both named, and suggesting --class_balance; None for classes closer to balance."""
    counts = np.asarray(counts)
    ratio = imbalance_ratio(counts)
    if ratio < IMBALANCE_WARNING_RATIO:
        return None
    big, small = int(counts.argmax()), int(counts.argmin())
    times = "infinitely many times" if math.isinf(ratio) else f"{ratio:.1f}x"
    return (f"class imbalance: the largest class '{class_names[big]}' ({counts[big]} images) is "
            f"{times} the smallest '{class_names[small]}' ({counts[small]}): "
            f"consider --class_balance weights or sampler")


# ---------------------------------------------------------------------------------------- split

def make_split(items: Iterable[Item], val_fraction: float = 0.2, seed: int = 0, folds: int = 0,
               fold: int = 0) -> tuple[list[Item], list[Item]]:
    """Stratified train/val split; with folds=K > 1, fold `fold` of a stratified K-fold split is val."""
    by_class: dict[int, list[Item]] = defaultdict(list)
    for path, label in items:
        by_class[int(label)].append((path, int(label)))
    if not by_class:
        raise UserError("no images to split")
    if folds == 0:
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"--val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    elif folds < 2:
        raise UserError(f"--folds must be 0 (no k-fold) or at least 2, got {folds}")
    elif not 0 <= fold < folds:
        raise UserError(f"--fold must be in 0..{folds - 1} for --folds {folds}, got {fold}")

    train, val = [], []
    dealt = 0
    for label in sorted(by_class):
        group = sorted(by_class[label])
        # One generator per class, so adding images to one class does not reshuffle the others.
        random.Random(f"{seed}/{label}").shuffle(group)
        if folds:
            # Continue the deal where the previous class stopped, so the remainders of all classes do
            # not pile into fold 0 and the folds stay within one image of each other in size.
            for i, item in enumerate(group):
                (val if (dealt + i) % folds == fold else train).append(item)
            dealt += len(group)
        else:
            n = len(group)
            n_val = min(max(int(n * val_fraction + 0.5), 1), n - 1) if n >= 2 else 0
            val += group[:n_val]
            train += group[n_val:]
    return sorted(train), sorted(val)


def write_split(path: str, scan: Scan, train: Sequence[Item], val: Sequence[Item], seed: int,
                val_fraction: float, folds: int = 0, fold: int = 0) -> None:
    """Write the split as JSON, atomically, so a crash never leaves a half-written split behind."""
    doc = {"version": SPLIT_VERSION, "data_dir": os.path.abspath(scan.data_dir),
           "class_names": list(scan.class_names), "seed": seed, "val_fraction": val_fraction,
           "folds": folds, "fold": fold, "train": train, "val": val, "bad": scan.bad}
    lines = []
    for key, value in doc.items():
        if key in ("train", "val", "bad"):
            # One entry per line keeps the file readable and makes two splits diffable.
            value_text = "[" + ",".join("\n  " + json.dumps(list(e)) for e in value) + ("\n ]" if value else "]")
        else:
            value_text = json.dumps(value)
        lines.append(f" {json.dumps(key)}: {value_text}")
    text = "{\n" + ",\n".join(lines) + "\n}\n"

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".split-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_split(path: str, check_files: bool = True) -> dict:
    """Read and validate a split file; train/val/bad come back as lists of tuples."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise UserError(f"split file {path} not found (write one with hw2_dataset.py --data_dir DIR --out {path})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"split file {path} is not valid JSON: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read split file {path}: {_short(e)}") from None
    if not isinstance(doc, dict):
        raise UserError(f"split file {path} must hold a JSON object")
    missing = [k for k in _REQUIRED_SPLIT_KEYS if k not in doc]
    if missing:
        raise UserError(f"split file {path} is missing key(s): {', '.join(missing)}")
    if doc.setdefault("version", SPLIT_VERSION) != SPLIT_VERSION:
        raise UserError(f"split file {path} has version {doc['version']!r}; this code reads version {SPLIT_VERSION}")
    for key, default in (("seed", 0), ("val_fraction", None), ("folds", 0), ("fold", 0), ("bad", [])):
        doc.setdefault(key, default)

    names = doc["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"split file {path}: class_names must be a non-empty list of strings")
    for key in ("train", "val"):
        doc[key] = _parse_items(path, key, doc[key], len(names))
    doc["bad"] = [tuple(e) for e in doc["bad"]] if isinstance(doc["bad"], list) else []

    both = set(doc["train"]) & set(doc["val"])
    if both:  # evaluating on training images would silently inflate every val metric
        raise UserError(f"split file {path} lists {len(both)} files in both train and val, e.g. {min(both)[0]}")

    # The file stores an absolute data_dir, but a hand-written one may be relative to the file.
    data_dir = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(str(doc["data_dir"])))
    doc["data_dir"] = os.path.normpath(data_dir)
    if check_files:
        if not os.path.isdir(doc["data_dir"]):
            raise UserError(f"split file {path} points at data_dir {doc['data_dir']}, which is not a folder")
        gone = [rel for rel, _ in doc["train"] + doc["val"] if not os.path.isfile(os.path.join(doc["data_dir"], rel))]
        if gone:
            raise UserError(f"split file {path} names {len(gone)} missing files, e.g. {sorted(gone)[0]}")
    return doc


def _parse_items(path: str, key: str, entries, n_classes: int) -> list[Item]:
    if not isinstance(entries, list):
        raise UserError(f"split file {path}: {key} must be a list of [path, label]")
    items = []
    for i, entry in enumerate(entries):
        if (not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], str)
                or not isinstance(entry[1], int) or isinstance(entry[1], bool)):
            raise UserError(f"split file {path}: {key} entry {i} is {entry!r}, expected [path, label]")
        if not 0 <= entry[1] < n_classes:
            raise UserError(f"split file {path}: {entry[0]} has label {entry[1]}, but there are only {n_classes} classes")
        items.append((entry[0], entry[1]))
    return items


# ---------------------------------------------------------------------------------------- decode

def read_image(path: str, short_side: int | None = None) -> np.ndarray:
    """Decode any supported image to uint8 RGB [H, W, 3], upright, optionally resized so min(H, W) == short_side."""
    path = os.fsdecode(path)  # tf.numpy_function hands strings over as bytes
    if short_side is not None:
        short_side = int(short_side)
        if short_side < 1:
            raise ValueError(f"short_side must be positive, got {short_side}")
    try:
        with Image.open(path) as img:
            if short_side and img.format == "JPEG":
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below short_side: a 24-megapixel
                # photo then costs a fraction of the time and memory of a full decode plus resize.
                img.draft("RGB", (short_side, short_side))
            img.load()
            try:
                ImageOps.exif_transpose(img, in_place=True)
            except Exception:  # a malformed EXIF block should not cost us an otherwise good image
                pass
            rgb = _to_rgb(img)
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image") from None
    except Exception as e:
        raise ValueError(f"{path}: corrupt: {_short(e)}") from None

    if short_side:
        w, h = rgb.size
        if min(w, h) != short_side:
            if w <= h:
                size = (short_side, max(1, int(h * short_side / w + 0.5)))
            else:
                size = (max(1, int(w * short_side / h + 0.5)), short_side)
            if short_side < min(w, h):
                # reducing_gap box-averages by an integer factor first: much faster than a plain
                # antialiased resize of a big image and indistinguishable from it at 3.0.
                rgb = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
            else:
                rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    out = np.array(rgb, dtype=np.uint8)  # a copy: the caller keeps it after PIL's buffer is freed
    if out.ndim != 3 or out.shape[2] != 3:
        raise ValueError(f"{path}: decoded to shape {out.shape}, expected [H, W, 3]")
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img), mode)).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Composite over white: converting straight to RGB would keep whatever colour hides under
        # alpha = 0, often black, and teach the model about invisible pixels.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit (or 32-bit / float) grey levels to 0..255; PIL's own convert would clip at 255."""
    a = a.astype(np.float64)
    if mode.startswith("I;16") or (a.size and a.min() >= 0 and a.max() <= 65535 and mode == "I"):
        a = a / 257.0  # 65535 -> 255 exactly; PNG stores 16-bit data in the full 0..65535 range
    else:
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ demo

def make_demo(out_dir: str) -> int:
    """Write scikit-learn's 1,797 8x8 digits as out_dir/<digit>/<index>.png; returns the image count."""
    from sklearn.datasets import load_digits  # ships its data with the package: no download

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--make_demo {out_dir} is a file, not a folder")
    if os.path.isdir(out_dir):
        foreign = [e.name for e in _list_dir(out_dir) if e.name not in {str(d) for d in range(10)}]
        if foreign:  # refuse to mix digits into a real dataset that happens to live there
            raise UserError(f"--make_demo {out_dir} already holds {foreign[0]!r}: pick an empty or demo folder")
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    for index, (pixels, digit) in enumerate(zip(images, digits.target)):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        data = buffer.getvalue()
        path = os.path.join(out_dir, str(digit), f"{index:04d}.png")
        try:
            with open(path, "rb") as f:
                if f.read() == data:  # re-running leaves identical files and their mtimes alone
                    continue
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return len(images)


# ------------------------------------------------------------------------------------ duplicates

def find_duplicates(scan: Scan, workers: int = 8) -> list[list[str]]:
    """Groups (two or more relative paths) of usable images whose bytes are identical."""
    by_size: dict[int, list[str]] = defaultdict(list)
    for rel, _ in scan.items:
        by_size[os.path.getsize(os.path.join(scan.data_dir, rel))].append(rel)
    # Only files that share their size can be identical: in a folder of photos that is almost none,
    # so this reads a few files instead of every byte of the dataset.
    paths = [rel for group in by_size.values() if len(group) > 1 for rel in group]

    def sha1(rel: str) -> str:
        h = hashlib.sha1()
        with open(os.path.join(scan.data_dir, rel), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    groups: dict[str, list[str]] = defaultdict(list)
    for rel, digest in zip(paths, _map(sha1, paths, workers)):
        groups[digest].append(rel)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


# ---------------------------------------------------------------------------------------- report

SAMPLES_PER_CLASS = 8
_ROWS_PER_SHEET = 100  # classes per contact sheet: keeps samples.png a size an image viewer opens
_LISTED = 200  # rows of a long list (bad files, duplicate groups, sub-folders) shown in report.md
# What hw2's reader does with each PIL mode that is not plain RGB.
_MODE_NOTES = {"L": "grey, copied to 3 channels", "LA": "grey + transparency, over white",
               "P": "palette, converted", "PA": "palette + transparency, over white",
               "RGBA": "transparency, composited over white", "CMYK": "converted to RGB",
               "1": "black and white", "I;16": "16-bit grey, scaled to 8 bits",
               "I": "32-bit grey, scaled to 8 bits", "F": "float grey, scaled to 8 bits"}
_FORMAT_EXTENSIONS = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "BMP": (".bmp",), "GIF": (".gif",)}


def write_report(scan: Scan, out_dir: str, workers: int = 8, seed: int = 0, seconds: float | None = None) -> list[str]:
    """Write out_dir/report.md and the contact sheet out_dir/samples.png (samples-2.png, ... past
    100 classes) for a scan made with check_images; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    groups = find_duplicates(scan, workers)
    sheets = write_contact_sheets(scan, out_dir, SAMPLES_PER_CLASS, seed, workers)
    sections = [_report_summary(scan, groups, seconds), _report_classes(scan, groups), _report_sizes(scan),
                _report_formats(scan), _report_bad(scan), _report_duplicates(scan, groups),
                _report_nesting(scan), [f"![samples]({os.path.basename(p)})" for p in sheets]]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(lines) for lines in sections if lines) + "\n")
    return [path] + sheets


def _md(text: str) -> str:
    """A file or class name as a Markdown code span that survives a table cell."""
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def _class_of(rel: str) -> str:
    return rel.split("/", 1)[0]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("s") else f"{n} {noun}s"


def _more(total: int, shown: int, where: str = "") -> list[str]:
    return [f"\n... and {total - shown} more{where}"] if total > shown else []


def _report_summary(scan: Scan, groups: list[list[str]], seconds: float | None) -> list[str]:
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    lines = [f"# Dataset report: {scan.data_dir}", "",
             f"{len(scan.items)} usable images in {len(scan.class_names)} classes, {len(scan.bad)} unusable "
             f"files, {len(groups)} groups of identical files; scanned{took}. The label of an image is its "
             f"top-level folder; images at any depth below it belong to it."]
    note = imbalance_note(class_counts(scan.items, len(scan.class_names)), scan.class_names)
    return lines + ([f"\n**{note}**"] if note else [])


def _report_classes(scan: Scan, groups: list[list[str]]) -> list[str]:
    counts = class_counts(scan.items, len(scan.class_names))
    bad = defaultdict(int)
    for rel, _ in scan.bad:
        bad[_class_of(rel)] += 1
    copies = defaultdict(int)
    for rel in (rel for group in groups for rel in group):
        copies[_class_of(rel)] += 1
    by_class: dict[str, list[ImageInfo]] = defaultdict(list)
    for rel, label in scan.items:
        if rel in scan.info:
            by_class[scan.class_names[label]].append(scan.info[rel])
    lines = ["## Classes", "", "| class | images | share | unusable | in sub-folders | in identical groups "
             "| median size (short x long) | formats |", "|---|---:|---:|---:|---:|---:|---|---|"]
    nested = defaultdict(int)
    for rel, _ in scan.items:
        nested[_class_of(rel)] += rel.count("/") > 1
    for name, n in zip(scan.class_names, counts):
        infos = by_class[name]
        size = (f"{int(np.median([min(i.width, i.height) for i in infos]))} x "
                f"{int(np.median([max(i.width, i.height) for i in infos]))}") if infos else ""
        formats = ", ".join(f"{f} {c}" for f, c in _tally(i.format for i in infos))
        lines.append(f"| {_md(name)} | {n} | {n / max(1, len(scan.items)):.1%} | {bad[name]} | {nested[name]} "
                     f"| {copies[name]} | {size} | {formats} |")
    ratio = imbalance_ratio(counts)
    big, small = int(counts.argmax()), int(counts.argmin())
    lines.append(f"\nImbalance: the largest class {_md(scan.class_names[big])} ({counts[big]}) / the smallest "
                 f"{_md(scan.class_names[small])} ({counts[small]}) = {ratio:.2f}"
                 + (" (a class has no usable image)" if math.isinf(ratio) else ""))
    return lines


def _tally(values: Iterable[str]) -> list[tuple[str, int]]:
    """(value, count), most frequent first."""
    counts: dict[str, int] = defaultdict(int)
    for v in values:
        counts[v] += 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _report_sizes(scan: Scan) -> list[str]:
    infos = [scan.info[rel] for rel, _ in scan.items if rel in scan.info]
    if not infos:
        return []
    short = np.array([min(i.width, i.height) for i in infos], np.float64)
    long = np.array([max(i.width, i.height) for i in infos], np.float64)
    lines = ["## Image sizes (pixels, as stored)", "", "| | min | 10% | median | 90% | max |", "|---|---:|---:|---:|---:|---:|"]
    for name, values, fmt in (("short side", short, "{:.0f}"), ("long side", long, "{:.0f}"),
                              ("long / short", long / short, "{:.2f}")):
        row = [values.min(), *np.percentile(values, [10, 50, 90]), values.max()]
        lines.append(f"| {name} | " + " | ".join(fmt.format(v) for v in row) + " |")
    return lines


def _report_formats(scan: Scan) -> list[str]:
    infos = [(rel, scan.info[rel]) for rel, _ in scan.items if rel in scan.info]
    if not infos:
        return []
    lines = ["## Formats and modes", "", "| format | images |", "|---|---:|"]
    lines += [f"| {f} | {n} |" for f, n in _tally(i.format for _, i in infos)]
    lines += ["", "| mode | images | what the reader does |", "|---|---:|---|"]
    lines += [f"| {m} | {n} | {_MODE_NOTES.get(m, 'used as is' if m == 'RGB' else 'converted to RGB')} |"
              for m, n in _tally(i.mode for _, i in infos)]
    mismatched = [(rel, i.format) for rel, i in infos
                  if i.format in _FORMAT_EXTENSIONS and not rel.lower().endswith(_FORMAT_EXTENSIONS[i.format])]
    if mismatched:  # harmless to hw2 (it reads the content), but other tools go by the extension
        lines.append(f"\n{len(mismatched)} files have an extension that does not match their content, e.g. "
                     + ", ".join(f"{_md(rel)} is {fmt}" for rel, fmt in mismatched[:3]))
    return lines


def _report_bad(scan: Scan) -> list[str]:
    lines = ["## Unusable files", ""]
    empty = scan.empty_classes()
    if empty:
        lines.append("Classes without a single usable image: " + ", ".join(map(_md, empty)) + "\n")
    if not scan.bad:
        return lines + ["None: every image file decodes and is big enough."]
    # "corrupt: <decoder message>" varies per file; the summary groups by the kind of problem.
    kinds = _tally(reason if reason.startswith("unsupported") else reason.split(":")[0].split(" (")[0]
                   for _, reason in scan.bad)
    lines += ["| problem | files |", "|---|---:|"] + [f"| {k} | {n} |" for k, n in kinds]
    lines += ["", "| file | reason |", "|---|---|"]
    lines += [f"| {_md(rel)} | {reason.replace('|', '/')} |" for rel, reason in scan.bad[:_LISTED]]
    return lines + _more(len(scan.bad), _LISTED, " (python hw2_dataset.py --check lists every one)")


def _report_duplicates(scan: Scan, groups: list[list[str]]) -> list[str]:
    labels = dict(scan.items)
    across = [g for g in groups if len({labels[rel] for rel in g}) > 1]
    within = [g for g in groups if len({labels[rel] for rel in g}) == 1]
    if not groups:
        return ["## Identical files", "", "None: no two usable images have the same bytes."]
    lines = ["## Identical files", "", f"{len(groups)} groups of byte-identical images: {len(across)} across "
             f"classes, {len(within)} within one class. Training uses every copy; a group that the split puts "
             f"on both sides inflates the val scores and is listed in RUN/bad_images.txt."]
    for title, chosen in (("Across classes (one image, several labels: fix these first)", across),
                          ("Within one class", within)):
        if chosen:
            lines += ["", f"### {title}", ""] + [f"- {' = '.join(map(_md, g))}" for g in chosen[:_LISTED]]
            lines += _more(len(chosen), _LISTED)
    return lines


def _report_nesting(scan: Scan) -> list[str]:
    folders: dict[str, int] = defaultdict(int)
    for rel, _ in scan.items:
        if rel.count("/") > 1:
            folders[rel.rsplit("/", 1)[0]] += 1
    lines = ["## Sub-folders", ""]
    if folders:
        n_classes = len({_class_of(f) for f in folders})
        lines += [f"{_count(sum(folders.values()), 'image')} sit in {_count(len(folders), 'sub-folder')} of "
                  f"{_count(n_classes, 'class')}; each counts for its top-level class:", "", "| sub-folder | images |", "|---|---:|"]
        lines += [f"| {_md(f)} | {n} |" for f, n in sorted(folders.items())[:_LISTED]]
        lines += _more(len(folders), _LISTED)
    else:
        lines.append("None: every image sits directly in its class folder.")
    stray = [rel for rel, reason in scan.bad if reason == "not inside a class folder"]
    if stray:
        lines.append(f"\n{_count(len(stray), 'image')} {'lies' if len(stray) == 1 else 'lie'} beside the class "
                     "folders, without a label: "
                     + ", ".join(map(_md, stray[:5])) + (" ..." if len(stray) > 5 else ""))
    if scan.skipped:
        kinds = ", ".join(f"{n} {why}" for why, n in _tally(why for _, why in scan.skipped))
        examples = ", ".join(_md(rel) for rel, _ in scan.skipped[:5])
        lines.append(f"\nSkipped on purpose ({kinds}): {examples}" + (" ..." if len(scan.skipped) > 5 else ""))
    return lines


def write_contact_sheets(scan: Scan, out_dir: str, per_class: int = SAMPLES_PER_CLASS, seed: int = 0,
                         workers: int = 8) -> list[str]:
    """samples.png: `per_class` random images of each class (seeded), one row per named class;
    samples-2.png, ... hold the rows past the first 100 classes. Returns the paths written."""
    by_label: dict[int, list[str]] = defaultdict(list)
    for rel, label in scan.items:
        by_label[label].append(rel)
    rows = [(name, len(by_label[label]),
             sorted(random.Random(f"{seed}/{label}").sample(by_label[label], min(per_class, len(by_label[label])))))
            for label, name in enumerate(scan.class_names)]
    thumb = 96 if len(rows) <= 25 else 64
    paths = []
    for start in range(0, len(rows), _ROWS_PER_SHEET):
        chunk = rows[start:start + _ROWS_PER_SHEET]
        name = "samples.png" if start == 0 else f"samples-{start // _ROWS_PER_SHEET + 1}.png"
        paths.append(os.path.join(out_dir, name))
        _contact_sheet(scan.data_dir, chunk, per_class, thumb, workers).save(paths[-1])
    return paths


def _contact_sheet(data_dir: str, rows: list[tuple[str, int, list[str]]], per_class: int, thumb: int,
                   workers: int) -> Image.Image:
    from PIL import ImageDraw
    pad, label_width = 4, 2 * thumb
    sheet = Image.new("RGB", (label_width + per_class * (thumb + pad) + pad, len(rows) * (thumb + pad) + pad),
                      (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font, small = _font(max(11, thumb // 7)), _font(max(10, thumb // 9))
    cells = [(r, c, rel) for r, (_, _, rels) in enumerate(rows) for c, rel in enumerate(rels)]
    thumbs = _map(lambda cell: _thumbnail(os.path.join(data_dir, cell[2]), thumb), cells, workers)
    for (r, c, _), image in zip(cells, thumbs):
        x, y = label_width + pad + c * (thumb + pad), pad + r * (thumb + pad)
        draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=(232, 232, 232))  # white images show
        sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
    for r, (name, count, _) in enumerate(rows):
        y = pad + r * (thumb + pad) + thumb // 3
        draw.text((pad, y), _fit(draw, name, font, label_width - 2 * pad), fill=(0, 0, 0), font=font)
        draw.text((pad, y + thumb // 4), f"{count} images", fill=(110, 110, 110), font=small)
    return sheet


def _thumbnail(path: str, size: int) -> Image.Image:
    """The image fitted into size x size, decoded at reduced scale; grey when it cannot be read."""
    try:
        image = Image.fromarray(read_image(path, short_side=size))
    except ValueError:
        return Image.new("RGB", (size, size), (200, 200, 200))
    image.thumbnail((size, size), Image.Resampling.BILINEAR)
    return image


def _font(size: int):
    """DejaVu Sans (shipped with matplotlib: Latin, Greek, Cyrillic) or PIL's built-in font."""
    from PIL import ImageFont
    try:
        import matplotlib
        return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    """text, shortened with an ellipsis until it fits in width pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


# ------------------------------------------------------------------------------------------- CLI

def _check_command(args: argparse.Namespace) -> int:
    scan = _scan(args.data_dir, True, args.min_size, args.workers)
    for rel, reason in scan.bad:
        print(f"bad: {rel}: {reason}")
    empty = scan.empty_classes()
    for name in empty:
        print(f"bad: class '{name}' has no usable images")
    n_dup = 0
    if args.out is None:  # hashing reads every byte; skip it when the user only wants a split
        groups = find_duplicates(scan, args.workers)
        n_dup = len(groups)
        labels = dict(scan.items)
        for group in groups:
            mixed = len({labels[rel] for rel in group}) > 1
            print(f"duplicate: {' = '.join(group)}" + ("  (in different classes!)" if mixed else ""))
    print(f"checked {scan.data_dir}: {len(scan.items)} usable images in {len(scan.class_names)} classes, "
          f"{len(scan.bad)} bad files, {n_dup} groups of duplicates")
    if args.out is not None and not empty:
        _split_command(args, scan)
    return 1 if scan.bad or empty else 0


def _report_command(args: argparse.Namespace) -> int:
    import time
    start = time.perf_counter()
    scan = _scan(args.data_dir, True, args.min_size, args.workers)
    paths = write_report(scan, args.report, args.workers, args.seed, time.perf_counter() - start)
    print(f"{len(scan.items)} usable images in {len(scan.class_names)} classes, {len(scan.bad)} unusable files; "
          f"wrote {', '.join(paths)} in {time.perf_counter() - start:.1f}s")
    return 0


def _split_command(args: argparse.Namespace, scan: Scan | None = None) -> int:
    scan = scan or scan_dataset(args.data_dir, True, args.min_size, args.workers)
    out = args.out or "split.json"
    train, val = make_split(scan.items, args.val_fraction, args.seed, args.folds, args.fold)
    write_split(out, scan, train, val, args.seed, args.val_fraction, args.folds, args.fold)

    counts = np.zeros((len(scan.class_names), 2), dtype=int)
    for part, items in enumerate((train, val)):
        for _, label in items:
            counts[label, part] += 1
    width = max(5, *(len(n) for n in scan.class_names))
    print(f"{'class':<{width}}  {'train':>6}  {'val':>6}")
    for name, (n_train, n_val) in zip(scan.class_names, counts):
        print(f"{name:<{width}}  {n_train:>6}  {n_val:>6}")
    print(f"{'total':<{width}}  {len(train):>6}  {len(val):>6}")
    if args.folds:
        print(f"fold {args.fold} of {args.folds} is val")
    if scan.bad:
        print(f"{len(scan.bad)} bad files left out (list them with --check)")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make_demo", metavar="DIR", help="write scikit-learn's digits as a class-folder dataset")
    parser.add_argument("--import", dest="import_", nargs=2, metavar=("cifar10|mnist", "PATH"),
                        help="CIFAR-10 batches or MNIST idx files -> class folders OUT/train, OUT/test")
    parser.add_argument("--data_dir", metavar="DIR", help="dataset laid out as DIR/<class>/<image>")
    parser.add_argument("--out", metavar="SPLIT.json", help="where to write the split (default: ./split.json)")
    parser.add_argument("--val_fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", type=int, default=0, help="K > 1: stratified K-fold; --fold picks the val fold")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="list bad and duplicate files; exit 1 if any are bad")
    parser.add_argument("--report", metavar="OUT", help="write OUT/report.md (classes, sizes, formats, bad files, "
                        "duplicates, imbalance, sub-folders) and OUT/samples.png (a few images per class)")
    parser.add_argument("--min_size", type=int, default=8, help="images smaller than this on a side are bad")
    parser.add_argument("--workers", type=int, default=8, help="threads that decode images while checking")
    args = parser.parse_args(argv)
    if args.import_:
        if not args.out:
            parser.error("--import needs --out DIR")
        try:
            import importers
            counts = importers.import_dataset(args.import_[0], args.import_[1], args.out)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(", ".join(f"{n} {part} images in {os.path.join(args.out, part)}" for part, n in counts.items()))
        return 0
    if not args.make_demo and not args.data_dir:
        parser.error("give --make_demo DIR or --data_dir DIR")
    if args.report and (args.check or args.out):
        parser.error("--report runs on its own: leave out --check and --out")
    try:
        if args.fold and not args.folds:
            raise UserError("--fold needs --folds K")
        if args.make_demo:
            n = make_demo(args.make_demo)
            print(f"wrote {n} images in 10 classes to {args.make_demo}")
        if args.data_dir:
            if args.report:
                return _report_command(args)
            return _check_command(args) if args.check else _split_command(args)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
