"""ImageFolder trees (Resisc45, PCam exported as images, a device's own data): listing and decoding.

Layouts: `root/<class>/**/<image>` (one pool), or `root/train/<class>/...` with an optional
`root/test/<class>/...` (or `root/val/...`). Classes are the sorted sub-directory names of the training tree;
a test class the training tree lacks is a DataError. Files are listed up front (cheap) and decoded only when
a client needs them, with PIL, converted to RGB and resized to the target size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedpeft_edge.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
             "bicubic": Image.Resampling.BICUBIC}


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist; set data_args.data_cache_dir to an ImageFolder tree"
        )
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def list_image_folder(
    root: Path, class_names: Sequence[str] | None = None
) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """(files, int64 labels, class names) of one tree; `class_names` fixes the classes (for a test tree)."""
    dirs = _class_dirs(root)
    names = tuple(class_names) if class_names is not None else tuple(d.name for d in dirs)
    index = {name: i for i, name in enumerate(names)}
    files: list[Path] = []
    labels: list[int] = []
    for d in dirs:
        found = _images_under(d)
        if found and d.name not in index:
            raise DataError(
                f"class directory {d} is not among the training classes {list(names)[:10]}; the label is "
                f"outside [0, {len(names)}): add the class to the training tree (or to data_args.class_names), or "
                "rename or remove the directory"
            )
        files.extend(found)
        labels.extend([index.get(d.name, -1)] * len(found))
    if not files:
        raise DataError(
            f"image folder {root} holds no images (expected {root}/<class>/<image> with one of "
            f"{sorted(IMAGE_EXTENSIONS)}); put images in class sub-directories"
        )
    return files, np.asarray(labels, dtype=np.int64), names


def decode_images(
    files: Sequence[Path], size: tuple[int, int], interpolation: str = "bilinear"
) -> np.ndarray:
    """uint8 (n, H, W, 3) array of the files, converted to RGB and resized to size=(H, W)."""
    out = np.empty((len(files), size[0], size[1], 3), dtype=np.uint8)
    resample = _RESAMPLE.get(interpolation, Image.Resampling.BILINEAR)
    for i, path in enumerate(files):
        out[i] = decode_image(path, size, resample)
    return out


def decode_image(path: Path, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """One file as a uint8 (H, W, 3) array."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), resample)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}; remove or replace the file") from exc
