"""The tf.data pipelines and augmentations, on small real image files written into tmp_path."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

import augmentation
import hw2_dataset
import hw2_input
import utils
from helpers import WindowsLocks, items_of, make_image_folder
from utils import UserError

S = 16  # the [tiny] network input size: small keeps the whole file fast on 2 cores


def config(section: str = "tiny", **overrides) -> utils.Config:
    """A full config, as the scripts build it: a missing key is a bug the code must not paper over."""
    return utils.load_config(section, {k: str(v) for k, v in overrides.items()})


CFG = config()
OFF = {"scale_max": 1.0, "eval_scale": 1.0, "flip_lr": False, "brightness": 0.0, "contrast": 0.0}
ALL_OFF = config(**OFF)


def folder(root, per_class: int, classes=("c0", "c1"), noise: float = 80.0, **kwargs) -> list[tuple[str, int]]:
    """make_image_folder's files as (relative path, label) items, classes in order; strong noise,
    so that every image keeps a standard deviation that per-image standardization scales to 1."""
    make_image_folder(root, classes, per_class, noise=noise, **kwargs)
    return items_of(root)


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def batches(ds: tf.data.Dataset, n: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    ds = ds if n is None else ds.take(n)
    return [(x.numpy(), y.numpy()) for x, y in ds]


def assert_standardized(images: np.ndarray) -> None:
    flat = images.reshape(len(images), -1)
    np.testing.assert_allclose(flat.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(flat.std(axis=1), 1.0, atol=1e-3)


# -------------------------------------------------------------------------------------- eval

def test_eval_yields_each_example_once_in_order(tmp_path):
    items = folder(tmp_path, 7)
    out = batches(hw2_input.eval_dataset(str(tmp_path), items, CFG, batch_size=4))
    assert [len(y) for _, y in out] == [4, 4, 4, 2]
    labels = np.concatenate([y for _, y in out])
    assert labels.tolist() == [label for _, label in items]
    for x, y in out:
        assert x.dtype == np.float32 and x.shape[1:] == (S, S, 3) and y.dtype == np.int32
        assert_standardized(x)


def test_eval_num_examples_is_a_seeded_sample_across_all_classes(tmp_path):
    items = folder(tmp_path, 6, classes=("a", "b", "c", "d"))  # sorted by class: the first 8 are a and b
    sample = hw2_input.sample_items(items, 8, seed=0)
    assert len(sample) == 8 and sample == sorted(sample) and set(sample) <= set(items)
    assert len({label for _, label in sample}) >= 3
    assert sample == hw2_input.sample_items(items, 8, seed=0)
    assert sample != hw2_input.sample_items(items, 8, seed=1)
    assert hw2_input.sample_items(items, 30, seed=0) == items == hw2_input.sample_items(items, None, 0)

    ds = hw2_input.eval_dataset(str(tmp_path), items, CFG, batch_size=4, num_examples=8)
    first, second = batches(ds), batches(ds)  # second pass reads the cache
    assert [len(y) for _, y in first] == [4, 4]
    assert np.concatenate([y for _, y in first]).tolist() == [label for _, label in sample]
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_no_items_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no images"):
        hw2_input.eval_dataset(str(tmp_path), [], CFG, batch_size=4)
    with pytest.raises(UserError, match="no images"):
        hw2_input.train_dataset(str(tmp_path), [], CFG, batch_size=4)


@pytest.mark.parametrize("cache_mb", [1024, 0])
def test_unreadable_file_is_skipped_with_a_warning(tmp_path, caplog, cache_mb):
    items = folder(tmp_path, 3)
    (tmp_path / "c0" / "bad.png").write_bytes(b"this is not a png")
    items.insert(2, ("c0/bad.png", 0))
    cfg = config(cache_images_mb=cache_mb)
    with caplog.at_level(logging.WARNING):
        labels = np.concatenate([y for _, y in batches(hw2_input.eval_dataset(str(tmp_path), items, cfg, 4))])
        train = batches(hw2_input.train_dataset(str(tmp_path), items, cfg, batch_size=4), n=3)
    assert labels.tolist() == [label for rel, label in items if rel != "c0/bad.png"]
    assert len(train) == 3
    warnings = [r.getMessage() for r in caplog.records if "bad.png" in r.getMessage()]
    assert warnings and "skipping unreadable image" in warnings[0]
    assert len(warnings) == 1  # once per file, not once per epoch or per pipeline


def test_a_second_run_reads_the_decoded_images_back_and_decodes_only_changed_files(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "data"
    items = folder(data, 4)
    reads = []
    real_read = hw2_input.read_image
    monkeypatch.setattr(hw2_input, "read_image", lambda path, **kw: reads.append(path) or real_read(path, **kw))

    def preload(items, cfg=CFG):
        reads.clear()
        flat, offsets, shapes, labels = hw2_input._preload(str(data), items, cfg)
        images = [flat.numpy()[offsets[k]:offsets[k + 1]].reshape(shapes[k]) for k in range(len(labels))]
        return images, labels.tolist(), sorted(os.path.relpath(p, data) for p in reads)

    first, labels, decoded = preload(items)
    assert len(decoded) == 8 and labels == [label for _, label in items]
    again, labels_again, decoded = preload(items)
    assert decoded == [] and labels_again == labels
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    # A fold's subset reads back too, and so does evaluation; a rewritten file, and only it, decodes again.
    assert preload(items[::2])[2] == []
    reads.clear()
    positions = [i.numpy() for *_, i in hw2_input.eval_dataset(str(data), items[1:], CFG, 3, with_index=True)]
    assert reads == [] and np.concatenate(positions).tolist() == list(range(7))
    changed = data / items[1][0]
    new_pixels = random_image(30, 22, seed=5)
    hw2_dataset.Image.fromarray(new_pixels).save(changed, format="PNG" if changed.suffix == ".png" else "JPEG")
    os.utime(changed, ns=(1, 1))
    images, _, decoded = preload(items)
    assert decoded == [items[1][0]]
    assert np.array_equal(images[1], real_read(str(changed), short_side=hw2_input.base_short_side(CFG)))
    # Off by the config, or the cache file damaged: everything decodes, nothing fails.
    assert len(preload(items, config(decode_cache=False))[2]) == 8
    for f in os.listdir(tmp_path / "cache" / "hw2" / "decoded"):
        (tmp_path / "cache" / "hw2" / "decoded" / f).write_bytes(b"not an npz")
    images, _, decoded = preload(items)
    assert len(decoded) == 8 and all(np.array_equal(a, b) for a, b in zip(images, preload(items)[0]))


def test_a_folder_too_big_for_ram_decodes_each_image_once_then_reads_it_from_disk(tmp_path, monkeypatch):
    """Beyond cache_images_mb, decode_store keeps each decoded image in a file: the stream is the
    one a decode every pass gives, bit for bit, each file decodes once per run and not at all in the
    next run, a changed file decodes again, and a second process reads without writing."""
    import decode_store
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(decode_store, "_stores", {})
    data = str(tmp_path / "data")
    items = folder(data, 4)
    reads = []
    real_read = hw2_input.read_image
    monkeypatch.setattr(hw2_input, "read_image", lambda path, **kw: reads.append(os.path.relpath(path, data))
                        or real_read(path, **kw))
    streamed, stored = config(cache_images_mb=0, decode_cache=False), config(cache_images_mb=0)

    def train(cfg):  # 12 examples of 8 files: epoch 2 asks for 4 of them again
        reads.clear()
        return batches(hw2_input.train_dataset(data, items, cfg, batch_size=4), n=3), sorted(reads)

    def evaluate(cfg):
        reads.clear()
        return batches(hw2_input.eval_dataset(data, items, cfg, batch_size=3)), sorted(reads)

    want, decoded = train(streamed)
    assert len(decoded) > 8  # the reference decodes files again in its second epoch
    got, decoded = train(stored)
    assert decoded == sorted(path for path, _ in items)  # each once, although 12 were drawn
    for (x1, y1), (x2, y2) in zip(want, got):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    want_eval = evaluate(streamed)[0]
    assert evaluate(stored)[1] == []  # this run stored them all while training

    decode_store.close_all()  # the next run: the index on disk is all it has
    got, decoded = train(stored)
    assert decoded == [] and all(np.array_equal(a[0], b[0]) for a, b in zip(want, got))
    got_eval, decoded = evaluate(stored)
    assert decoded == [] and all(np.array_equal(a[0], b[0]) for a, b in zip(want_eval, got_eval))

    changed = os.path.join(data, items[1][0])
    hw2_dataset.Image.fromarray(random_image(30, 22, seed=5)).save(changed, format="PNG" if changed.endswith(".png") else "JPEG")
    os.utime(changed, ns=(1, 1))
    decode_store.close_all()
    assert evaluate(stored)[1] == [items[1][0]]
    assert evaluate(stored)[1] == []

    # A second process (here: a second store on the same file) finds the lock taken: it reads what is
    # stored and decodes the rest without storing.
    writer = decode_store.open_store(data, hw2_input.base_short_side(stored), hw2_input._read_or_skip)
    reader = decode_store.Store(data, writer.short_side, hw2_input._read_or_skip)
    assert writer.writable and not reader.writable
    new = os.path.join(data, "c0", "new.png")
    hw2_dataset.Image.fromarray(random_image(20, 20, seed=6)).save(new)
    for path in (os.path.join(data, items[0][0]), new, new):
        image, ok = reader.get(os.fsencode(path), writer.short_side)
        assert ok and np.array_equal(image, real_read(path, short_side=writer.short_side))
    assert reads.count("c0/new.png") == 2 and "c0/new.png" not in reader.index
    # Once the writer has stored it and written its index, the reader takes it from there.
    writer.get(os.fsencode(new), writer.short_side)
    writer.save_index()
    monkeypatch.setattr(decode_store, "INDEX_EVERY_S", 0.0)
    reads.clear()
    image, ok = reader.get(os.fsencode(new), writer.short_side)
    assert reads == [] and np.array_equal(image, real_read(new, short_side=writer.short_side))
    reader.close()
    os.remove(new)

    # An index never points into another data file, even one of the same size: the folder's file
    # pruned and made again by a later run, while an old run still writes the old index.
    decode_store.close_all()
    with open(writer.index_path, "rb") as f:
        old_index = f.read()
    os.remove(writer.data_path)
    assert len(evaluate(stored)[1]) == len(items)
    decode_store.close_all()
    with open(writer.index_path, "wb") as f:
        f.write(old_index)
    assert len(evaluate(stored)[1]) == len(items)

    # A data file cut short (the disk, another run's pruning) loses the images past its end, no more.
    decode_store.close_all()
    os.truncate(writer.data_path, os.path.getsize(writer.data_path) // 2)
    decoded = evaluate(stored)[1]
    assert 0 < len(decoded) < len(items)
    decode_store.close_all()
    with open(writer.index_path, "wb") as f:
        f.write(b"not an npz")
    assert len(evaluate(stored)[1]) == len(items)


def test_the_decoded_image_store_starts_afresh_once_changed_files_fill_most_of_it(tmp_path, monkeypatch):
    """A few changed files leave their old pixels in the store; once the changed or deleted files'
    pixels outweigh the live ones, the next run starts a new file, and a process still reading the
    old one keeps getting the right pixels."""
    import decode_store
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(decode_store, "_stores", {})
    monkeypatch.setattr(decode_store, "STALE_BYTES_KEPT", 0)
    data = str(tmp_path / "data")
    items = folder(data, 4)
    paths = [os.path.join(data, rel) for rel, _ in items]
    short_side = hw2_input.base_short_side(CFG)

    def store():
        decode_store.close_all()
        s = decode_store.open_store(data, short_side, hw2_input._read_or_skip)
        for p in paths:
            s.get(os.fsencode(p), short_side)
        return s

    def rewrite(k):
        hw2_dataset.Image.fromarray(random_image(30, 22, seed=10 + k)).save(paths[k], format="PNG" if paths[k].endswith(".png") else "JPEG")
        os.utime(paths[k], ns=(k + 1, k + 1))

    first = store()
    size, inode = os.path.getsize(first.data_path), os.stat(first.data_path).st_ino
    first.save_index()
    early = decode_store.Store(data, short_side, hw2_input._read_or_skip)  # another process, reading
    last = paths[-1]  # the last image stored
    last_pixels, _ = early.get(os.fsencode(last), short_side)
    rewrite(0)
    os.remove(last)
    paths[-1] = os.path.join(data, "c0", "new.png")
    hw2_dataset.Image.fromarray(random_image(40, 30, seed=9)).save(paths[-1])
    second = store()  # 2 of 8 images stale: kept; the changed one and the new one appended
    assert os.stat(second.data_path).st_ino == inode and len(second.index) == 8
    assert os.path.getsize(second.data_path) > size
    # ...after the stale ones: what the other process read by offset is still there.
    assert np.array_equal(early.get(os.fsencode(last), short_side)[0], last_pixels)
    early.close()

    reader = decode_store.Store(data, short_side, hw2_input._read_or_skip)  # another process, still reading
    for k in (1, 2, 3, 4):
        rewrite(k)
    third = store()  # 6 of the 10 stored stale: a new file
    for p in (paths[5], paths[6]):
        assert np.array_equal(reader.get(os.fsencode(p), short_side)[0], hw2_input.read_image(p, short_side=short_side))
    assert os.stat(third.data_path).st_ino != inode and len(third.index) == 8
    assert os.path.getsize(third.data_path) == decode_store.HEADER_SIZE + sum(
        int(np.prod(shape)) for _, _, shape in third.index.values())
    reader.close()
    decode_store.close_all()


def test_on_windows_the_decoded_image_store_works_without_pread_and_flock(tmp_path, monkeypatch):
    """Windows has neither os.pread/os.pwrite nor flock: the store seeks and reads under a lock and
    takes msvcrt's lock on a byte past its data (Windows locks are mandatory: a reader could not read
    a locked byte), so a folder too big for RAM decodes once there too."""
    import decode_store
    import file_lock
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(decode_store, "_stores", {})
    monkeypatch.setattr(decode_store, "STALE_BYTES_KEPT", 0)
    monkeypatch.setattr(decode_store, "WINDOWS", True)
    locks = WindowsLocks()
    monkeypatch.setattr(file_lock, "fcntl", None)
    monkeypatch.setattr(file_lock, "msvcrt", locks)
    monkeypatch.delattr(os, "pread")
    monkeypatch.delattr(os, "pwrite")
    monkeypatch.setattr(os, "unlink", locks.unlink)
    data = str(tmp_path / "data")
    paths = [os.path.join(data, rel) for rel, _ in folder(data, 3)]
    short_side = hw2_input.base_short_side(CFG)
    decoded = []

    def read(path, side):
        decoded.append(path)
        return hw2_input._read_or_skip(path, side)

    def check(store, paths):
        for p in paths:
            image, ok = store.get(os.fsencode(p), short_side)
            assert ok and np.array_equal(image, hw2_input.read_image(p, short_side=short_side))

    writer = decode_store.Store(data, short_side, read)
    check(writer, paths + paths)
    assert writer.writable and len(decoded) == len(paths)  # each once
    writer.save_index()
    assert all(offset > os.path.getsize(writer.data_path) for _, _, offset in locks.held)
    other = decode_store.Store(data, short_side, read)  # another handle: refused the lock, reads
    decoded.clear()
    check(other, paths)
    assert not other.writable and decoded == []
    other.close()
    writer.close()
    # Most files changed: the next run deletes the old file (closed first: Windows deletes no open
    # file) and starts a new one.
    for k, p in enumerate(paths[:4]):
        hw2_dataset.Image.fromarray(random_image(30, 22, seed=20 + k)).save(p, format="PNG" if p.endswith(".png") else "JPEG")
        os.utime(p, ns=(k + 1, k + 1))
    decoded.clear()
    again = decode_store.Store(data, short_side, read)
    check(again, paths + paths)
    assert again.writable and again.file_id != writer.file_id and len(decoded) == len(paths)
    assert os.path.getsize(again.data_path) == decode_store.HEADER_SIZE + sum(
        int(np.prod(shape)) for _, _, shape in again.index.values())
    again.close()


def test_decode_dataset_gives_uint8_at_base_short_side(tmp_path):
    items = folder(tmp_path, 2)[:3]
    side = augmentation.base_short_side(CFG)
    for (image, label), (_, want) in zip(hw2_input.decode_dataset(str(tmp_path), items, CFG), items):
        assert image.dtype == tf.uint8 and min(image.shape[:2]) == side and image.shape[2] == 3
        assert label.numpy() == want


# ------------------------------------------------------------------------------------- train

def test_train_batches_are_static_and_repeat(tmp_path):
    items = folder(tmp_path, 2, classes=("a", "b", "c"))  # fewer items than one batch: repeat must fill it
    ds = hw2_input.train_dataset(str(tmp_path), items, CFG, batch_size=8)
    assert ds.element_spec[0].shape.as_list() == [8, S, S, 3]
    assert ds.element_spec[1].shape.as_list() == [8] and ds.element_spec[1].dtype == tf.int32
    out = batches(ds, n=4)  # 32 examples from 5 files: several epochs
    for x, y in out:
        assert x.shape == (8, S, S, 3) and np.isfinite(x).all()
        assert set(y.tolist()) <= {0, 1, 2}
        assert_standardized(x)


def test_train_same_seed_reproduces_and_other_seed_differs(tmp_path):
    items = folder(tmp_path, 6)

    def first_batch(seed):
        return batches(hw2_input.train_dataset(str(tmp_path), items, config(seed=seed), 4), n=1)[0]

    a, b, c = first_batch(0), first_batch(0), first_batch(1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_input_context_pipelines_read_disjoint_shards(tmp_path):
    items = [(rel, i) for i, (rel, _) in enumerate(folder(tmp_path, 5))]  # label = file index identifies it
    seen = []
    for pipeline_id in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                         num_replicas_in_sync=2)
        ds = hw2_input.train_dataset(str(tmp_path), items, CFG, batch_size=2, input_context=ctx)
        assert ds.element_spec[0].shape[0] == 1  # the global batch of 2, split over 2 replicas
        # One epoch: the pipelines share each epoch's permutation, taking alternate positions.
        seen.append({int(v) for _, y in batches(ds, n=5) for v in y})
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(10))


def test_non_ascii_names_scan_split_and_decode(tmp_path, caplog):
    data = tmp_path / "données"
    make_image_folder(data, ("café", "猫"), per_class=3, noise=80.0)
    (data / "café" / "0.png").rename(data / "café" / "naïve ü 0.png")
    (data / "猫" / "sub ñ").mkdir()
    (data / "猫" / "1.jpg").rename(data / "猫" / "sub ñ" / "写真 1.jpg")
    names = {"café/naïve ü 0.png", "猫/sub ñ/写真 1.jpg"}
    try:  # a name that is not UTF-8 (Latin-1 from an old camera or zip): kept as the bytes on disk
        os.rename(data / "猫" / "2.png", os.fsencode(data / "猫") + b"/caf\xe9.png")
        names.add("猫/" + os.fsdecode(b"caf\xe9.png"))
    except (OSError, UnicodeError):  # file systems that insist on UTF-8 names
        pass

    scan = hw2_dataset.scan_dataset(str(data))
    assert scan.class_names == ["café", "猫"] and not scan.bad
    assert names <= {rel for rel, _ in scan.items} and len(scan.items) == 6
    train, val = hw2_dataset.make_split(scan.items, val_fraction=0.5)
    split_path = str(tmp_path / "split.json")
    hw2_dataset.write_split(split_path, scan, train, val, seed=0, val_fraction=0.5)
    doc = hw2_dataset.load_split(split_path)
    assert (doc["class_names"], doc["train"], doc["val"]) == (["café", "猫"], train, val)

    with caplog.at_level(logging.WARNING):
        decoded = list(hw2_input.decode_dataset(doc["data_dir"], scan.items, CFG))
        streamed = batches(hw2_input.train_dataset(doc["data_dir"], scan.items, config(cache_images_mb=0), 6), 1)
    assert [int(label) for _, label in decoded] == [label for _, label in scan.items]
    assert streamed[0][0].shape == (6, S, S, 3) and not caplog.records  # every file read, none skipped


# ----------------------------------------------------------------------- class_balance sampler

def imbalanced(root) -> list[tuple[str, int]]:
    """12, 3 and 1 images in classes a, b and c."""
    for seed, (name, n) in enumerate((("a", 12), ("b", 3), ("c", 1))):
        make_image_folder(root, (name,), n, seed=seed, noise=80.0)
    return items_of(root)


def flat(ds: tf.data.Dataset, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first n batches, unbatched: (images, labels) of examples in stream order."""
    out = batches(ds, n)
    return np.concatenate([x for x, _ in out]), np.concatenate([y for _, y in out])


