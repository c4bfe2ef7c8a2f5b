"""Embedded real data: scikit-learn's labelled digits written as WebDataset shards (no download needed).

Used by ``apmpipe demo``, ``apmpipe bench`` and the tests. Each 8x8 digit (values 0..16) is scaled to
0..255 and upscaled (nearest) to ``size`` pixels, stored as PNG with its class in ``cls``.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from sklearn.datasets import load_digits


def digit_images(size: int = 32, mode: str = "L") -> tuple[list[Image.Image], np.ndarray]:
    """All 1,797 digits as PIL images of ``size`` x ``size`` (mode ``L`` or ``RGB``) and their labels."""
    digits = load_digits()
    images = []
    for pixels in digits.images:
        gray = Image.fromarray((pixels * (255.0 / 16.0)).round().astype(np.uint8))
        images.append(gray.resize((size, size), Image.Resampling.NEAREST).convert(mode))
    return images, digits.target.astype(np.int64)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_digit_shards(out_dir: str | Path, *, prefix: str = "digits", count: int = 1797, per_shard: int = 256, size: int = 32, start: int = 0, mode: str = "L") -> list[str]:
    """Write digits ``start:start+count`` as ``{prefix}-NNNN.tar`` shards; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = digit_images(size, mode)
    stop = min(start + count, len(images))
    paths = []
    for shard, first in enumerate(range(start, stop, per_shard)):
        path = out_dir / f"{prefix}-{shard:04d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for index in range(first, min(first + per_shard, stop)):
                sink.write({"__key__": f"{index:05d}", "png": _png(images[index]), "cls": str(int(labels[index]))})
        paths.append(str(path))
    return paths
