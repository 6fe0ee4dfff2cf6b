"""`python hw2_dataset.py --data_dir D --report OUT`: what is in a class-folder dataset, before training.

OUT/report.md lists the classes with their counts, image sizes, formats and modes, the unusable
files with reasons, duplicates within and across classes, the imbalance ratio and what sits in
nested sub-folders; OUT/samples.png is a contact sheet (a few images per class, one named row per
class). Built on the scan of hw2_dataset; free of TensorFlow.
"""
from __future__ import annotations

import math
import os
import random
from collections import defaultdict
from typing import Iterable

import numpy as np
from PIL import Image

import run_dir
from hw2_dataset import (ImageInfo, Scan, _map, class_counts, find_duplicates, imbalance_note,
                         imbalance_ratio, lookalike_note, read_image)
from utils import count

SAMPLES_PER_CLASS = 8
_ROWS_PER_SHEET = 100  # classes per contact sheet: keeps samples.png a size an image viewer opens
_LISTED = 200  # rows of a long list (bad files, duplicate groups, sub-folders) shown in report.md
# What hw2's reader does with each PIL mode that is not plain RGB.
_MODE_NOTES = {"L": "grey, copied to 3 channels", "LA": "grey + transparency, over white",
               "P": "palette, converted", "PA": "palette + transparency, over white",
               "RGBA": "transparency, composited over white", "CMYK": "converted to RGB",
               "1": "black and white", "I;16": "16-bit grey, scaled to 8 bits",
               "I": "32-bit grey, scaled to 8 bits", "F": "float grey, scaled to 8 bits"}
_FORMAT_EXTENSIONS = {"JPEG": (".jpg", ".jpeg"), "PNG": (".png",), "BMP": (".bmp",), "GIF": (".gif",),
                      "WEBP": (".webp",), "TIFF": (".tif", ".tiff")}


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
    run_dir.atomic_write_text(path, "\n\n".join("\n".join(lines) for lines in sections if lines) + "\n")
    return [path] + sheets


def _md(text: str) -> str:
    """A file or class name as a Markdown code span that survives a table cell."""
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def _class_of(rel: str) -> str:
    return rel.split("/", 1)[0]


def _more(total: int, shown: int, where: str = "") -> list[str]:
    return [f"\n... and {total - shown} more{where}"] if total > shown else []


def _report_summary(scan: Scan, groups: list[list[str]], seconds: float | None) -> list[str]:
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    lines = [f"# Dataset report: {scan.data_dir}", "",
             f"{count(len(scan.items), 'usable image')} in {count(len(scan.class_names), 'class')}, "
             f"{count(len(scan.bad), 'unusable file')}, {count(len(groups), 'group')} of identical files; "
             f"scanned{took}. The label of an image is its top-level folder; images at any depth below it "
             f"belong to it."]
    notes = [imbalance_note(class_counts(scan.items, len(scan.class_names)), scan.class_names),
             lookalike_note(scan.class_names)]
    return lines + [f"\n**{note}**" for note in notes if note]


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
        what = "has an extension that does not match its" if len(mismatched) == 1 else \
            "have extensions that do not match their"
        lines.append(f"\n{count(len(mismatched), 'file')} {what} content, e.g. "
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
    lines = ["## Identical files", "", f"{count(len(groups), 'group')} of byte-identical images: {len(across)} across "
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
        lines += [f"{count(sum(folders.values()), 'image')} sit in {count(len(folders), 'sub-folder')} of "
                  f"{count(n_classes, 'class')}; each counts for its top-level class:", "", "| sub-folder | images |", "|---|---:|"]
        lines += [f"| {_md(f)} | {n} |" for f, n in sorted(folders.items())[:_LISTED]]
        lines += _more(len(folders), _LISTED)
    else:
        lines.append("None: every image sits directly in its class folder.")
    stray = [rel for rel, reason in scan.bad if reason == "not inside a class folder"]
    if stray:
        lines.append(f"\n{count(len(stray), 'image')} {'lies' if len(stray) == 1 else 'lie'} beside the class "
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
    for r, (name, n, _) in enumerate(rows):
        y = pad + r * (thumb + pad) + thumb // 3
        label = _fit(draw, run_dir.valid_utf8(name), font, label_width - 2 * pad)
        draw.text((pad, y), label, fill=(0, 0, 0), font=font)
        draw.text((pad, y + thumb // 4), count(n, "image"), fill=(110, 110, 110), font=small)
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
