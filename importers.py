"""Turn CIFAR-10 and MNIST files a user already has into class folders, official parts kept apart.

    python hw2_dataset.py --import cifar10 PATH --out DIR   # PATH: cifar-10-batches-py/-bin folder
    python hw2_dataset.py --import mnist PATH --out DIR     # PATH: folder of the four idx files

Writes DIR/train/<class>/<n>.png and DIR/test/<class>/<n>.png: train on DIR/train, evaluate the
best checkpoint on DIR/test (hw2_eval.py --test_data_path DIR/test).
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
from PIL import Image

from utils import UserError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def import_dataset(kind: str, path: str, out_dir: str) -> dict[str, int]:
    """Images written per part, e.g. {'train': 50000, 'test': 10000}."""
    if kind == "cifar10":
        parts, names = read_cifar10(path)
    elif kind == "mnist":
        parts, names = read_mnist(path), [str(d) for d in range(10)]
    else:
        raise UserError(f"--import {kind}: expected cifar10 or mnist")
    return {part: write_folders(images, labels, names, os.path.join(out_dir, part))
            for part, (images, labels) in parts.items()}


def write_folders(images: np.ndarray, labels: np.ndarray, names: list[str], out_dir: str) -> int:
    for name in names:
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(os.path.join(out_dir, names[int(label)], f"{i:05d}.png"))
    return len(images)


# ------------------------------------------------------------------------------------- CIFAR-10

def read_cifar10(path: str) -> tuple[dict, list[str]]:
    """{'train': (uint8 [N,32,32,3], labels), 'test': ...} from the python or binary batches."""
    folder = _find_folder(path, ("data_batch_1", "data_batch_1.bin"), "CIFAR-10 batches")
    binary = os.path.isfile(os.path.join(folder, "data_batch_1.bin"))
    ext = ".bin" if binary else ""
    parts = {}
    for part, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        batches = [(_cifar_binary if binary else _cifar_pickle)(_need(folder, f + ext)) for f in files]
        parts[part] = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    return parts, _cifar_names(folder, binary)


def _cifar_pickle(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data, labels = np.asarray(batch[b"data"], np.uint8), np.asarray(batch[b"labels"], np.int64)
    except Exception as e:
        raise UserError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise UserError(f"{path}: expected data [N, 3072] and N labels, got {data.shape} and {len(labels)}")
    return _cifar_images(data), labels


def _cifar_binary(path: str) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise UserError(f"{path}: {raw.size} bytes is not a whole number of 3073-byte CIFAR-10 records")
    records = raw.reshape(-1, 3073)
    return _cifar_images(records[:, 1:]), records[:, 0].astype(np.int64)


def _cifar_images(data: np.ndarray) -> np.ndarray:
    # Each row is the red plane, then green, then blue, each 32x32 in row-major order.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def _cifar_names(folder: str, binary: bool) -> list[str]:
    meta = os.path.join(folder, "batches.meta.txt" if binary else "batches.meta")
    try:
        if binary:
            with open(meta) as f:
                names = [line.strip() for line in f if line.strip()]
        else:
            with open(meta, "rb") as f:
                names = [n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"]]
        return names if len(names) == 10 else CIFAR10_CLASSES
    except Exception:  # the meta file is optional: the ten names are fixed
        return CIFAR10_CLASSES


# ---------------------------------------------------------------------------------------- MNIST

def read_mnist(path: str) -> dict:
    """{'train': (uint8 [N,28,28], labels), 'test': ...} from idx files, gzipped or not."""
    folder = _find_folder(path, ("train-images-idx3-ubyte", "train-images-idx3-ubyte.gz",
                                 "train-images.idx3-ubyte"), "MNIST idx files")
    parts = {}
    for part, (images_name, labels_name) in MNIST_FILES.items():
        images = _read_idx(_mnist_file(folder, images_name), 3)
        labels = _read_idx(_mnist_file(folder, labels_name), 1)
        if len(images) != len(labels):
            raise UserError(f"{folder}: {part} has {len(images)} images but {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise UserError(f"{_mnist_file(folder, labels_name)}: labels must be 0..9, found {labels.max()}")
        parts[part] = (images, labels.astype(np.int64))
    return parts


def _mnist_file(folder: str, name: str) -> str:
    # The same files circulate as name, name.gz and with a '.' before 'idx'.
    for candidate in (name, name + ".gz", name.replace("-idx", ".idx"), name.replace("-idx", ".idx") + ".gz"):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    raise UserError(f"missing MNIST file {name}[.gz] in {folder}")


def _read_idx(path: str, ndim: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if len(data) < 4 + 4 * ndim:
        raise UserError(f"{path}: too short for an idx header")
    zero, dtype, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or dims != ndim:
        raise UserError(f"{path}: not an idx file of {ndim}-d unsigned bytes (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise UserError(f"{path}: header says {shape} ({int(np.prod(shape))} bytes), file has {body.size}")
    return body.reshape(shape)


def _find_folder(path: str, markers: tuple[str, ...], what: str) -> str:
    """PATH itself or a direct sub-folder (the extracted archive's top folder) holding a marker file."""
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a folder (extract the archive first: tar xzf / gunzip)")
    candidates = [path] + sorted(os.path.join(path, d) for d in os.listdir(path)
                                 if os.path.isdir(os.path.join(path, d)))
    for folder in candidates:
        if any(os.path.isfile(os.path.join(folder, m)) for m in markers):
            return folder
    raise UserError(f"no {what} in {path}: expected {markers[0]} there or in a sub-folder")


def _need(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise UserError(f"missing CIFAR-10 file {name} in {folder}")
    return path
