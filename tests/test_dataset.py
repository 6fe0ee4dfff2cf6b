"""hw2_dataset on real image files written with PIL into tmp_path."""
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hw2_dataset as ds  # noqa: E402
import utils  # noqa: E402
from utils import UserError  # noqa: E402


def save(path: Path, size=(16, 12), color=(200, 30, 30), mode="RGB", **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **kwargs)
    return path


def _sideways() -> bytes:
    """EXIF saying 'turn 90 degrees clockwise to view', as a phone held upright writes it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif.tobytes()


def jpeg_bytes(size=(64, 48)) -> bytes:
    # Noise, so the entropy-coded data is long enough that cutting it truncates the scan.
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """Two classes with every kind of good and bad file the scanner must sort out."""
    root = tmp_path / "data"
    save(root / "cats" / "a.JPG", format="JPEG")
    save(root / "cats" / "b.Png", color=(0, 0, 0))
    save(root / "cats" / "nested" / "deeper" / "c.bmp")
    save(root / "cats" / ".hidden.png")
    save(root / ".hidden_class" / "x.png")
    (root / "cats" / "Thumbs.db").write_bytes(b"junk")
    (root / "cats" / "empty.jpg").write_bytes(b"")
    (root / "cats" / "notes.jpg").write_text("this is text, not a JPEG")
    (root / "cats" / "truncated.jpg").write_bytes(jpeg_bytes()[:600])
    save(root / "dogs" / "d.jpeg", color=(30, 200, 30), format="JPEG")
    save(root / "dogs" / "scan.TIF", format="TIFF")  # what scanners write
    save(root / "dogs" / "web.webp", format="WEBP", lossless=True)
    # An iPhone's default (pillow-heif reads it), stored sideways as a phone does, and a file that
    # only looks like one.
    save(root / "dogs" / "IMG_0002.HEIC", exif=_sideways(), quality=90)
    (root / "dogs" / "IMG_0003.heic").write_bytes(b"\0\0\0 ftypheic" + b"\0" * 64)
    save(root / "dogs" / "web.avif", quality=90)  # Pillow reads AVIF itself since 11.3
    save(root / "dogs" / "tiny.png", size=(4, 20))
    (root / "dogs" / "readme.txt").write_text("hello")
    return root


# ----------------------------------------------------------------------------------------- scan

def test_scan_finds_usable_images_and_explains_bad_ones(messy: Path):
    scan = ds.scan_dataset(str(messy), workers=2)
    assert scan.data_dir == str(messy.resolve())
    assert scan.class_names == ["cats", "dogs"]
    assert scan.items == [("cats/a.JPG", 0), ("cats/b.Png", 0), ("cats/nested/deeper/c.bmp", 0), ("dogs/IMG_0002.HEIC", 1),
                          ("dogs/d.jpeg", 1), ("dogs/scan.TIF", 1), ("dogs/web.avif", 1), ("dogs/web.webp", 1)]
    bad = dict(scan.bad)
    assert set(bad) == {"cats/empty.jpg", "cats/notes.jpg", "cats/truncated.jpg", "dogs/tiny.png", "dogs/readme.txt",
                        "dogs/IMG_0003.heic"}
    assert bad["cats/empty.jpg"] == "empty file"
    assert bad["cats/notes.jpg"] == "not an image"
    assert bad["cats/truncated.jpg"].startswith("corrupt: ")
    assert bad["dogs/tiny.png"] == "too small (4x20)"
    assert bad["dogs/readme.txt"] == "unsupported format (.txt)"
    assert bad["dogs/IMG_0003.heic"] == "not an image"
    for rel in ("dogs/scan.TIF", "dogs/web.webp"):  # both lossless: read back exactly
        image = ds.read_image(str(messy / rel))
        assert image.shape == (12, 16, 3) and (image == [200, 30, 30]).all(), rel
    # Lossy: within a few levels. The HEIC turned upright: 16 high, 12 wide.
    for rel, shape in (("dogs/IMG_0002.HEIC", (16, 12, 3)), ("dogs/web.avif", (12, 16, 3))):
        image = ds.read_image(str(messy / rel))
        assert image.shape == shape and np.abs(image.astype(int) - [200, 30, 30]).max() <= 3, rel


def test_jpegs_saved_by_a_windows_browser_are_read_and_camera_raw_files_say_what_to_do(tmp_path: Path):
    save(tmp_path / "cats" / "from the web.jfif", format="JPEG")
    save(tmp_path / "cats" / "old.JPE", color=(0, 90, 0), format="JPEG")
    save(tmp_path / "dogs" / "a.png")
    (tmp_path / "dogs" / "IMG_0001.CR2").write_bytes(b"II*\0\x10\0\0\0CR")
    scan = ds.scan_dataset(str(tmp_path))
    assert scan.items == [("cats/from the web.jfif", 0), ("cats/old.JPE", 0), ("dogs/a.png", 1)]
    assert scan.bad == [("dogs/IMG_0001.CR2", "unsupported format (.CR2): convert camera RAW to JPEG first")]
    assert np.abs(ds.read_image(str(tmp_path / "cats" / "from the web.jfif")).astype(int) - [200, 30, 30]).max() <= 3


def test_a_second_scan_checks_only_the_files_that_changed(messy: Path, monkeypatch):
    """check_cache: verdicts kept per file stamp, good and bad alike, except 'unreadable' (it can
    change while the file does not); a changed file is checked again."""
    checked, real = [], ds.inspect_image
    monkeypatch.setattr(ds, "inspect_image", lambda path, *a: checked.append(os.path.relpath(path, messy)) or real(path, *a))
    first = ds.scan_dataset(str(messy), workers=2)
    assert len(checked) == len(first.items) + 5  # and the bad image files (not the .txt)
    checked.clear()
    again = ds.scan_dataset(str(messy), workers=2)
    assert checked == [] and (again.items, again.bad, again.info) == (first.items, first.bad, first.info)
    save(messy / "cats" / "a.JPG", size=(40, 30), format="JPEG")
    (messy / "dogs" / "d.jpeg").write_bytes(jpeg_bytes()[:600])  # a good file goes bad
    third = ds.scan_dataset(str(messy), workers=2)
    assert sorted(checked) == ["cats/a.JPG", "dogs/d.jpeg"]
    assert third.info["cats/a.JPG"].width == 40 and dict(third.bad)["dogs/d.jpeg"].startswith("corrupt: ")
    assert ds.check_cache.keeps("corrupt: x") and not ds.check_cache.keeps("unreadable: Permission denied")


def test_a_long_scan_says_what_it_is_doing_first(messy: Path, monkeypatch, caplog):
    import logging

    import utils
    seen, real = [], utils.progress

    def progress(iterable, total, unit, what, at_least=1000):
        seen.append((total, what))
        return real(iterable, total, unit, what, at_least=1)  # as if the folder were big
    monkeypatch.setattr(ds.utils, "progress", progress)
    with caplog.at_level(logging.INFO):
        scan = ds.scan_dataset(str(messy))
    n = len(scan.items) + sum(1 for _, why in scan.bad if not why.startswith(("unsupported", "broken link")))
    assert seen == [(n, f"checking the images in {messy}")]
    assert f"checking the images in {messy}: {n} files ..." in caplog.text
    assert real(seen, 1, "files", "short", at_least=2) is seen  # short work: no line, no bar


def test_scan_without_checking_only_looks_at_extensions(messy: Path):
    scan = ds.scan_dataset(str(messy), check_images=False)
    assert ("cats/truncated.jpg", 0) in scan.items
    assert scan.bad == [("dogs/readme.txt", "unsupported format (.txt)")]


def test_a_heic_photo_decodes_its_thumbnail_where_that_is_big_enough(tmp_path: Path, monkeypatch):
    """An iPhone's HEIC carries a 320x240 thumbnail that decodes ~40x faster than the photo."""
    from pillow_heif import as_plugin
    decoded, load = [], as_plugin._LibHeifImageFile.load

    def spy(self):  # the size of each image's one decode (later calls find it loaded)
        first = not self._LibHeifImageFile__loaded
        out = load(self)
        decoded.extend([self.size] if first else [])
        return out
    monkeypatch.setattr(as_plugin._LibHeifImageFile, "load", spy)
    y, x = np.mgrid[0:120, 0:160]
    pixels = np.stack([x * 255 // 159, y * 255 // 119, np.full_like(x, 90)], -1).astype(np.uint8)
    path = tmp_path / "IMG_0001.HEIC"
    Image.fromarray(pixels).save(path, quality=95, thumbnails=[64])
    assert ds.inspect_image(str(path)) == ds.ImageInfo(160, 120, "HEIF", "RGB", None)
    small = ds.read_image(str(path), short_side=24)  # from the 64x48 thumbnail
    big = ds.read_image(str(path), short_side=60)  # more than the thumbnail has: from the photo
    assert decoded == [(64, 48), (64, 48), (160, 120)]
    assert small.shape == (24, 32, 3) and big.shape == (60, 80, 3)
    # The same picture either way, within the two compressions' few levels.
    reference = np.asarray(Image.fromarray(pixels).resize((32, 24), Image.Resampling.BILINEAR), np.int32)
    assert np.abs(small.astype(np.int32) - reference).mean() < 4


def test_without_pillow_heif_a_heic_photo_is_skipped_with_what_to_do(messy: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # as if it were not installed: ImportError
    extensions = ds._readable_extensions()
    assert ".heic" not in extensions and ".jpg" in extensions
    monkeypatch.setattr(ds, "IMAGE_EXTENSIONS", extensions)
    monkeypatch.setattr(ds, "CONVERT_FIRST", {".heic": "HEIC", ".heif": "HEIF"})
    bad = dict(ds.scan_dataset(str(messy), check_images=False).bad)
    assert bad["dogs/IMG_0002.HEIC"] == "unsupported format (.HEIC): convert HEIC to JPEG first"


def test_scan_of_a_missing_folder_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        ds.scan_dataset(str(tmp_path / "nope"))


def test_scan_of_a_folder_without_class_folders_is_a_user_error(tmp_path: Path):
    save(tmp_path / "loose.png")
    with pytest.raises(UserError, match=r"has no class folders.*DATA_DIR/<class>/<image>"):
        ds.scan_dataset(str(tmp_path))


def test_scan_names_a_class_with_only_bad_images(tmp_path: Path):
    data = tmp_path / "my photos"
    save(data / "good" / "a.png")
    (data / "broken" / "b.jpg").parent.mkdir()
    (data / "broken" / "b.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"class 'broken' has no usable images \(1 skipped") as e:
        ds.scan_dataset(str(data))
    assert f"python hw2_dataset.py --data_dir '{data}' --check" in str(e.value)  # quoted: pasted, it runs


def test_scan_names_an_empty_class_folder_and_what_to_do(tmp_path: Path):
    save(tmp_path / "good" / "a.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"class 'empty' has no images: .*empty is empty \(add images to it or move"):
        ds.scan_dataset(str(tmp_path))


# -------------------------------------------------------------------- nested folders and links

def scan_within(seconds: float, *args, **kwargs) -> ds.Scan:
    """scan_dataset in a daemon thread, so a walk that loops fails the test instead of hanging it."""
    result = []

    def scan():
        try:
            result.append(ds.scan_dataset(*args, **kwargs))
        except BaseException as e:
            result.append(e)

    thread = threading.Thread(target=scan, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the scan did not finish: a symlink loop was followed"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def test_files_at_any_depth_belong_to_the_top_level_class_and_hidden_ones_are_skipped(tmp_path: Path):
    save(tmp_path / "cats" / "a.png")
    save(tmp_path / "cats" / "2023" / "summer" / "b.png")
    save(tmp_path / "cats" / ".cache" / "thumb.png")  # a dot-folder: editors' and tools' caches
    save(tmp_path / "cats" / "2023" / ".c.png")
    save(tmp_path / "dogs" / "x" / "y" / "z" / "d.png")
    save(tmp_path / "__MACOSX" / "cats" / "._a.png")  # what macOS puts into the zips it makes
    save(tmp_path / ".git" / "e.png")
    scan = ds.scan_dataset(str(tmp_path))
    assert scan.class_names == ["cats", "dogs"]
    assert scan.items == [("cats/2023/summer/b.png", 0), ("cats/a.png", 0), ("dogs/x/y/z/d.png", 1)]
    assert scan.bad == []
    assert scan.skipped == [(".git", "hidden"), ("__MACOSX", "system file"), ("cats/.cache", "hidden"),
                            ("cats/2023/.c.png", "hidden")]


def test_a_dataset_split_into_train_and_val_folders_is_named_with_the_commands_to_use(tmp_path: Path):
    """DATA/train/<class>, DATA/val/<class>, as downloads (and --import) lay them out: taken as class
    folders, "train" and "val" would be the two classes."""
    data = tmp_path / "hymenoptera data"
    for part in ("val", "train", "Test"):
        for label in ("ants", "bees", "cicadas", "wasps"):
            save(data / part / label / "a.png")
    save(data / "README" / "a.png")  # a folder beside the parts
    with pytest.raises(UserError) as e:
        ds.scan_dataset(str(data))
    assert str(e.value) == (f"data_dir {data} holds a dataset's own parts (train, val, Test), not class folders "
                            f"(train holds the class folders ants, bees, cicadas, ...): --data_dir '{data}/train', "
                            f"then hw2_eval.py --test_data_path '{data}/val'")
    # A held-out set kept inside the data folder, one name not like a part's.
    for label in ("ants", "bees", "wasps"):
        save(tmp_path / "inside" / label / "a.png")
        save(tmp_path / "inside" / "held out" / label / "a.png")
    with pytest.raises(UserError, match=r"^class folder held out holds folders named like the classes \(ants, bees, "
                                        r"wasps\): .*; move '\S+/inside/held out' out of it"):
        ds.scan_dataset(str(tmp_path / "inside"))
    # Kaggle's layout: train/<class>, and a test/ of unlabelled images.
    save(tmp_path / "kaggle" / "train" / "cats" / "a.png")
    save(tmp_path / "kaggle" / "train" / "dogs" / "a.png")
    save(tmp_path / "kaggle" / "test" / "1.png")
    with pytest.raises(UserError, match=r"parts \(train, test\), not class folders \(train holds the class folders "
                                        r"cats, dogs\): --data_dir \S+/kaggle/train$"):
        ds.scan_dataset(str(tmp_path / "kaggle"))


def test_archives_not_yet_extracted_are_named_as_what_to_extract(tmp_path: Path):
    """cats/ and birds/ extracted, dogs.zip not: the run must not quietly train without dogs."""
    import zipfile
    for name in ("cats", "birds"):
        save(tmp_path / "data" / name / "a.png", color=(0, 0, len(name)))
    with zipfile.ZipFile(tmp_path / "data" / "dogs.zip", "w") as z:
        z.writestr("dogs/a.png", b"")
    (tmp_path / "data" / "cats" / "more cats.tar.gz").write_bytes(b"\x1f\x8b")
    scan = ds.scan_dataset(str(tmp_path / "data"))
    assert scan.class_names == ["birds", "cats"]
    assert scan.bad == [("cats/more cats.tar.gz", "an archive (.gz): extract it to use its images"),
                        ("dogs.zip", "an archive beside the class folders: extract it into DATA_DIR/<class>/ to use "
                                     "its images")]
    (tmp_path / "zips").mkdir()
    os.rename(tmp_path / "data" / "dogs.zip", tmp_path / "zips" / "dogs.zip")
    with pytest.raises(UserError, match=r"has no class folders \(found 1 archive, e\.g\. dogs\.zip: extract it "
                                        r"first\): expected DATA_DIR/<class>/<image>"):
        ds.scan_dataset(str(tmp_path / "zips"))


def test_classes_named_like_parts_or_sharing_sub_folders_are_classes(tmp_path: Path):
    for year in ("2023", "2024"):  # a class "train" (locomotives) beside "bus", both by year
        save(tmp_path / "a" / "train" / year / "a.png")
        save(tmp_path / "a" / "bus" / year / "a.png")
    save(tmp_path / "b" / "test" / "a.png")  # classes "test" and "train", images directly inside
    save(tmp_path / "b" / "train" / "a.png")
    save(tmp_path / "c" / "train" / "2024" / "a.png")  # two classes named like parts, one sub-folder each
    save(tmp_path / "c" / "val" / "2024" / "a.png")
    save(tmp_path / "d" / "cats" / "a.png")  # one folder named like another class: a misfiled folder, not a set
    save(tmp_path / "d" / "dogs" / "a.png")
    save(tmp_path / "d" / "pets" / "cats" / "a.png")
    for data, classes in (("a", ["bus", "train"]), ("b", ["test", "train"]), ("c", ["train", "val"]),
                          ("d", ["cats", "dogs", "pets"])):
        assert ds.scan_dataset(str(tmp_path / data)).class_names == classes


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs POSIX symlinks")
def test_symlinked_files_and_folders_are_followed_but_loops_are_not(tmp_path: Path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    save(elsewhere / "shared.png")
    save(elsewhere / "album" / "in_album.png")
    save(data / "cats" / "a.png")
    os.symlink(elsewhere / "shared.png", data / "cats" / "linked.png")
    os.symlink(elsewhere / "album", data / "cats" / "album")
    os.symlink(data / "cats", data / "cats" / "loop")  # a link to its own class folder
    (data / "cats" / "deep").mkdir()
    os.symlink("..", data / "cats" / "deep" / "up")  # and one to a parent, relative
    os.symlink(data / "cats" / "b_link", data / "cats" / "a_link")  # a <-> b: a cycle of links
    os.symlink(data / "cats" / "a_link", data / "cats" / "b_link")
    os.symlink(tmp_path / "gone.png", data / "cats" / "dangling.png")
    save(data / "dogs" / "d.png")
    scan = scan_within(30, str(data))
    assert scan.items == [("cats/a.png", 0), ("cats/album/in_album.png", 0), ("cats/linked.png", 0), ("dogs/d.png", 1)]
    assert dict(scan.bad) == {"cats/a_link": "broken link or not a regular file",
                              "cats/b_link": "broken link or not a regular file",
                              "cats/dangling.png": "broken link or not a regular file"}
    assert sorted(rel for rel, why in scan.skipped if why == "link to a folder already scanned") == \
        ["cats/deep/up", "cats/loop"]


# -------------------------------------------------------------------------------- class balance

def test_class_folders_whose_names_differ_only_in_case_or_spacing_are_named(tmp_path: Path, caplog):
    """Two sources merged into one folder: Cat beside cat trains as two classes. The split says so."""
    import run_dir
    assert ds.lookalike_note(["Cat", "cat", "dog", "sea_lion", "Sea Lion", "sea-lion ", "seal"]) == (
        "class folders 'Cat' and 'cat'; 'sea_lion' and 'Sea Lion' and 'sea-lion ' differ only in case, spaces, '_' "
        "or '-': each is a class of its own (merge them into one folder if they hold the same thing)")
    assert ds.lookalike_note(["cat", "cats", "dog"]) is None
    for i, name in enumerate(("Cat", "cat", "dog")):
        for j in range(2):
            save(tmp_path / "data" / name / f"{j}.png", color=(40 * i, 100 * j, 0))
    with caplog.at_level("WARNING"):
        split = run_dir.prepare_split(str(tmp_path), utils.load_config("tiny"), str(tmp_path / "data"))
    assert split["class_names"] == ["Cat", "cat", "dog"]
    assert "class folders 'Cat' and 'cat' differ only in case" in caplog.text


def test_class_weights_are_inverse_frequency_with_mean_1():
    items = synthetic_items((50, 10, 5))
    assert ds.class_counts(items, 3).tolist() == [50, 10, 5]
    w = ds.class_weights(items, 3)
    assert w.dtype == np.float32 and w.shape == (3,)
    np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w * [50, 10, 5], w[0] * 50, rtol=1e-6)  # every class weighs the same in all
    np.testing.assert_allclose(ds.class_weights(synthetic_items((7, 7)), 2), [1.0, 1.0])


def test_class_weights_of_a_class_without_items_is_0():
    w = ds.class_weights(synthetic_items((30, 10)), 3)  # label 2 has no training image
    assert w[2] == 0 and w[1] == pytest.approx(3 * w[0]) and w[:2].mean() == pytest.approx(1.0)
    with pytest.raises(UserError, match="no images"):
        ds.class_weights([], 2)


def test_imbalance_ratio_and_the_note_that_suggests_class_balance():
    assert ds.imbalance_ratio([30, 10, 20]) == 3.0
    assert ds.imbalance_ratio([4, 0]) == float("inf")
    assert ds.imbalance_note([29, 10, 20], ["a", "b", "c"]) is None
    note = ds.imbalance_note([30, 10, 20], ["a", "b", "c"])
    assert note == ("class imbalance: the largest class 'a' (30 images) is 3.0x the smallest 'b' (10): "
                    "consider --class_balance weights or sampler")
    assert "infinitely many times the smallest 'b' (0)" in ds.imbalance_note([3, 0], ["a", "b"])


# ---------------------------------------------------------------------------------------- split

def synthetic_items(sizes=(50, 30, 10, 2, 1)) -> list[tuple[str, int]]:
    return [(f"c{label}/{i:03d}.png", label) for label, n in enumerate(sizes) for i in range(n)]


def by_label(items):
    out = {}
    for path, label in items:
        out.setdefault(label, set()).add(path)
    return out


def test_split_is_stratified_disjoint_complete_and_sorted():
    items = synthetic_items()
    train, val = ds.make_split(items, val_fraction=0.2, seed=0)
    assert train == sorted(train) and val == sorted(val)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(items)
    train_by, val_by = by_label(train), by_label(val)
    for label, n in enumerate((50, 30, 10)):
        assert abs(len(val_by[label]) / n - 0.2) < 0.05
    assert len(train_by[3]) == 1 and len(val_by[3]) == 1  # 2 images: one each side
    assert 4 not in val_by and len(train_by[4]) == 1  # a single image can only train


def test_split_is_reproducible_per_seed():
    items = synthetic_items()
    assert ds.make_split(items, seed=1) == ds.make_split(list(reversed(items)), seed=1)
    assert ds.make_split(items, seed=1) != ds.make_split(items, seed=2)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_a_val_fraction_outside_0_1(fraction):
    with pytest.raises(UserError, match="val_fraction"):
        ds.make_split(synthetic_items(), val_fraction=fraction)


def test_kfold_val_folds_are_disjoint_and_cover_everything():
    items, k = synthetic_items(), 5
    vals = []
    for fold in range(k):
        train, val = ds.make_split(items, seed=3, folds=k, fold=fold)
        assert sorted(train + val) == sorted(items) and not set(train) & set(val)
        vals.append(set(val))
    assert sum(len(v) for v in vals) == len(items) == len(set().union(*vals))
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    for label, n in enumerate((50, 30, 10)):  # stratified: each fold holds 1/k of every class
        assert all(len(by_label(v)[label]) == n // k for v in vals)


@pytest.mark.parametrize("folds, fold", [(5, 5), (5, -1), (1, 0)])
def test_kfold_rejects_a_bad_fold(folds, fold):
    with pytest.raises(UserError, match="fold"):
        ds.make_split(synthetic_items(), folds=folds, fold=fold)


# ----------------------------------------------------------------------------------- split file

def test_split_file_round_trip_and_missing_file(messy: Path, tmp_path: Path):
    scan = ds.scan_dataset(str(messy))
    train, val = ds.make_split(scan.items, val_fraction=0.5, seed=4)
    path = str(tmp_path / "runs" / "split.json")
    ds.write_split(path, scan, train, val, seed=4, val_fraction=0.5)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["split.json"]  # no temp file left

    doc = ds.load_split(path)
    assert doc["version"] == 1 and doc["data_dir"] == scan.data_dir
    assert doc["class_names"] == ["cats", "dogs"]
    assert (doc["train"], doc["val"]) == (train, val)
    assert doc["bad"] == scan.bad and (doc["seed"], doc["val_fraction"], doc["folds"]) == (4, 0.5, 0)

    os.remove(messy / train[0][0])
    with pytest.raises(UserError, match=f"names 1 missing file, e.g. {train[0][0]} \\(deleted or moved since"):
        ds.load_split(path)
    assert ds.load_split(path, check_files=False)["train"] == train


def test_load_split_rejects_broken_files(tmp_path: Path):
    path = tmp_path / "split.json"
    with pytest.raises(UserError, match="not found"):
        ds.load_split(str(path))
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        ds.load_split(str(path))
    path.write_text(json.dumps({"data_dir": str(tmp_path), "train": []}))
    with pytest.raises(UserError, match="missing key.*class_names"):
        ds.load_split(str(path))
    doc = {"data_dir": str(tmp_path), "class_names": ["a"], "train": [["a/x.png", 1]], "val": []}
    path.write_text(json.dumps(doc))
    with pytest.raises(UserError, match="label 1"):
        ds.load_split(str(path), check_files=False)


# ------------------------------------------------------------------------------------ read_image

def test_read_image_converts_every_mode_to_rgb_uint8(tmp_path: Path):
    gray = ds.read_image(str(save(tmp_path / "g.png", mode="L", color=77)))
    assert gray.shape == (12, 16, 3) and gray.dtype == np.uint8 and (gray == 77).all()

    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 5, 10))  # left half fully transparent black
    rgba.save(tmp_path / "rgba.png")
    out = ds.read_image(str(tmp_path / "rgba.png"))
    assert (out[:, :5] == 255).all() and (out[:, 5:] == [255, 0, 0]).all()  # composited over white

    palette = Image.new("RGB", (10, 10), (0, 0, 255)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(tmp_path / "p.png")
    assert (ds.read_image(str(tmp_path / "p.png")) == [0, 0, 255]).all()
    palette.save(tmp_path / "p_clear.png", transparency=palette.getpixel((0, 0)))
    assert (ds.read_image(str(tmp_path / "p_clear.png")) == 255).all()  # transparent -> white

    save(tmp_path / "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0), format="JPEG")  # pure red
    cmyk = ds.read_image(str(tmp_path / "cmyk.jpg")).astype(int)
    assert cmyk.shape == (12, 16, 3) and (cmyk[..., 0] > 200).all() and (cmyk[..., 1:] < 60).all()

    assert (ds.read_image(str(save(tmp_path / "b.bmp", color=(1, 2, 3)))) == [1, 2, 3]).all()
    assert ds.read_image(str(save(tmp_path / "one.png", mode="1", color=1))).min() == 255


def test_read_image_scales_16_bit_png_instead_of_clipping(tmp_path: Path):
    Image.fromarray(np.array([[65535, 32768, 0]], dtype=np.uint16)).save(tmp_path / "deep.png")
    out = ds.read_image(str(tmp_path / "deep.png"))
    assert out.shape == (1, 3, 3) and list(out[0, :, 0]) == [255, 128, 0]


def test_read_image_takes_the_first_gif_frame(tmp_path: Path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    out = ds.read_image(str(tmp_path / "anim.gif"))
    assert out.shape == (8, 8, 3) and (out == [255, 0, 0]).all()


def test_read_image_honours_exif_orientation(tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": how phones store portrait shots
    save(tmp_path / "phone.jpg", size=(40, 20), format="JPEG", exif=exif)
    assert ds.read_image(str(tmp_path / "phone.jpg")).shape == (40, 20, 3)
    assert ds.read_image(str(tmp_path / "phone.jpg"), short_side=10).shape == (20, 10, 3)


def test_read_image_resizes_the_short_side_and_keeps_aspect(tmp_path: Path):
    path = str(save(tmp_path / "wide.png", size=(30, 20)))
    assert ds.read_image(path, short_side=10).shape == (10, 15, 3)
    assert ds.read_image(path, short_side=40).shape == (40, 60, 3)
    assert ds.read_image(os.fsencode(path), short_side=np.int64(20)).shape == (20, 30, 3)  # as from tf


def test_read_image_of_a_large_jpeg_at_a_small_size(tmp_path: Path):
    ramp = np.linspace(0, 255, 3000, dtype=np.float32)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:2000, None], 128), -1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=80)
    out = ds.read_image(str(tmp_path / "big.jpg"), short_side=64)
    assert out.shape == (64, 96, 3)
    assert abs(int(out[32, 0, 0]) - 0) < 20 and abs(int(out[32, -1, 0]) - 255) < 20  # not garbled


def test_a_200_megapixel_phone_jpeg_is_used_and_a_huge_png_is_too_large(tmp_path: Path, monkeypatch):
    # 16320x12240, a 200-megapixel phone camera's photo: over PIL's 179-megapixel bomb guard, which
    # skipped it as "too large", though the scan and read_image decode a JPEG at 1/8 scale.
    Image.new("L", (16320, 12240), 90).save(tmp_path / "phone.jpg", quality=50)
    info = ds.inspect_image(str(tmp_path / "phone.jpg"))
    assert info.problem is None and (info.width, info.height) == (16320, 12240)
    assert ds.read_image(str(tmp_path / "phone.jpg"), short_side=73).shape == (73, 97, 3)
    # Formats decoded whole keep the guard (lowered here, so the PNG can be small).
    Image.new("RGB", (40, 30)).save(tmp_path / "wide.png")
    monkeypatch.setattr(ds, "PIXEL_LIMIT", 1000)
    assert ds.inspect_image(str(tmp_path / "wide.png")).problem.startswith("too large: 40x30 pixels, over 1,000")
    with pytest.raises(ValueError, match="too large"):
        ds.read_image(str(tmp_path / "wide.png"))


@pytest.mark.parametrize("content, reason", [(b"", "not an image"), (b"hello", "not an image"),
                                            (jpeg_bytes()[:600], "corrupt")])
def test_read_image_raises_value_error_with_a_reason(tmp_path: Path, content, reason):
    (tmp_path / "bad.jpg").write_bytes(content)
    with pytest.raises(ValueError, match=reason):
        ds.read_image(str(tmp_path / "bad.jpg"))
    with pytest.raises(ValueError, match="not found"):
        ds.read_image(str(tmp_path / "missing.jpg"))


# ------------------------------------------------------------------------------------------ demo

def test_make_demo_writes_the_digits_once(tmp_path: Path):
    out = tmp_path / "demo"
    assert ds.make_demo(str(out)) == 1797
    assert sorted(p.name for p in out.iterdir()) == [str(d) for d in range(10)]
    files = sorted(out.glob("*/*.png"))
    assert len(files) == 1797
    with Image.open(files[0]) as img:
        assert img.size == (8, 8)
    before = files[0].stat().st_mtime_ns
    assert ds.make_demo(str(out)) == 1797 and files[0].stat().st_mtime_ns == before

    scan = ds.scan_dataset(str(out), workers=2)  # 8x8 is exactly the default min_size
    assert len(scan.items) == 1797 and not scan.bad
    assert ds.read_image(str(files[0])).shape == (8, 8, 3)


def test_make_demo_refuses_a_folder_holding_other_data(tmp_path: Path):
    save(tmp_path / "cats" / "a.png")
    with pytest.raises(UserError, match="cats"):
        ds.make_demo(str(tmp_path))


# ------------------------------------------------------------------------------------------- CLI

def test_cli_check_lists_bad_files_and_duplicates(messy: Path, capsys):
    (messy / "dogs" / "copy.JPG").write_bytes((messy / "cats" / "a.JPG").read_bytes())
    assert ds.main(["--data_dir", str(messy), "--check", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert "cats/truncated.jpg: corrupt" in out and "dogs/readme.txt" in out
    assert "duplicate: cats/a.JPG = dogs/copy.JPG  (in different classes!)" in out
    assert out.rstrip().endswith(" bad files, 1 group of duplicates")


def test_duplicates_are_identical_bytes_not_equal_sizes(tmp_path: Path):
    save(tmp_path / "a" / "red.bmp", color=(255, 0, 0))
    save(tmp_path / "a" / "green.bmp", color=(0, 255, 0))  # a BMP's size depends only on its pixel count
    save(tmp_path / "b" / "red_again.bmp", color=(255, 0, 0))
    save(tmp_path / "b" / "big.png", size=(30, 30))
    assert os.path.getsize(tmp_path / "a" / "red.bmp") == os.path.getsize(tmp_path / "a" / "green.bmp")
    assert ds.find_duplicates(ds.scan_dataset(str(tmp_path)), workers=2) == [["a/red.bmp", "b/red_again.bmp"]]


def test_cli_check_of_a_clean_folder_exits_0(tmp_path: Path, capsys):
    save(tmp_path / "a" / "1.png")
    save(tmp_path / "b" / "1.png", color=(1, 1, 1))
    assert ds.main(["--data_dir", str(tmp_path), "--check"]) == 0
    assert capsys.readouterr().out.endswith(": 2 usable images in 2 classes, 0 bad files, 0 groups of duplicates\n")


def test_cli_writes_a_split(messy: Path, tmp_path: Path, capsys):
    out = tmp_path / "split.json"
    assert ds.main(["--data_dir", str(messy), "--out", str(out), "--val_fraction", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "cats" in printed and "6 bad files" in printed
    doc = ds.load_split(str(out))
    assert len(doc["train"]) + len(doc["val"]) == 8


def test_cli_user_errors_print_one_line_and_return_2(tmp_path: Path, capsys):
    assert ds.main(["--data_dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err and err.count("\n") == 1


def test_script_exit_status():
    result = subprocess.run([sys.executable, str(ROOT / "hw2_dataset.py"), "--data_dir", "/no/such/dir"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.startswith("error: ")
