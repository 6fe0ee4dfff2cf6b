"""python hw2_dataset.py --report OUT on a generated folder with bad files, duplicates, nesting and imbalance."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset_report
import hw2_dataset as ds
from helpers import make_image_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Usable: cats 9 (3 in a sub-folder), dogs 3, 'hibou é' 3; and every kind of problem the
    report must find."""
    root = tmp_path / "data"
    make_image_folder(root, ("cats",), per_class=6, seed=0)
    make_image_folder(root / "cats" / "2023" / "summer", ("party",), per_class=2, seed=1)
    make_image_folder(root, ("dogs",), per_class=2, seed=2)
    make_image_folder(root, ("hibou é",), per_class=2, seed=3)
    (root / "cats" / "2023" / "summer" / "party" / "copy of 0.png").write_bytes((root / "cats" / "0.png").read_bytes())
    (root / "dogs" / "stolen.png").write_bytes((root / "cats" / "2.png").read_bytes())  # one image, two labels
    (root / "cats" / "empty.jpg").write_bytes(b"")
    (root / "dogs" / "notes.jpg").write_text("not a picture")
    (root / "dogs" / "IMG_0001.HEIC").write_bytes(b"\0" * 64)
    Image.new("RGBA", (60, 45), (0, 0, 0, 0)).save(root / "hibou é" / "clear.gif")  # a GIF under a PNG's mode
    Image.new("L", (3, 40)).save(root / "hibou é" / "sliver.png")
    (root / "cats" / ".thumbnails").mkdir()
    (root / "cats" / ".thumbnails" / "t.png").write_bytes(b"")
    Image.new("RGB", (24, 24)).save(root / "loose.jpg")
    return root


def section(text: str, title: str) -> str:
    """The body of one '## title' section of report.md."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"no section {title!r} in:\n{text}"
    return match.group(1)


def row(text: str, first_cell: str) -> list[str]:
    """The cells of the table row whose first cell is first_cell."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in:\n{text}")


def test_report_describes_classes_sizes_bad_files_duplicates_and_nesting(folder: Path, tmp_path: Path, capsys):
    out = tmp_path / "report"
    assert ds.main(["--data_dir", str(folder), "--report", str(out), "--workers", "2"]) == 0
    assert "report.md" in capsys.readouterr().out
    text = (out / "report.md").read_text(encoding="utf-8")

    classes = section(text, "Classes")
    #             class          images share  unusable sub-folders identical groups
    assert row(classes, "`cats`")[:6] == ["`cats`", "9", "60.0%", "1", "3", "3"]
    assert row(classes, "`dogs`")[:6] == ["`dogs`", "3", "20.0%", "2", "0", "1"]
    assert row(classes, "`hibou é`")[:6] == ["`hibou é`", "3", "20.0%", "1", "0", "0"]
    assert row(classes, "`cats`")[6] == "21 x 27"  # median short x long side
    assert "the largest class `cats` (9) / the smallest `dogs` (3) = 3.00" in classes
    summary = text.split("## Classes")[0]
    assert summary.startswith(f"# Dataset report: {folder}\n")
    assert "15 usable images in 3 classes, 5 unusable files, 2 groups of identical files" in summary
    assert "class imbalance: the largest class 'cats' (9 images) is 3.0x the smallest 'dogs' (3)" in summary

    sizes = section(text, "Image sizes (pixels, as stored)")
    assert row(sizes, "short side")[1:] == ["20", "20", "21", "24", "45"]
    assert row(sizes, "long side")[-1] == "60"
    formats = section(text, "Formats and modes")
    assert row(formats, "PNG") == ["PNG", "8"] and row(formats, "JPEG") == ["JPEG", "6"]
    assert row(formats, "GIF") == ["GIF", "1"] and row(formats, "P") == ["P", "1", "palette, converted"]

    bad = section(text, "Unusable files")
    assert row(bad, "`cats/empty.jpg`") == ["`cats/empty.jpg`", "empty file"]
    assert row(bad, "`dogs/notes.jpg`") == ["`dogs/notes.jpg`", "not an image"]
    assert row(bad, "`dogs/IMG_0001.HEIC`") == ["`dogs/IMG_0001.HEIC`", "not an image"]  # 64 zero bytes
    assert row(bad, "`hibou é/sliver.png`") == ["`hibou é/sliver.png`", "too small (3x40)"]
    assert row(bad, "`loose.jpg`") == ["`loose.jpg`", "not inside a class folder"]
    assert row(bad, "too small") == ["too small", "1"]

    duplicates = section(text, "Identical files")
    assert "2 groups of byte-identical images: 1 across classes, 1 within one class" in duplicates
    across, within = duplicates.split("### Within one class")
    assert "- `cats/2.png` = `dogs/stolen.png`" in across
    assert "- `cats/0.png` = `cats/2023/summer/party/copy of 0.png`" in within

    nesting = section(text, "Sub-folders")
    assert "3 images sit in 1 sub-folder of 1 class" in nesting
    assert row(nesting, "`cats/2023/summer/party`") == ["`cats/2023/summer/party`", "3"]
    assert "1 image lies beside the class folders, without a label: `loose.jpg`" in nesting
    assert "Skipped on purpose (1 hidden): `cats/.thumbnails`" in nesting
    assert "![samples](samples.png)" in text


