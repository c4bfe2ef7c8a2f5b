"""Input datasets: WebDataset tar shards and image folders, as a list of shard units.

A :class:`ShardSource` is the unit of work, of resume and of distribution: one WebDataset tar (``.tar``,
``.tar.gz``, ``.tgz``; local path or fsspec URL) or one fixed-size block of an image folder
(``root/<class>/<file>``, classes sorted by name as torchvision's ``ImageFolder`` does). Each becomes one
group in the feature cache, named by :attr:`ShardSource.name`.

:func:`iter_samples` yields raw :class:`Sample` records (key, encoded bytes, label); decoding is left to the
consumer so that a corrupt image can be skipped and recorded with its key.
"""
from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import braceexpand
import fsspec
import fsspec.implementations.local
import numpy as np
import webdataset as wds
from PIL import Image

from .errors import InputError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "tif", "tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
NO_LABEL = -1


@dataclass(frozen=True)
class ShardSource:
    """One unit of extraction work.

    Args:
        name: group name in the cache (unique within a run, stable across runs).
        url: the tar shard, or the image folder root for a folder block.
        files: for a folder block, the image paths relative to ``url``; empty for a tar shard.
        labels: for a folder block, the class index of each file.
    """

    name: str
    url: str
    files: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()

    @property
    def is_folder_block(self) -> bool:
        return bool(self.files)

    @property
    def fingerprint(self) -> str:
        """What the shard group was made from: the tar's URL, or a hash of a folder block's files and labels."""
        if not self.is_folder_block:
            return self.url
        digest = hashlib.sha1("\n".join(f"{f}\t{label}" for f, label in zip(self.files, self.labels)).encode()).hexdigest()
        return f"{self.url}#files-sha1={digest}"


@dataclass(frozen=True)
class Sample:
    """A raw sample: key, encoded image bytes (None when the sample has no image) and label."""

    key: str
    image: bytes | None
    label: int


@dataclass(frozen=True)
class ResolvedInputs:
    """The shard units of a run plus the class names of image folders (empty for tar shards)."""

    shards: tuple[ShardSource, ...]
    classes: tuple[str, ...] = ()


