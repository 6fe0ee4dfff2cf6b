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
from PIL import Image, ImageOps, UnidentifiedImageError, features

import check_cache
import decode_cache
import utils
from utils import UserError, count


def _readable_extensions() -> tuple[str, ...]:
    """The image extensions PIL reads here, matched case-insensitively. TIFF is what scanners
    write; WebP, what web pages serve; HEIC, what iPhones save by default, through the pillow-heif
    plugin (a requirement, but a missing one only costs HEIC); AVIF, what Pillow 11.3 and later
    read themselves. (TensorFlow's own decoders, which an exported model uses, read neither TIFF,
    HEIC nor AVIF: hw2_predict hands the model their pixels, read by PIL, as PNG.)"""
    # .jfif and .jpe: JPEGs as Windows browsers save them from the web.
    extensions = [".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"]
    try:
        import pillow_heif
        pillow_heif.register_heif_opener()  # turns the photo upright by its own transforms, EXIF says 1
        extensions += [".heic", ".heif"]
    except ImportError:
        pass
    if features.check("avif"):
        extensions.append(".avif")
    return tuple(extensions)


IMAGE_EXTENSIONS = _readable_extensions()
# Photo formats this installation cannot read: the skip says what to do.
CONVERT_FIRST = {ext: name for ext, name in {".heic": "HEIC", ".heif": "HEIF", ".avif": "AVIF"}.items()
                 if ext not in IMAGE_EXTENSIONS}
# Cameras' RAW files (Adobe, Canon, Nikon, Sony, Fujifilm, Olympus, Panasonic), which PIL does not read.
CONVERT_FIRST.update(dict.fromkeys((".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2"), "camera RAW"))
# A download not yet extracted: its images are not read, and the skip says so.
ARCHIVE_EXTENSIONS = (".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar")
# Written by Windows Explorer into image folders, and by macOS into the zips it makes.
JUNK_FILES = ("thumbs.db", "desktop.ini", "__macosx")
# PIL refuses images over 179 megapixels as decompression bombs, but a 200-megapixel phone photo
# (16320x12240) is an ordinary JPEG, which we decode at 1/2-1/8 scale (draft). So the guard is
# ours, per format: JPEGs up to a gigapixel, everything decoded whole (PNG, TIFF, ...) under PIL's.
PIXEL_LIMIT = 2 * Image.MAX_IMAGE_PIXELS
JPEG_PIXEL_LIMIT = 2**30
Image.MAX_IMAGE_PIXELS = JPEG_PIXEL_LIMIT // 2  # PIL errors at twice this, warns above it
SPLIT_VERSION = 1
# Names that downloaded datasets (and --import) give their own parts: DATA/train/<class>,
# DATA/val/<class>. Taken as class folders they would make a train-vs-val classifier.
PART_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing", "dev", "eval", "holdout")
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
            check = utils.shell_join(["python", "hw2_dataset.py", "--data_dir", scan.data_dir, "--check"])
            raise UserError(f"class '{name}' has no usable images ({skipped} skipped: see {check})")
        raise UserError(f"class '{name}' has no images: {os.path.join(scan.data_dir, name)} is empty "
                        "(add images to it or move it out of the data folder)")
    return scan


