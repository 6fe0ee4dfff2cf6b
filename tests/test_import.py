"""--import cifar10 / mnist on small generated files in the official formats."""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

import hw2_dataset


def cifar_python(folder, n=4):
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        batches[name] = (data, labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in "abcdefghij"]}, f)
    return batches


def test_cifar10_python_batches_become_train_and_test_folders(tmp_path, capsys):
    batches = cifar_python(str(tmp_path / "cifar-10-batches-py"))
    out = str(tmp_path / "out")
    assert hw2_dataset.main(["--import", "cifar10", str(tmp_path), "--out", out]) == 0
    assert "20 train images" in capsys.readouterr().out
    data, labels = batches["test_batch"]
    image = np.array(Image.open(os.path.join(out, "test", "abcdefghij"[labels[1]], "00001.png")))
    # channel planes: R = data[:1024], G = data[1024:2048], B = data[2048:]
    assert image.shape == (32, 32, 3)
    assert (image[0, 5] == data[1, [5, 1024 + 5, 2048 + 5]]).all()
    assert sum(len(os.listdir(os.path.join(out, "train", c))) for c in "abcdefghij") == 20


def test_cifar10_binary_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = rng.integers(0, 256, (3, 3073), dtype=np.uint8)
        records[:, 0] = [0, 9, 3]
        records.tofile(folder / name)
    out = str(tmp_path / "out")
    assert hw2_dataset.main(["--import", "cifar10", str(folder), "--out", out]) == 0
    assert len(os.listdir(os.path.join(out, "test", "truck"))) == 1  # the built-in names


def test_cifar10_missing_or_malformed_file_is_named(tmp_path, capsys):
    cifar_python(str(tmp_path / "c"))
    os.remove(tmp_path / "c" / "data_batch_3")
    assert hw2_dataset.main(["--import", "cifar10", str(tmp_path / "c"), "--out", str(tmp_path / "o")]) == 2
    assert "missing CIFAR-10 file data_batch_3" in capsys.readouterr().err
    (tmp_path / "c" / "data_batch_3").write_bytes(b"not a pickle")
    assert hw2_dataset.main(["--import", "cifar10", str(tmp_path / "c"), "--out", str(tmp_path / "o")]) == 2
    assert "data_batch_3: not a CIFAR-10 python batch" in capsys.readouterr().err


def idx(path, array, gz):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_become_train_and_test_folders(tmp_path, gz):
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    images = rng.integers(0, 256, (5, 28, 28))
    labels = np.array([0, 1, 1, 7, 9])
    idx(tmp_path / f"train-images-idx3-ubyte{ext}", images, gz)
    idx(tmp_path / f"train-labels-idx1-ubyte{ext}", labels, gz)
    idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", images[:2], gz)
    idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", labels[:2], gz)
    out = str(tmp_path / "out")
    assert hw2_dataset.main(["--import", "mnist", str(tmp_path), "--out", out]) == 0
    saved = np.array(Image.open(os.path.join(out, "train", "7", "00003.png")))
    assert saved.shape == (28, 28) and (saved == images[3]).all()  # grayscale stays one channel
    assert sorted(os.listdir(os.path.join(out, "test"))) == [str(d) for d in range(10)]
    assert len(os.listdir(os.path.join(out, "test", "1"))) == 1


def test_mnist_errors_name_the_file(tmp_path, capsys):
    idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28)), False)
    assert hw2_dataset.main(["--import", "mnist", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "missing MNIST file train-labels-idx1-ubyte" in capsys.readouterr().err
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    assert hw2_dataset.main(["--import", "mnist", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "train-labels-idx1-ubyte: header says (5,)" in capsys.readouterr().err