def _is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def _is_image(path: str) -> bool:
    return path.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def _stem(path: str) -> str:
    base = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in TAR_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "shard"


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path of ``fs`` as a URL fsspec can open again (plain paths for the local filesystem)."""
    return path if isinstance(fs, fsspec.implementations.local.LocalFileSystem) else fs.unstrip_protocol(path)


def _expand(pattern: str, storage_options: dict) -> list[tuple[fsspec.AbstractFileSystem, str, str]]:
    """Expand braces and globs; return (filesystem, path, url) triples that exist."""
    found = []
    for item in braceexpand.braceexpand(pattern):
        fs, path = fsspec.core.url_to_fs(item, **storage_options)
        paths = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
        for p in paths:
            if not fs.exists(p):
                raise InputError(f"input {item!r} does not exist; check the path or URL")
            found.append((fs, p, _url(fs, p)))
    if not found:
        raise InputError(f"input pattern {pattern!r} matched no files")
    return found


def _folder_blocks(fs: fsspec.AbstractFileSystem, root: str, url: str, block: int) -> tuple[list[ShardSource], list[str]]:
    classes = sorted(_stem(d) for d in fs.ls(root, detail=False) if fs.isdir(d))
    if not classes:
        raise InputError(f"folder {url!r} has neither tar shards nor class sub-folders (root/<class>/<image>)")
    files: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        for path in sorted(fs.find(f"{root.rstrip('/')}/{name}")):
            if _is_image(path):
                files.append((path[len(root.rstrip("/")) + 1 :], index))
    if not files:
        raise InputError(f"folder {url!r} has class folders but no images with extensions {', '.join(IMAGE_EXTENSIONS)}")
    stem = _safe_name(_stem(root))
    blocks = [
        ShardSource(
            name=f"{stem}-{start // block:05d}",
            url=url,
            files=tuple(f for f, _ in files[start : start + block]),
            labels=tuple(lab for _, lab in files[start : start + block]),
        )
        for start in range(0, len(files), block)
    ]
    return blocks, classes


def _disambiguate(shards: list[ShardSource]) -> list[ShardSource]:
    """Give shards that share a stem (``a/000.tar`` and ``b/000.tar``) names suffixed by a hash of their URL."""
    counts = Counter(s.name for s in shards)
    out = []
    for s in shards:
        if counts[s.name] > 1:
            digest = hashlib.sha1(s.url.encode()).hexdigest()[:8]
            s = ShardSource(name=f"{s.name}-{digest}", url=s.url, files=s.files, labels=s.labels)
        out.append(s)
    return out


def resolve_inputs(inputs: Sequence[str], *, folder_block: int = 1000, storage_options: dict | None = None) -> ResolvedInputs:
    """Turn the user's SOURCE arguments into shard units.

    Each input may be a tar shard, a brace pattern (``train-{0000..0099}.tar``), a glob, a directory of tar
    shards, or an image folder ``root/<class>/<file>``; local paths or fsspec URLs.
    """
    storage_options = storage_options or {}
    shards: list[ShardSource] = []
    classes: list[str] = []
    for pattern in inputs:
        for fs, path, url in _expand(pattern, storage_options):
            if fs.isdir(path):
                tars = sorted(p for p in fs.find(path) if _is_tar(p))
                if tars:
                    shards += [ShardSource(name=_safe_name(_stem(t)), url=_url(fs, t)) for t in tars]
                    continue
                blocks, names = _folder_blocks(fs, path, url, folder_block)
                if classes and names != classes:
                    raise InputError(f"image folder {url!r} has classes {names[:5]}... unlike an earlier folder; extract them into separate caches")
                classes = names
                shards += blocks
            elif _is_tar(path):
                shards.append(ShardSource(name=_safe_name(_stem(path)), url=url))
            else:
                raise InputError(f"input {url!r} is neither a tar shard ({', '.join(TAR_SUFFIXES)}) nor a folder")
    return ResolvedInputs(shards=tuple(_disambiguate(shards)), classes=tuple(classes))


def _parse_label(sample: dict, label_key: str | None) -> int:
    if not label_key:
        return NO_LABEL
    raw = sample.get(label_key.lower())
    if raw is None:
        return NO_LABEL
    text = raw.decode("utf-8").strip() if isinstance(raw, bytes) else str(raw)
    try:
        return int(text)
    except ValueError:
        raise InputError(f"label {label_key!r} of sample {sample.get('__key__')!r} is {text[:20]!r}, not an integer; pass --label-key or --no-labels") from None


def _iter_tar(source: ShardSource, label_key: str | None, storage_options: dict) -> Iterator[Sample]:
    with fsspec.open(source.url, "rb", **storage_options) as stream:
        files = wds.tariterators.tar_file_expander([{"url": source.url, "stream": stream}])
        for sample in wds.tariterators.group_by_keys(files):
            image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
            image = sample[image_ext] if image_ext else None
            yield Sample(key=sample["__key__"], image=image, label=_parse_label(sample, label_key))


def _iter_folder_block(source: ShardSource, storage_options: dict) -> Iterator[Sample]:
    fs, root = fsspec.core.url_to_fs(source.url, **storage_options)
    for rel, label in zip(source.files, source.labels):
        yield Sample(key=rel.rsplit(".", 1)[0], image=fs.cat_file(f"{root.rstrip('/')}/{rel}"), label=label)


def iter_samples(source: ShardSource, *, label_key: str | None = "cls", storage_options: dict | None = None) -> Iterator[Sample]:
    """Yield the raw samples of one shard in stored order. Raises on an unreadable or truncated shard."""
    storage_options = storage_options or {}
    if source.is_folder_block:
        yield from _iter_folder_block(source, storage_options)
    else:
        yield from _iter_tar(source, label_key, storage_options)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Map 16/32-bit integer and float images to 8 bits (full range), keeping other modes."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image)
        if image.mode == "F":
            top = 1.0 if array.max(initial=0) <= 1.0 else 255.0
        else:
            top = 65535.0 if array.max(initial=0) > 255 else 255.0
        scaled = np.clip(array.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled)
    return image


def decode_image(data: bytes, channels: int) -> Image.Image:
    """Decode image bytes into an 8-bit image with ``channels`` (1: ``L``, 3: ``RGB``).

    Grayscale, palette (with transparency), RGBA, CMYK and 16-bit inputs are converted; alpha is dropped.
    Raises ``OSError``/``ValueError`` (from PIL) for undecodable or truncated data.
    """
    image = Image.open(io.BytesIO(data))
    image.load()
    image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("L" if channels == 1 else "RGB")