def test_sampler_draws_every_class_equally_often(tmp_path):
    items = imbalanced(tmp_path)
    _, plain = flat(hw2_input.train_dataset(str(tmp_path), items, CFG, batch_size=16), 1)  # one epoch
    assert np.bincount(plain).tolist() == [12, 3, 1]
    ds = hw2_input.train_dataset(str(tmp_path), items, config(class_balance="sampler"), batch_size=6)
    _, labels = flat(ds, 6)  # 36 examples: 12 rounds of one image per class
    assert np.bincount(labels).tolist() == [12, 12, 12]
    assert all(sorted(labels[r:r + 3]) == [0, 1, 2] for r in range(0, 36, 3))


def test_sampler_cycles_through_each_class_before_repeating_a_file():
    labels = np.array([1, 0, 2, 0, 0, 1, 0, 0], np.int32)  # class 0: files 1,3,4,6,7; class 1: 0,5; class 2: 2
    pick = hw2_input._class_balanced_order(labels, seed=3)
    files = list(tf.data.Dataset.range(30).map(pick).as_numpy_iterator())  # in graph mode, as in the pipeline
    draws = {c: [f for f in files if labels[f] == c] for c in range(3)}
    assert [len(draws[c]) for c in range(3)] == [10, 10, 10]
    for c, n in ((0, 5), (1, 2), (2, 1)):
        cycles = [sorted(draws[c][i:i + n]) for i in range(0, 10 - n + 1, n)]
        assert all(cycle == sorted(np.flatnonzero(labels == c)) for cycle in cycles), c
    assert files != list(tf.data.Dataset.range(30).map(hw2_input._class_balanced_order(labels, 4)).as_numpy_iterator())


