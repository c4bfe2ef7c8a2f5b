"""Embedded data, no download needed: scikit-learn's labelled digits and digit glyphs rendered from fonts.

Used by ``apmpipe demo``, ``apmpipe bench``, the offline reference teachers and the tests. Each 8x8 digit
(values 0..16) is scaled to 0..255 and upscaled (bicubic by default) to ``size`` pixels, stored as PNG with
its class in ``cls``. :func:`digit_split` is the seeded train/validation split every consumer shares.
:func:`glyph_images` renders digits at native resolution from the TrueType fonts matplotlib ships, each with its
own random font, stroke, affine and elastic distortion and noise: image ``i`` depends only on ``(seed, i)``, so
disjoint index ranges are disjoint splits.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage
from sklearn.datasets import load_digits

DIGITS = 1797
TRAIN_DIGITS = 1297
FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
GLYPH_FONTS = (
    *(f"DejaVu{face}{style}.ttf" for face in ("Sans", "SansMono", "Serif") for style in ("", "-Bold")),
    *(f"DejaVu{face}-{style}.ttf" for face in ("Sans", "SansMono") for style in ("Oblique", "BoldOblique")),
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    *(f"STIXGeneral{style}.ttf" for style in ("", "Bol", "Italic", "BolIta")),
    *(f"cm{face}10.ttf" for face in ("r", "b", "ss", "tt", "ti")),
)


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


def _glyph(rng: np.random.Generator, label: int, size: int, fonts: Sequence[Path]) -> np.ndarray:
    """One digit ``label`` as uint8 ``[size, size]``: random font, glyph height, stroke, affine, elastic, noise."""
    canvas = 2 * size
    font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(size * rng.uniform(0.6, 0.9)))
    image = Image.new("L", (canvas, canvas))
    ImageDraw.Draw(image).text(
        (canvas / 2, canvas / 2), str(label), fill=255, font=font, anchor="mm", stroke_width=int(rng.integers(0, 2))
    )
    angle, shear = np.deg2rad(rng.uniform(-15, 15)), rng.uniform(-0.3, 0.3)
    scale = rng.uniform(0.85, 1.15)
    # output pixel (x, y) -> input pixel: rotation, shear and scale about the centre, then a shift of up to 3 px
    a = np.array([[np.cos(angle), -np.sin(angle) + shear], [np.sin(angle), np.cos(angle)]]) / scale
    centre_out = np.array([size / 2, size / 2]) + rng.uniform(-3, 3, 2)
    offset = np.array([canvas / 2, canvas / 2]) - a @ centre_out
    image = image.transform((size, size), Image.Transform.AFFINE, (*a[0], offset[0], *a[1], offset[1]), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    shift = [ndimage.gaussian_filter(rng.uniform(-1, 1, (size, size)), 4.0) * rng.uniform(10, 25) for _ in range(2)]
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    pixels = ndimage.map_coordinates(pixels, [rows + shift[0], cols + shift[1]], order=1, mode="constant")
    ink, paper = rng.uniform(150, 255), rng.uniform(0, 50)
    pixels = paper + pixels / 255.0 * (ink - paper) + rng.normal(0, rng.uniform(0, 15), pixels.shape)
    return np.clip(pixels, 0, 255).round().astype(np.uint8)


def glyph_images(count: int, *, start: int = 0, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Rendered digits ``start .. start+count`` as uint8 ``[count, size, size]`` and their labels (``i % 10``)."""
    fonts = [FONT_DIR / name for name in GLYPH_FONTS]
    labels = np.arange(start, start + count, dtype=np.int64) % 10
    images = [_glyph(np.random.default_rng([seed, i]), int(i % 10), size, fonts) for i in range(start, start + count)]
    return np.stack(images) if images else np.zeros((0, size, size), np.uint8), labels


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shards(
    out_dir: str | Path, prefix: str, samples: Sequence[tuple[str, Image.Image, int]], per_shard: int
) -> list[str]:
    """``(key, image, label)`` samples as ``{prefix}-NNNN.tar`` shards of ``per_shard``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, first in enumerate(range(0, len(samples), per_shard)):
        path = out_dir / f"{prefix}-{shard:04d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for key, image, label in samples[first : first + per_shard]:
                sink.write({"__key__": key, "png": _png(image), "cls": str(label)})
        paths.append(str(path))
    return paths


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
    images, labels = digit_images(size, mode)
    chosen = list(indices) if indices is not None else list(range(start, min(start + count, len(images))))
    samples = [(f"{index:05d}", images[index], int(labels[index])) for index in chosen]
    return _write_shards(out_dir, prefix, samples, per_shard)


def write_glyph_shards(
    out_dir: str | Path, *, prefix: str, count: int, start: int = 0, seed: int = 0, per_shard: int = 256, size: int = 32
) -> list[str]:
    """Write the rendered digits ``start .. start+count`` (:func:`glyph_images`) as grayscale PNG shards."""
    pixels, labels = glyph_images(count, start=start, seed=seed, size=size)
    keys = range(start, start + count)
    samples = [
        (f"{key:07d}", Image.fromarray(image), int(label))
        for key, image, label in zip(keys, pixels, labels, strict=True)
    ]
    return _write_shards(out_dir, prefix, samples, per_shard)