def _scan(data_dir: str, check_images: bool, min_size: int, workers: int) -> Scan:
    """scan_dataset without the empty-class check, so --check can still list every bad file."""
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.exists(data_dir):
        raise UserError(f"data_dir {data_dir} does not exist")
    if not os.path.isdir(data_dir):
        raise UserError(f"data_dir {data_dir} is not a folder")

    class_names, stray, archives, skipped = [], [], [], []
    for entry in _list_dir(data_dir, skipped):
        if _is(entry.is_dir):
            class_names.append(entry.name)
        elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
            stray.append(entry.name)
        elif entry.name.lower().endswith(ARCHIVE_EXTENSIONS):
            archives.append(entry.name)
    class_names.sort()
    if not class_names:
        found = [f"{count(len(stray), 'image')} directly inside it"] if stray else []
        if archives:
            found.append(f"{count(len(archives), 'archive')}, e.g. {min(archives)}: extract "
                         f"{'them' if len(archives) > 1 else 'it'} first")
        found = f" (found {'; '.join(found)})" if found else ""
        raise UserError(f"data_dir {data_dir} has no class folders{found}: expected DATA_DIR/<class>/<image>")

    inside = {name: _subfolders(os.path.join(data_dir, name)) for name in class_names}
    parts = _dataset_parts(data_dir, inside) or _set_inside(data_dir, inside)
    if parts:
        raise UserError(parts)

    # Images beside the class folders have no label; other loose files (README, LICENSE) are fine.
    bad = [(name, "not inside a class folder") for name in stray]
    bad += [(name, "an archive beside the class folders: extract it into DATA_DIR/<class>/ to use its images")
            for name in archives]
    candidates: list[Item] = []
    for label, name in enumerate(class_names):
        for rel, is_file in _walk(data_dir, name, skipped):
            ext = os.path.splitext(rel)[1]
            if not is_file:
                bad.append((rel, "broken link or not a regular file"))
            elif ext.lower() in IMAGE_EXTENSIONS:
                candidates.append((rel, label))
            else:
                bad.append((rel, unsupported(ext)))

    items, info = candidates, {}
    if check_images:
        infos = _check_all(data_dir, [rel for rel, _ in candidates], min_size, workers)
        info = {rel: i for (rel, _), i in zip(candidates, infos)}
        items = [item for item, i in zip(candidates, infos) if i.problem is None]
        bad += [(rel, i.problem) for (rel, _), i in zip(candidates, infos) if i.problem is not None]
    return Scan(data_dir, class_names, sorted(items), sorted(bad), sorted(skipped), info)


def _dataset_parts(data_dir: str, inside: dict[str, list[str]]) -> str | None:
    """What to do, where the "classes" are a dataset's own parts: two or more folders named like
    parts (train, val, test, ...), one of them holding class folders (Kaggle's flat, unlabelled
    test/ beside train/<class> included); None otherwise. Both must hold, so that classes that
    share sub-folders such as 2024/, or one real class named "train", are never taken for parts.
    `inside`: each class folder's sub-folders."""
    parts = [name for name in inside if name.lower() in PART_NAMES]
    if len(parts) < 2:
        return None
    rank = {name: i for i, name in enumerate(PART_NAMES)}
    labelled = sorted((name for name in parts if len(inside[name]) >= 2), key=lambda name: rank[name.lower()])
    if not labelled:
        return None
    parts.sort(key=lambda name: rank[name.lower()])
    train = labelled[0]
    evaluate = (f", then hw2_eval.py --test_data_path {utils.shell_join([os.path.join(data_dir, labelled[1])])}"
                if len(labelled) > 1 else "")
    return (f"data_dir {data_dir} holds a dataset's own parts ({', '.join(parts)}), not class folders ({train} "
            f"holds the class folders {_some(inside[train])}): --data_dir "
            f"{utils.shell_join([os.path.join(data_dir, train)])}{evaluate}")


def _set_inside(data_dir: str, inside: dict[str, list[str]]) -> str | None:
    """What to do, where a "class" holds folders named like two or more of the other classes
    (DATA/test/{cats,dogs} beside DATA/cats and DATA/dogs: a held-out set kept inside the data
    folder, which would train as a class of its own); None otherwise."""
    for name, folders in inside.items():
        inner = [n for n in folders if n in inside and n != name]
        if len(inner) >= 2:
            return (f"class folder {name} holds folders named like the classes ({_some(inner)}): a held-out set inside "
                    f"the data folder would train as a class of its own; move "
                    f"{utils.shell_join([os.path.join(data_dir, name)])} out of it (and evaluate on it with "
                    f"hw2_eval.py --test_data_path)")
    return None


def _subfolders(folder: str) -> list[str]:
    return sorted(e.name for e in _list_dir(folder) if _is(e.is_dir))