@pytest.mark.parametrize("balance, cache_mb", [("none", 1024), ("sampler", 1024), ("sampler", 0)])
def test_a_stream_resumed_at_any_example_continues_exactly(tmp_path, balance, cache_mb):
    items = imbalanced(tmp_path)
    cfg = config(class_balance=balance, cache_images_mb=cache_mb)
    x, y = flat(hw2_input.train_dataset(str(tmp_path), items, cfg, batch_size=4), 5)
    k = 7  # not a multiple of the batch, nor of the sampler's rounds of 3
    x_k, y_k = flat(hw2_input.train_dataset(str(tmp_path), items, cfg, batch_size=4, start_example=k), 3)
    np.testing.assert_array_equal(y_k, y[k:k + 12])
    np.testing.assert_array_equal(x_k, x[k:k + 12])


def test_sampler_pipelines_split_the_single_stream(tmp_path):
    items = imbalanced(tmp_path)
    cfg = config(class_balance="sampler")
    x, y = flat(hw2_input.train_dataset(str(tmp_path), items, cfg, batch_size=1), 12)
    for pipeline_id in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id,
                                         num_replicas_in_sync=2)
        x_p, y_p = flat(hw2_input.train_dataset(str(tmp_path), items, cfg, batch_size=2, input_context=ctx), 6)
        # Pipeline p reads examples p, p + 2, p + 4, ... of the one stream: disjoint, nothing left out.
        np.testing.assert_array_equal(y_p, y[pipeline_id::2])
        np.testing.assert_array_equal(x_p, x[pipeline_id::2])


