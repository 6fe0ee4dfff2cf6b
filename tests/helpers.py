"""The one image-folder writer the tests share: small real PNG/JPEG files in class folders."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def make_image_folder(root, classes=("dark", "light"), per_class: int = 8, sizes=((20, 26), (27, 24), (34, 21)),
                      formats=("png", "jpg"), seed: int = 0, noise: float = 20.0) -> str:
    """Write root/<class>/<i>.<ext> and return str(root).

    Classes are told apart by brightness (class c of n is centred on 60 + 130 c / (n - 1)), so a
    tiny network learns them in a few steps. Image i takes sizes[i % len(sizes)] (h, w) and
    formats[i % len(formats)] ("png", "jpg", "JPEG", "bmp", ...).
    """
    rng = np.random.default_rng(seed)
    n = len(classes)
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        base = 60 + (130 * c / (n - 1) if n > 1 else 0)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            pixels = np.clip(base + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)
            ext = formats[i % len(formats)]
            Image.fromarray(pixels).save(os.path.join(root, name, f"{i}.{ext}"))
    return str(root)


def items_of(root) -> list[tuple[str, int]]:
    """(relative path, label) of every file under root/<class>/, classes sorted, as a split lists them."""
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    return [(f"{name}/{f}", label) for label, name in enumerate(classes)
            for f in sorted(os.listdir(os.path.join(root, name)))]


def bf16_kernels_missing() -> bool:
    """Whether ONEDNN_MAX_CPU_ISA caps oneDNN below its bf16 kernels on a CPU that has bf16
    hardware: TensorFlow's bf16 ops crash the process there (precision.py refuses bf16)."""
    import precision
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return bool(cap) and cap.upper() not in precision.BF16_ISAS and bool(
        precision.cpu_flags() & {"avx512_bf16", "amx_bf16"})