def _some(names: Sequence[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def subfolders_hint(folder: str) -> str:
    """For a data_dir with one class folder: the command to use if the folders inside it are the
    classes (DATA/train/<class> given as DATA), else ''."""
    inside = _subfolders(folder)
    if len(inside) < 2:
        return ""
    return f" (if the folders inside it, {_some(inside)}, are the classes: --data_dir {utils.shell_join([folder])})"


def _check_all(data_dir: str, rels: list[str], min_size: int, workers: int) -> list[ImageInfo]:
    """inspect_image of each file; one unchanged since an earlier scan keeps that scan's verdict
    (check_cache.py)."""
    paths = [os.path.join(data_dir, rel) for rel in rels]
    stamps = [decode_cache.file_stamp(p) for p in paths]
    known = check_cache.load(data_dir, min_size)
    infos = [ImageInfo(*known[rel][1]) if stamp is not None and rel in known and known[rel][0] == stamp else None
             for rel, stamp in zip(rels, stamps)]
    todo = [i for i, found in enumerate(infos) if found is None]
    checked = _map(lambda i: inspect_image(paths[i], min_size), todo, workers, f"checking the images in {data_dir}")
    for i, found in zip(todo, checked):
        infos[i] = found
        if stamps[i] is not None and check_cache.keeps(found.problem):
            known[rels[i]] = stamps[i], tuple(found)
    if todo:
        current = set(rels)
        check_cache.save(data_dir, min_size, {rel: e for rel, e in known.items() if rel in current})
    return infos


def unsupported(ext: str) -> str:
    """Why a file with this extension is skipped."""
    if ext.lower() in ARCHIVE_EXTENSIONS:
        return f"an archive ({ext}): extract it to use its images"
    if ext.lower() in CONVERT_FIRST:
        return f"unsupported format ({ext}): convert {CONVERT_FIRST[ext.lower()]} to JPEG first"
    return f"unsupported format ({ext or 'no extension'})"


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


def _map(fn, values: Sequence, workers: int, what: str = "") -> list:
    """fn over values in a thread pool: PIL decoding and hashing release the GIL. `what` names
    the work in a log line and a progress bar when there is a lot of it."""
    if workers <= 1 or len(values) < 2:
        return [fn(v) for v in values]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(fn, values, chunksize=16)
        return list(utils.progress(results, len(values), "files", what) if what else results)


def check_image(path: str, min_size: int = 8) -> str | None:
    """Why the image file at path cannot be used, or None when it decodes and is big enough."""
    return inspect_image(path, min_size).problem


def inspect_image(path: str, min_size: int = 8) -> ImageInfo:
    """Size, format and mode of the image file at path, and why it cannot be used (or None)."""
    info = ImageInfo()
    try:
        if os.path.getsize(path) == 0:
            return info._replace(problem="empty file")
        with open_image(path) as img:
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
            elif img.format == "HEIF":
                # Its embedded thumbnail where it has one (see read_image): what training decodes at
                # sizes up to the thumbnail's. A damaged photo behind a good thumbnail goes unnoticed
                # here, and is skipped with a warning if a run ever needs its full size.
                img.draft(img.mode, (min_size, min_size))
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
            with open_image(os.path.join(data_dir, rel)) as img:
                sides.append(min(img.size))
        except (OSError, ValueError, Image.DecompressionBombError):  # broke since the scan: the others decide
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


def class_key(name: str) -> str:
    """A class name as people mean it: case, spacing, '_' and '-' aside."""
    return " ".join(name.casefold().replace("_", " ").replace("-", " ").split())


def lookalike_note(class_names: Sequence[str]) -> str | None:
    """One line naming class folders whose names differ only in case, spaces, '_' or '-' (Cat, cat,
    "sea_lion", "Sea Lion": folders merged from two sources), which train as different classes;
    None where there are none."""
    groups = defaultdict(list)
    for name in class_names:
        groups[class_key(name)].append(name)
    alike = [" and ".join(f"'{n}'" for n in names) for names in groups.values() if len(names) > 1]
    if not alike:
        return None
    return (f"class folders {'; '.join(alike)} differ only in case, spaces, '_' or '-': each is a class of its own "
            f"(merge them into one folder if they hold the same thing)")


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
    save_split(path, {"version": SPLIT_VERSION, "data_dir": os.path.abspath(scan.data_dir),
                      "class_names": list(scan.class_names), "seed": seed, "val_fraction": val_fraction,
                      "folds": folds, "fold": fold, "train": train, "val": val, "bad": scan.bad})


def save_split(path: str, doc: dict) -> None:
    """A split document (write_split's, or load_split's changed) to path, atomically."""
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
        raise UserError(f"split file {path} lists {count(len(both), 'file')} in both train and val, "
                        f"e.g. {min(both)[0]}")

    # The file stores an absolute data_dir, but a hand-written one may be relative to the file.
    data_dir = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(str(doc["data_dir"])))
    doc["data_dir"] = os.path.normpath(data_dir)
    if check_files:
        check_split_files(doc, path)
    return doc


def check_split_files(split: dict, path: str) -> None:
    """UserError unless every train/val file of the split (read from `path`) is in its data_dir."""
    if not os.path.isdir(split["data_dir"]):
        raise UserError(f"split file {path} points at data_dir {split['data_dir']}, which is not a folder")
    gone = missing_files(split)
    if gone:
        raise UserError(f"split file {path} names {count(len(gone), 'missing file')}, e.g. {gone[0]} (deleted or "
                        "moved since the split was made?)")


def missing_files(split: dict) -> list[str]:
    """The split's train/val files that are not in its data_dir, sorted."""
    return sorted(rel for rel, _ in split["train"] + split["val"]
                  if not os.path.isfile(os.path.join(split["data_dir"], rel)))


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

def open_image(path: str) -> Image.Image:
    """Image.open with the size guard of PIXEL_LIMIT / JPEG_PIXEL_LIMIT (DecompressionBombError)."""
    img = Image.open(path)
    w, h = img.size
    if img.format != "JPEG" and w * h > PIXEL_LIMIT:
        img.close()
        raise Image.DecompressionBombError(f"{w}x{h} pixels, over {PIXEL_LIMIT:,} for a {img.format} image")
    return img


def read_image(path: str, short_side: int | None = None) -> np.ndarray:
    """Decode any supported image to uint8 RGB [H, W, 3], upright, optionally resized so min(H, W) == short_side.

    Runs keep what this returns on disk (decode_cache.py): a change to the pixels it gives for a
    file must bump decode_cache.VERSION."""
    path = os.fsdecode(path)  # tf.numpy_function hands strings over as bytes
    if short_side is not None:
        short_side = int(short_side)
        if short_side < 1:
            raise ValueError(f"short_side must be positive, got {short_side}")
    try:
        with open_image(path) as img:
            if short_side and img.format in ("JPEG", "HEIF"):
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, never below short_side: a 24-megapixel
                # photo then costs a fraction of the time and memory of a full decode plus resize.
                # A HEIC decodes its embedded thumbnail instead (pillow-heif's draft) where that is a
                # scaled copy at least short_side high and wide: an iPhone's 320x240 one decodes in
                # ~12 ms where its 12-megapixel photo takes ~420.
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
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: too large: {_short(e)}") from None
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
    groups: dict[str, list[str]] = defaultdict(list)
    for rel, digest in zip(paths, _map(lambda rel: _sha1(os.path.join(scan.data_dir, rel)), paths, workers)):
        groups[digest].append(rel)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def files_also_in(data_dir: str, items: Sequence[Item], other_dir: str, others: Sequence[Item],
                  workers: int = 8) -> list[str]:
    """The items (relative paths) whose bytes equal one of `others`' (a test folder against the
    training split); as find_duplicates, only files of a size both share are read."""
    def sizes(root, entries):
        out = defaultdict(list)
        for rel, _ in entries:
            try:
                out[os.path.getsize(os.path.join(root, rel))].append(os.path.join(root, rel))
            except OSError:
                continue
        return out
    mine, theirs = sizes(data_dir, items), sizes(other_dir, others)
    common = [size for size in mine if size in theirs]
    theirs_read = [p for size in common for p in theirs[size]]
    known = set(_map(_sha1_or_none, theirs_read, workers)) - {None}
    candidates = [p for size in common for p in mine[size]]
    digests = _map(_sha1_or_none, candidates, workers)
    return sorted(os.path.relpath(p, data_dir) for p, digest in zip(candidates, digests) if digest in known)


def _sha1_or_none(path: str) -> str | None:
    """_sha1, or None for a file that went away or cannot be read (it is then nobody's copy)."""
    try:
        return _sha1(path)
    except OSError:
        return None


def _sha1(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    print(f"checked {scan.data_dir}: {count(len(scan.items), 'usable image')} in "
          f"{count(len(scan.class_names), 'class')}, {count(len(scan.bad), 'bad file')}, "
          f"{count(n_dup, 'group')} of duplicates")
    if args.out is not None and not empty:
        _split_command(args, scan)
    return 1 if scan.bad or empty else 0


def _report_command(args: argparse.Namespace) -> int:
    import time
    start = time.perf_counter()
    scan = _scan(args.data_dir, True, args.min_size, args.workers)
    import dataset_report
    paths = dataset_report.write_report(scan, args.report, args.workers, args.seed, time.perf_counter() - start)
    print(f"{count(len(scan.items), 'usable image')} in {count(len(scan.class_names), 'class')}, "
          f"{count(len(scan.bad), 'unusable file')}; wrote {', '.join(paths)} in {time.perf_counter() - start:.1f}s")
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
    args = parser.parse_args(utils.underscored(sys.argv[1:] if argv is None else argv))
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