# ------------------------------------------------------------------------------ augmentation

def seed(i: int) -> tf.Tensor:
    return tf.constant([i, 7], tf.int64)


def test_all_augmentation_off_is_plain_standardization():
    image = random_image(S, S)
    want = tf.image.per_image_standardization(image.astype(np.float32) / 255).numpy()
    got = augmentation.train_preprocess(image, ALL_OFF, seed(0)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(augmentation.eval_preprocess(image, ALL_OFF).numpy(), want, atol=1e-5)


def test_colour_jitter_survives_standardization():
    image = random_image(S, S)
    off = augmentation.train_preprocess(image, ALL_OFF, seed(0)).numpy()
    for key, value in [("brightness", 0.25), ("contrast", 0.3)]:
        cfg = config(**{**OFF, key: value})
        raw = [augmentation.train_preprocess(image, cfg, seed(i), standardize=False).numpy()
               for i in range(4)]
        assert all(not np.allclose(r, image / 255, atol=1e-3) for r in raw), key
        assert all(r.min() >= 0 and r.max() <= 1 for r in raw)
        # Standardization removes a pure shift or scale; what survives it is the clipping of
        # saturated pixels (and, for contrast, the per-channel means), far above float noise.
        final = [augmentation.train_preprocess(image, cfg, seed(i)).numpy() for i in range(4)]
        assert max(np.abs(f - off).max() for f in final) > 0.01, key


def test_flip_flips():
    image = random_image(S, S)
    plain = augmentation.train_preprocess(image, ALL_OFF, seed(0)).numpy()
    cfg = config(**{**OFF, "flip_lr": True})
    outs = [augmentation.train_preprocess(image, cfg, seed(i)).numpy() for i in range(16)]
    flipped = [np.allclose(o, plain[:, ::-1], atol=1e-5) for o in outs]
    unflipped = [np.allclose(o, plain, atol=1e-5) for o in outs]
    assert all(f or u for f, u in zip(flipped, unflipped))
    assert any(flipped) and any(unflipped)


def test_rotation_matches_rot90_and_shift_moves_pixels():
    image = tf.constant(random_image(6, 6), tf.float32)
    rotated = augmentation.affine_transform(image, np.pi / 2, 0.0, 0.0).numpy()
    np.testing.assert_allclose(rotated, np.rot90(image.numpy()), atol=1e-3)
    shifted = augmentation.affine_transform(image, 0.0, 2.0, 1.0).numpy()
    np.testing.assert_allclose(shifted[1:, 2:], image.numpy()[:-1, :-2], atol=1e-3)


@pytest.mark.parametrize("hw", [(40, 90), (300, 120), (S, S), (17, 16)])
def test_output_shape_for_any_input_size_in_graph_mode(hw):
    cfg = config(rotate_deg=10.0, shift_frac=0.1, noise_std=0.05)
    ds = tf.data.Dataset.from_generator(lambda: iter([random_image(*hw)]),
                                        output_signature=tf.TensorSpec([None, None, 3], tf.uint8))
    train = ds.map(lambda x: augmentation.train_preprocess(x, cfg, seed(0)))
    evaluated = ds.map(lambda x: augmentation.eval_preprocess(x, cfg))
    for out in (train, evaluated):
        assert out.element_spec.shape.as_list() == [S, S, 3]
        (x,) = list(out)
        assert x.shape == (S, S, 3) and np.isfinite(x.numpy()).all()


@pytest.mark.parametrize("mode", ["center", "squash"])
def test_squash_keeps_the_ends_of_a_wide_image_that_center_cuts(mode):
    """A 16x48 image whose left and right thirds are bright: eval's centre crop sees only the dark
    middle and a training crop one 16-wide window of it; squash sees all three thirds, in train
    (scale 1: the crop takes the whole square) and in eval alike."""
    image = np.zeros((S, 3 * S, 3), np.uint8)
    image[:, :S], image[:, 2 * S:] = 200, 100
    cfg = config(**{**OFF, "crop_mode": mode})
    outs = [augmentation.eval_preprocess(image, cfg, standardize=False).numpy(),
            augmentation.train_preprocess(image, cfg, seed(0), standardize=False).numpy()]
    for i, out in enumerate(outs):
        assert out.shape == (S, S, 3)
        if mode == "center" and i == 0:
            np.testing.assert_array_equal(out, 0.0)
        elif mode == "center":
            unit = image / np.float32(255)
            assert any(np.allclose(out, unit[:, k:k + S]) for k in range(2 * S + 1))
        else:
            want = tf.image.resize(image.astype(np.float32) / 255, [S, S], antialias=True).numpy()  # 3x down
            np.testing.assert_allclose(out, want, atol=1e-6)
            assert out[:, 0].mean() > 0.7 and out[:, -1].mean() > 0.35 and out[:, S // 2].max() == 0


def test_base_short_side():
    assert augmentation.base_short_side(config("seed")) == 125
    assert augmentation.base_short_side(config("seed", scale_max=1.1, eval_scale=1.1)) == 110
    assert augmentation.base_short_side(config("seed", scale_max=1.0, eval_scale=1.14)) == 114


@pytest.mark.parametrize("key", ["noise_std", "flip_ud", "channels"])
def test_a_missing_config_key_fails_loudly(key):
    cfg = {k: v for k, v in CFG.items() if k != key}
    with pytest.raises(KeyError, match=key):
        augmentation.train_preprocess(random_image(S, S), cfg, seed(0))
