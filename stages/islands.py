"""GLOM's picture: islands of agreement in the student's per-location outputs, level by level.

For each image, every level's grid of predicted tokens is projected to RGB with PCA (3 components) or
clustered with k-means; the teacher's cached tokens, when the input is a cache, are shown beside the student's
with the same projection fitted on both, so equal colours mean equal directions. The figure is a grid:
rows are images, columns are the image then (student, teacher) per level, with a header row of titles.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image, ImageDraw

from storage.cache import FeatureCache
from storage.errors import ConfigError, InputError
from storage.sources import decode_image
from storage.stream import iter_cache

from .student import check_student_matches, load_model
from .preprocess import pixel_transform
from .runtime import resolve_device
from .inputs import PixelNormalizer

HEADER = 22
PALETTE = np.array([
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194),
    (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150),
], dtype=np.uint8)


@dataclass
class IslandsResult:
    path: str
    width: int
    height: int
    images: int
    with_teacher: bool


def _open_cache(sources: list[str], storage_options: dict) -> FeatureCache | None:
    """The feature cache when the one source is a Zarr group (local or fsspec URL), else None (image files)."""
    if len(sources) != 1:
        return None
    fs, path = fsspec.core.url_to_fs(sources[0], **storage_options)
    return FeatureCache.open(sources[0], storage_options=storage_options) if fs.exists(f"{path.rstrip('/')}/zarr.json") else None


def _load_inputs(sources: list[str], cache: FeatureCache | None, layout: dict[str, Any], count: int) -> tuple[np.ndarray, list[list[np.ndarray]] | None, list[str]]:
    """uint8 pixels ``[N, C, H, W]``, teacher tokens per image per level (caches only) and a title per image."""
    if cache is not None:
        pixels, teacher, names = [], [], []
        for shard, start, data in iter_cache(cache, count, count):
            pixels.append(data.pixels)
            teacher += [[t[i] for t in data.tokens] for i in range(len(data.labels))]
            names += [f"{shard}/{k}" for k in data.keys]
        return np.concatenate(pixels), teacher, names
    transform = pixel_transform(layout["data_config"])
    channels = layout["data_config"]["input_size"][0]
    pixels = []
    for source in sources[:count]:
        try:
            pixels.append(transform(decode_image(Path(source).read_bytes(), channels)).numpy())
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read image {source!r}: {exc}") from None
    return np.stack(pixels), None, [Path(s).name for s in sources[:count]]


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


def _panel(array: np.ndarray, size: int) -> Image.Image:
    image = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    return image.convert("RGB").resize((size, size), Image.Resampling.NEAREST)


def islands(
    student: str, sources: list[str], out: str, *, images: int = 4, mode: str = "pca", clusters: int = 6, panel: int = 160, device: str = "auto",
    storage_options: dict | None = None,
) -> IslandsResult:
    """Draw the islands figure for ``images`` inputs (a cache, or image files) and write it as PNG to ``out``."""
    if mode not in ("pca", "kmeans"):
        raise ConfigError(f"--mode {mode!r} is not pca or kmeans")
    if not sources:
        raise ConfigError("pass a feature cache or image files to draw")
    dev = resolve_device(device)
    model, metadata = load_model(student, dev)
    cache = _open_cache(sources, storage_options or {})
    if cache is not None:
        check_student_matches(metadata, cache, "cache")
    pixels, teacher, names = _load_inputs(sources, cache, metadata["layout"], images)
    cfg = model.config
    normalize = PixelNormalizer(metadata["layout"]["data_config"]).to(dev)
    predicted = model.predict_tokens(normalize(torch.from_numpy(pixels).to(dev)))
    levels = [lv["layer"] for lv in metadata["layout"]["levels"]]
    per_level = 2 if teacher is not None else 1
    columns = 1 + per_level * len(levels)
    canvas = Image.new("RGB", (columns * panel, HEADER + len(pixels) * panel), "white")
    draw = ImageDraw.Draw(canvas)
    titles = ["image"] + [f"{who} L{layer}" for layer in levels for who in (("student", "teacher") if teacher is not None else ("student",))]
    for col, title in enumerate(titles):
        draw.text((col * panel + 4, 5), title, fill="black")
    h, w = cfg.grid
    for row in range(len(pixels)):
        top = HEADER + row * panel
        canvas.paste(_panel(pixels[row].transpose(1, 2, 0), panel), (0, top))
        draw.text((3, top + 3), names[row][-24:], fill="yellow")
        for li in range(len(levels)):
            grids = [predicted[li][row, cfg.prefix_tokens :].float().cpu().numpy().reshape(h, w, -1)]
            if teacher is not None:
                grids.append(teacher[row][li][cfg.prefix_tokens :].astype(np.float32).reshape(h, w, -1))
            for k, colours in enumerate(_project(mode, grids, clusters)):
                canvas.paste(_panel(colours, panel), ((1 + li * per_level + k) * panel, top))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return IslandsResult(path=str(out), width=canvas.width, height=canvas.height, images=len(pixels), with_teacher=teacher is not None)
