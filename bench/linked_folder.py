"""Class folders of symlinks: the benches' pools and test sets, made without copying a photo."""
from __future__ import annotations

import os


def link_image(data_dir: str, rel: str, out: str, class_name: str) -> None:
    """OUT/CLASS_NAME/<rel below its class folder, '/' as '__'> -> DATA_DIR/REL; an existing link stays."""
    target = os.path.join(out, class_name, rel.split("/", 1)[1].replace("/", "__"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not os.path.lexists(target):
        os.symlink(os.path.join(data_dir, rel), target)
