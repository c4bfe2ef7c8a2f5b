"""GLOM's picture: islands of agreement in the student's per-location outputs, level by level.

For each image, every level's grid of predicted tokens is projected to RGB with PCA (3 components) or
clustered with k-means; the teacher's cached tokens, when the input is a cache, are shown beside the student's
with the same projection fitted on both, so equal colours mean equal directions. The figure is a grid:
rows are images (each labelled), columns are the image then (student, teacher) per level, with a header row of
titles, gaps between panels and a caption that says what the colours mean.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from apmpipe.storage.cache import FeatureCache, is_zarr_group
from apmpipe.storage.errors import AT_LEAST_ONE, ConfigError, InputError, check_ranges
from apmpipe.storage.files import check_writable
from apmpipe.storage.redact import redact_url
from apmpipe.storage.sources import DEFAULT_MAX_PIXELS, ImageTooLarge, decode_image
from apmpipe.storage.stream import first_images, iter_subset

from .inputs import PixelNormalizer
from .preprocess import pixel_transform
from .runtime import resolve_device
from .student import cache_for_student, load_model

GAP = 8  # pixels between panels
HEADER = 22  # column titles
LABEL = 18  # each row's sample label, above its panels
CAPTION_LINE = 17
FONT_SIZE = 13
RANGES = dict.fromkeys(("images", "clusters", "panel"), AT_LEAST_ONE)  # the numeric options
PALETTE = np.array(
    [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
        (174, 199, 232),
        (255, 187, 120),
        (152, 223, 138),
        (255, 152, 150),
    ],
    dtype=np.uint8,
)
CAPTIONS = {
    "pca": "Colours: the three main directions (PCA) of a level's tokens, fitted on all panels of that level "
    "and image together, "
    "shown as red, green and blue. Locations of one colour carry similar tokens: an island of agreement.",
    "kmeans": "Colours: k-means clusters of a level's tokens, fitted on all panels of that level and image together. "
    "Locations of one colour fall in one cluster: an island of agreement.",
}
TEACHER_CAPTION = (
    " Student and teacher share the projection: where their colours match, the student reproduces the teacher."
)


@dataclass
class IslandsResult:
    path: str
    width: int
    height: int
    images: int
    with_teacher: bool
    converted: str = ""  # what was done to image files to fit the teacher's input ("" when nothing)


def _open_cache(sources: list[str], storage_options: dict) -> FeatureCache | None:
    """The feature cache when the one source is a Zarr group (local or fsspec URL), else None (image files)."""
    if len(sources) != 1:
        return None
    return (
        FeatureCache.open(sources[0], storage_options=storage_options)
        if is_zarr_group(sources[0], storage_options)
        else None
    )


def _conversions(originals: list[tuple[str, tuple[int, int]]], channels: int, size: tuple[int, int]) -> str:
    """One phrase for what fitting image files (PIL mode, width x height) to the teacher's input changed."""
    target = "grayscale" if channels == 1 else "RGB"
    recoloured = sorted({mode for mode, _ in originals if mode != ("L" if channels == 1 else "RGB")})
    resized = sum(dims != (size[1], size[0]) for _, dims in originals)
    parts = ([f"{'/'.join(recoloured)} to {target}"] if recoloured else []) + (
        [f"{resized} resized to {size[0]}x{size[1]}"] if resized else []
    )
    return (
        f"images converted to the teacher's {channels}-channel {size[0]}x{size[1]} input: {', '.join(parts)}"
        if parts
        else ""
    )


def _load_inputs(
    sources: list[str], cache: FeatureCache | None, layout: dict[str, Any], count: int
) -> tuple[np.ndarray, list[list[np.ndarray]] | None, list[str], str]:
    """uint8 pixels ``[N, C, H, W]``, teacher tokens per image per level (caches only), a title per image and
    what was converted (image files only)."""
    if cache is not None:
        pixels, teacher, names = [], [], []
        for shard, rows in first_images(cache, count).items():
            for data in iter_subset(cache, {shard: rows}, count):
                pixels.append(data.pixels)
                teacher += [[t[i] for t in data.tokens] for i in range(len(data.labels))]
                names += [f"{shard}/{k}" for k in data.keys]
        return np.concatenate(pixels), teacher, names, ""
    transform = pixel_transform(layout["data_config"])
    channels, height, width = layout["data_config"]["input_size"]
    pixels, originals = [], []
    for source in sources[:count]:
        try:
            data = Path(source).read_bytes()
            image = decode_image(data, channels)  # first: it refuses an image too large to decode, in one line
            with Image.open(io.BytesIO(data)) as header:
                originals.append((header.mode, header.size))
            pixels.append(transform(image).numpy())
        except ImageTooLarge:
            raise InputError(
                f"image {redact_url(source)!r} has more than {DEFAULT_MAX_PIXELS:,} pixels, islands' limit; pass a "
                "downscaled copy"
            ) from None
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read image {redact_url(source)!r}: {exc}") from None
    return (
        np.stack(pixels),
        None,
        [Path(s).name for s in sources[:count]],
        _conversions(originals, channels, (height, width)),
    )