def test_samples_png_has_one_row_of_images_per_class(folder: Path, tmp_path: Path):
    scan = ds._scan(str(folder), True, 8, 2)
    (sheet,) = dataset_report.write_contact_sheets(scan, str(tmp_path), per_class=4, seed=0, workers=2)
    assert os.path.basename(sheet) == "samples.png"
    pixels = np.asarray(Image.open(sheet).convert("L"), np.float32)
    thumb, pad = 96, 4
    assert pixels.shape == (3 * (thumb + pad) + pad, 2 * thumb + 4 * (thumb + pad) + pad)
    counts = {"cats": 4, "dogs": 3, "hibou é": 3}  # usable images, up to 4
    for r, n in enumerate(counts.values()):
        y = pad + r * (thumb + pad)
        label = pixels[y:y + thumb, :2 * thumb]
        assert (label < 128).sum() > 50  # the class name and count are written
        for c in range(4):
            x = 2 * thumb + pad + c * (thumb + pad)
            cell = pixels[y:y + thumb, x:x + thumb]
            assert (cell.std() > 5) == (c < n), (r, c)  # an image, or an empty grey cell


def test_report_of_many_classes_splits_the_contact_sheet(tmp_path: Path):
    classes = [f"c{i:03d}" for i in range(101)]
    make_image_folder(tmp_path / "data", classes, per_class=1, sizes=((8, 8),), formats=("bmp",))
    paths = dataset_report.write_report(ds._scan(str(tmp_path / "data"), True, 8, 2), str(tmp_path / "out"), workers=2)
    assert [os.path.basename(p) for p in paths] == ["report.md", "samples.png", "samples-2.png"]
    assert Image.open(paths[2]).height == 1 * (64 + 4) + 4  # the 101st class, at 64 px


def test_report_names_files_whose_extension_is_not_their_format(tmp_path: Path):
    """hw2 reads them by content; the report says so for the other tools, which go by the name."""
    root = tmp_path / "data"
    make_image_folder(root, ("a", "b"), per_class=2, seed=0)
    Image.new("RGB", (24, 24)).save(root / "a" / "x.jpg", format="PNG")
    out = tmp_path / "report"
    assert ds.main(["--data_dir", str(root), "--report", str(out)]) == 0
    assert "\n1 file has an extension that does not match its content, e.g. `a/x.jpg` is PNG\n" in \
        (out / "report.md").read_text(encoding="utf-8")
    Image.new("RGB", (24, 24)).save(root / "b" / "y.jpeg", format="GIF")
    assert ds.main(["--data_dir", str(root), "--report", str(out)]) == 0
    assert "\n2 files have extensions that do not match their content, e.g. `a/x.jpg` is PNG, `b/y.jpeg` is GIF\n" in \
        (out / "report.md").read_text(encoding="utf-8")
