"""Embedded real data: scikit-learn's labelled digits written as WebDataset shards (no download needed).

Used by ``apmpipe demo``, ``apmpipe bench``, the offline reference teacher and the tests. Each 8x8 digit
(values 0..16) is scaled to 0..255 and upscaled (bicubic by default) to ``size`` pixels, stored as PNG with
its class in ``cls``. :func:`digit_split` is the seeded train/validation split every consumer shares.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits

DIGITS = 1797
TRAIN_DIGITS = 1297


def digit_images(size: int = 32, mode: str = "L", resample: str = "bicubic") -> tuple[list[Image.Image], np.ndarray]:
    """All 1,797 digits as PIL images of ``size`` x ``size`` (mode ``L`` or ``RGB``) and their labels."""
    digits = load_digits()
    method = Image.Resampling[resample.upper()]
    images = []
    for pixels in digits.images:
        gray = Image.fromarray((pixels * (255.0 / 16.0)).round().astype(np.uint8))
        images.append(gray.resize((size, size), method).convert(mode))
    return images, digits.target.astype(np.int64)


def digit_split(seed: int = 0, train: int = TRAIN_DIGITS) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of the digit indices into ``train`` training and the rest validation."""
    order = np.random.default_rng(seed).permutation(DIGITS)
    return np.sort(order[:train]), np.sort(order[train:])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_digit_shards(
    out_dir: str | Path,
    *,
    prefix: str = "digits",
    count: int = DIGITS,
    per_shard: int = 256,
    size: int = 32,
    start: int = 0,
    mode: str = "L",
    indices: Sequence[int] | None = None,
) -> list[str]:
    """Write the digits ``indices`` (default ``start:start+count``) as ``{prefix}-NNNN.tar`` shards; return their
    paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images(size, mode)
    chosen = list(indices) if indices is not None else list(range(start, min(start + count, len(images))))
    paths = []
    for shard, first in enumerate(range(0, len(chosen), per_shard)):
        path = out_dir / f"{prefix}-{shard:04d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for index in chosen[first : first + per_shard]:
                sink.write({"__key__": f"{index:05d}", "png": _png(images[index]), "cls": str(int(labels[index]))})
        paths.append(str(path))
    return paths