def _project(mode: str, grids: list[np.ndarray], clusters: int) -> list[np.ndarray]:
    """Grids ``[h, w, D]`` -> RGB ``[h, w, 3]`` uint8 with one PCA/k-means fitted on all of them together."""
    h, w, d = grids[0].shape
    flat = np.concatenate([g.reshape(-1, d) for g in grids]).astype(np.float64)
    if mode == "pca":
        centred = flat - flat.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        comps = centred @ vt[:3].T
        comps = (comps - comps.min(0)) / np.maximum(comps.max(0) - comps.min(0), 1e-12)
        colours = (comps * 255).round().astype(np.uint8)
    else:
        from sklearn.cluster import KMeans

        normed = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
        labels = KMeans(n_clusters=min(clusters, len(flat)), n_init=4, random_state=0).fit_predict(normed)
        colours = PALETTE[labels % len(PALETTE)]
    return [c.reshape(h, w, 3) for c in np.split(colours, len(grids))]


def _panel(array: np.ndarray, size: int, grid_lines: bool = False) -> Image.Image:
    """An ``[h, w, C]`` uint8 array as a ``size`` x ``size`` RGB panel (crisp cells, thin lines between them)."""
    image = (
        Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
        .convert("RGB")
        .resize((size, size), Image.Resampling.NEAREST)
    )
    h, w = array.shape[:2]
    if grid_lines and size >= 6 * max(h, w):  # lines only where cells are big enough to keep their colour
        draw = ImageDraw.Draw(image)
        for i in range(1, h):
            draw.line([(0, i * size // h), (size, i * size // h)], fill=(255, 255, 255), width=1)
        for j in range(1, w):
            draw.line([(j * size // w, 0), (j * size // w, size)], fill=(255, 255, 255), width=1)
    return image


def _caption_lines(text: str, width_px: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> list[str]:
    """``text`` broken into lines that fit ``width_px``."""
    lines: list[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(trial) <= width_px:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines


def _grid_caption(grids: tuple[tuple[int, int], ...]) -> str:
    """What one square of a panel is: a location of the shared grid, or of that level's own grid."""
    if len(set(grids)) == 1:
        return f" Each square is one of the {grids[0][0]}x{grids[0][1]} locations."
    sizes = ", ".join(f"{h}x{w}" for h, w in grids)
    return f" Each square is one location of its level's own grid ({sizes}, level by level)."


def islands(
    student: str,
    sources: list[str],
    out: str,
    *,
    images: int = 4,
    mode: str = "pca",
    clusters: int = 6,
    panel: int = 160,
    device: str = "auto",
    storage_options: dict | None = None,
) -> IslandsResult:
    """Draw the islands figure for ``images`` inputs (a cache, or image files) and write it as PNG to ``out``.

    Rows are images (labelled above), columns the image then (student, teacher) per level, gaps between panels,
    and a caption under the grid saying what the colours mean.
    """
    if mode not in ("pca", "kmeans"):
        raise ConfigError(f"--mode {mode!r} is not pca or kmeans")
    if not sources:
        raise ConfigError("pass a feature cache or image files to draw")
    check_ranges({"images": images, "clusters": clusters, "panel": panel}, RANGES)
    check_writable(out, folder=False)
    dev = resolve_device(device)
    model, metadata = load_model(student, dev, storage_options)
    cache = _open_cache(sources, storage_options or {})
    if cache is not None:
        cache = cache_for_student(metadata, cache, "cache")
    pixels, teacher, names, converted = _load_inputs(sources, cache, metadata["layout"], images)
    cfg = model.config
    normalize = PixelNormalizer(metadata["layout"]["data_config"]).to(dev)
    predicted = model.predict_tokens(normalize(torch.from_numpy(pixels).to(dev)))
    levels = [lv["layer"] for lv in metadata["layout"]["levels"]]
    per_level = 2 if teacher is not None else 1
    titles = ["image"] + [
        f"{who} L{layer}"
        for layer in levels
        for who in (("student", "teacher") if teacher is not None else ("student",))
    ]
    font = ImageFont.load_default(size=FONT_SIZE)
    width = GAP + len(titles) * (panel + GAP)
    caption = _caption_lines(
        CAPTIONS[mode] + (TEACHER_CAPTION if teacher is not None else "") + _grid_caption(cfg.grids),
        width - 2 * GAP,
        font,
    )
    rows_bottom = HEADER + len(pixels) * (LABEL + panel + GAP)
    canvas = Image.new("RGB", (width, rows_bottom + GAP + len(caption) * CAPTION_LINE), "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(titles):
        draw.text((GAP + col * (panel + GAP), 4), title, fill="black", font=font)
    for row in range(len(pixels)):
        top = HEADER + row * (LABEL + panel + GAP)
        draw.text((GAP, top + 1), names[row], fill=(60, 60, 60), font=font)
        canvas.paste(_panel(pixels[row].transpose(1, 2, 0), panel), (GAP, top + LABEL))
        for li, ((h, w), prefix) in enumerate(zip(cfg.grids, cfg.prefixes, strict=True)):
            grids = [predicted[li][row, prefix:].float().cpu().numpy().reshape(h, w, -1)]
            if teacher is not None:
                grids.append(teacher[row][li][prefix:].astype(np.float32).reshape(h, w, -1))
            for k, colours in enumerate(_project(mode, grids, clusters)):
                canvas.paste(
                    _panel(colours, panel, grid_lines=True),
                    (GAP + (1 + li * per_level + k) * (panel + GAP), top + LABEL),
                )
    for i, line in enumerate(caption):
        draw.text((GAP, rows_bottom + i * CAPTION_LINE), line, fill="black", font=font)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return IslandsResult(
        path=str(out),
        width=canvas.width,
        height=canvas.height,
        images=len(pixels),
        with_teacher=teacher is not None,
        converted=converted,
    )
