"""Input datasets: WebDataset tar shards and image folders, as a list of shard units.

A :class:`ShardSource` is the unit of work, of resume and of distribution: one WebDataset tar (``.tar``,
``.tar.gz``, ``.tgz``; local path, fsspec URL, or WebDataset's ``pipe:COMMAND`` whose output is the tar) or
one fixed-size block of an image folder
(``root/<class>/<file>``, classes sorted by name as torchvision's ``ImageFolder`` does). Each becomes one
group in the feature cache, named by :attr:`ShardSource.name`: the tar's stem or ``<folder>-NNNNN``, a
function of that input alone, so a group keeps its name whatever else a run extracts. Inputs are
deduplicated by resolved URL (symlinks followed); two different inputs with one name are refused.

:func:`iter_samples` yields raw :class:`Sample` records (key, encoded bytes, label, and a problem such as an
unparsable label); decoding is left to the consumer so that a bad sample can be skipped and recorded.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import braceexpand
import fsspec
import fsspec.implementations.local
import numpy as np
from PIL import Image

from .errors import InputError
from .kinds import IMAGES, kind_mismatch, kind_of
from .redact import PIPE, TAR_SUFFIXES, redact_url

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "tif", "tiff")
NO_LABEL = -1
DEFAULT_MAX_PIXELS = 64_000_000  # decoded pixels per image (a 8000 x 8000 photo); larger images are skipped


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
        digest = hashlib.sha1(
            "\n".join(f"{f}\t{label}" for f, label in zip(self.files, self.labels, strict=True)).encode()
        ).hexdigest()
        return f"{self.url}#files-sha1={digest}"


@dataclass(frozen=True)
class Sample:
    """A raw sample: key, encoded image bytes (None when the sample has no image), label, and ``problem``: why
    the sample must be skipped (e.g. a label that is not a class), or None."""

    key: str
    image: bytes | None
    label: int
    problem: str | None = None


class ImageTooLarge(ValueError):
    """An image has more pixels than the configured limit (raised before its pixels are decoded)."""


@dataclass(frozen=True)
class ResolvedInputs:
    """The shard units of a run plus the class names of image folders (empty for tar shards)."""

    shards: tuple[ShardSource, ...]
    classes: tuple[str, ...] = ()

    @property
    def all_folder_blocks(self) -> bool:
        """Whether every unit is an image-folder block (images counted from their file lists, none read)."""
        return all(shard.is_folder_block for shard in self.shards)


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
    """A path of ``fs`` as a URL fsspec can open again: resolved local paths (symlinks followed), else full URLs."""
    return (
        os.path.realpath(path)
        if isinstance(fs, fsspec.implementations.local.LocalFileSystem)
        else fs.unstrip_protocol(path)
    )


def _expand(pattern: str, storage_options: dict) -> list[tuple[fsspec.AbstractFileSystem, str, str]]:
    """Expand braces and globs; return (filesystem, path, url) triples that exist."""
    found = []
    for item in braceexpand.braceexpand(pattern):
        fs, path = fsspec.core.url_to_fs(item, **storage_options)
        paths = sorted(fs.glob(path)) if any(c in path for c in "*?[") else [path]
        for p in paths:
            if not fs.exists(p):
                raise InputError(f"input {redact_url(item)!r} does not exist; check the path or URL")
            found.append((fs, p, _url(fs, p)))
    if not found:
        raise InputError(f"input pattern {redact_url(pattern)!r} matched no files")
    return found


def _pipe_shards(pattern: str) -> list[ShardSource]:
    """``pipe:COMMAND`` inputs (braces expanded, as WebDataset does), each named after the tar its command names."""
    shards = []
    for item in braceexpand.braceexpand(pattern):
        try:
            words = shlex.split(item[len(PIPE) :])
        except ValueError as exc:
            raise InputError(f"input {redact_url(item)!r} is not a valid shell command ({exc})") from None
        tars = [w for w in words if _is_tar(w.split("?", 1)[0])]
        if not tars:
            raise InputError(
                f"input {redact_url(item)!r} names no .tar/.tar.gz/.tgz file in its command; the shard "
                "group is named after it, "
                "e.g. 'pipe:curl -s https://host/train-0000.tar'"
            )
        shards.append(ShardSource(name=_safe_name(_stem(tars[-1].split("?", 1)[0])), url=item))
    return shards


def _folder_blocks(
    fs: fsspec.AbstractFileSystem, root: str, url: str, block: int
) -> tuple[list[ShardSource], list[str]]:
    classes = sorted(_stem(d) for d in fs.ls(root, detail=False) if fs.isdir(d))
    if not classes:
        raise InputError(
            f"folder {redact_url(url)!r} has neither tar shards nor class sub-folders (root/<class>/<image>)"
        )
    files: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        for path in sorted(fs.find(f"{root.rstrip('/')}/{name}")):
            if _is_image(path):
                files.append((path[len(root.rstrip("/")) + 1 :], index))
    if not files:
        raise InputError(
            f"folder {redact_url(url)!r} has class folders but no images with extensions {', '.join(IMAGE_EXTENSIONS)}"
        )
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


def _unique(shards: list[ShardSource]) -> list[ShardSource]:
    """Drop repeats of one input by resolved URL (``a.tar`` and ``dir/*.tar``; a tar and a symlink to it, under
    another name); refuse two inputs that would share a group name."""
    seen: dict[str, ShardSource] = {}
    made_from: set[str] = set()
    out = []
    for shard in shards:
        if shard.fingerprint in made_from:
            continue
        other = seen.setdefault(shard.name, shard)
        if other is shard:
            made_from.add(shard.fingerprint)
            out.append(shard)
        elif other.fingerprint != shard.fingerprint:
            raise InputError(
                f"inputs {redact_url(other.url)!r} and {redact_url(shard.url)!r} would both be shard "
                f"group {shard.name!r} "
                "(groups are named by file stem); extract them into separate caches or rename one"
            )
    return out


def resolve_inputs(
    inputs: Sequence[str], *, folder_block: int = 1000, storage_options: dict | None = None
) -> ResolvedInputs:
    """Turn the user's SOURCE arguments into shard units.

    Each input may be a tar shard, a brace pattern (``train-{0000..0099}.tar``), a glob, a directory of tar
    shards, or an image folder ``root/<class>/<file>``; local paths or fsspec URLs; or ``pipe:COMMAND``
    writing a tar shard to stdout (run by the shell when the shard is read, as in WebDataset).
    """
    storage_options = storage_options or {}
    shards: list[ShardSource] = []
    classes: list[str] = []
    for pattern in inputs:
        if pattern.startswith(PIPE):
            shards += _pipe_shards(pattern)
            continue
        for fs, path, url in _expand(pattern, storage_options):
            _refuse_other_kinds(fs, path, url)
            if fs.isdir(path):
                tars = sorted(p for p in fs.find(path) if _is_tar(p))
                if tars:
                    shards += [ShardSource(name=_safe_name(_stem(t)), url=_url(fs, t)) for t in tars]
                    continue
                blocks, names = _folder_blocks(fs, path, url, folder_block)
                if classes and names != classes:
                    raise InputError(
                        f"image folder {redact_url(url)!r} has classes {names[:5]}... unlike an earlier folder; "
                        "extract them into separate caches"
                    )
                classes = names
                shards += blocks
            elif _is_tar(path):
                shards.append(ShardSource(name=_safe_name(_stem(path)), url=url))
            else:
                raise InputError(
                    f"input {redact_url(url)!r} is neither a tar shard ({', '.join(TAR_SUFFIXES)}) nor a folder"
                )
    return ResolvedInputs(shards=tuple(_unique(shards)), classes=tuple(classes))


def _refuse_other_kinds(fs: fsspec.AbstractFileSystem, path: str, url: str) -> None:
    """An input that apmpipe itself wrote (a cache, a run, an embedding folder) is not images: say what it is."""
    message = kind_mismatch(url, kind_of(fs, path), IMAGES)
    if message:
        raise InputError(f"input {message}")


def done_shards(shards: Sequence[ShardSource], made_from: dict[str, str], where: str) -> set[str]:
    """Names of ``shards`` already done in ``where`` (a cache, an output folder), whose records ``made_from`` map
    each done name to the fingerprint it was made from (redacted, as stored): a shard counts under its own name or
    another one (the same tar reached through a symlink). Refuses (InputError) a shard whose name matches a done
    one made from something else (another tar, a changed folder block)."""
    made = {redact_url(f) for f in made_from.values()}  # records of older apmpipes redacted less: as now
    done = set()
    for shard in shards:
        fingerprint = redact_url(shard.fingerprint)
        if fingerprint in made:
            done.add(shard.name)
        elif shard.name in made_from:
            raise InputError(
                f"{where} already holds shard {shard.name!r} made from {made_from[shard.name]!r}, not from "
                f"{fingerprint!r}; write other data into another --out (or restore the original inputs)"
            )
    return done


def read_class_names(path: str, storage_options: dict | None = None) -> tuple[str, ...]:
    """Class names, one per line (label = line number from 0), for tar shards whose labels are names."""
    try:
        with fsspec.open(path, "rt", encoding="utf-8", **(storage_options or {})) as handle:
            names = tuple(line.strip() for line in handle if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--class-names {redact_url(path)!r} cannot be read ({type(exc).__name__}: {exc})") from None
    if not names or len(set(names)) != len(names):
        raise InputError(f"--class-names {redact_url(path)!r} must list distinct class names, one per line")
    return names


def _label_value(sample: dict, label_key: str) -> object:
    """The raw label: field ``cls``, or ``json:a.b`` for a path inside the sample's JSON field; None when absent."""
    field, _, path = label_key.partition(":")
    raw = sample.get(field.lower())
    if raw is None or not path:
        return raw.decode("utf-8").strip() if isinstance(raw, bytes) else raw
    value = json.loads(raw)
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _parse_label(sample: dict, label_key: str | None, class_names: tuple[str, ...]) -> tuple[int, str | None]:
    """(label, None), or (NO_LABEL, why the sample is skipped)."""
    if not label_key:
        return NO_LABEL, None
    try:
        value = _label_value(sample, label_key)
    except (ValueError, UnicodeDecodeError) as exc:
        return NO_LABEL, f"label field of {label_key!r} is not valid JSON/UTF-8: {exc}"
    if value is None:
        return NO_LABEL, None
    if class_names and isinstance(value, str) and value in class_names:
        return class_names.index(value), None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return NO_LABEL, f"label {label_key!r} is {str(value)[:20]!r}, not an integer or class name"
    try:
        label = int(value)
    except ValueError:
        hint = "not in --class-names" if class_names else "not an integer (pass --class-names for named labels)"
        return NO_LABEL, f"label {label_key!r} is {value[:20]!r}, {hint}"
    if label < NO_LABEL or class_names and label >= len(class_names):
        return (
            NO_LABEL,
            f"label {label_key!r} is {label}, not a class "
            f"index{f' below {len(class_names)}' if class_names else ''} (-1: no label)",
        )
    return label, None


def _iter_tar(
    source: ShardSource, label_key: str | None, class_names: tuple[str, ...], storage_options: dict
) -> Iterator[Sample]:
    import webdataset as wds  # here, not at the top: it imports torch, which option checks must not wait for

    opened = (
        wds.gopen(source.url, "rb") if source.url.startswith(PIPE) else fsspec.open(source.url, "rb", **storage_options)
    )
    with opened as stream:  # a pipe's command failing (non-zero exit) raises here, failing this shard
        files = wds.tariterators.tar_file_expander([{"url": source.url, "stream": stream}])
        for sample in wds.tariterators.group_by_keys(files):
            image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
            image = sample[image_ext] if image_ext else None
            label, problem = _parse_label(sample, label_key, class_names)
            yield Sample(key=sample["__key__"], image=image, label=label, problem=problem)


def _iter_folder_block(source: ShardSource, labelled: bool, storage_options: dict) -> Iterator[Sample]:
    """The block's images with their class indices (``NO_LABEL`` unless ``labelled``)."""
    fs, root = fsspec.core.url_to_fs(source.url, **storage_options)
    for rel, label in zip(source.files, source.labels, strict=True):
        image = fs.cat_file(f"{root.rstrip('/')}/{rel}")
        yield Sample(key=rel.rsplit(".", 1)[0], image=image, label=label if labelled else NO_LABEL)


def iter_samples(
    source: ShardSource,
    *,
    label_key: str | None = "cls",
    class_names: tuple[str, ...] = (),
    storage_options: dict | None = None,
) -> Iterator[Sample]:
    """Yield the raw samples of one shard in stored order. Raises on an unreadable or truncated shard.

    ``label_key``: the tar field holding the label (``cls``), or ``field:path`` into a JSON field
    (``json:label``, ``json:meta.class``); labels may be class names when ``class_names`` lists them. None: no
    labels (``NO_LABEL``), for image folders too.
    """
    storage_options = storage_options or {}
    if source.is_folder_block:
        yield from _iter_folder_block(source, label_key is not None, storage_options)
    else:
        yield from _iter_tar(source, label_key, class_names, storage_options)


def count_images(shards: Sequence[ShardSource], limit: int, storage_options: dict | None = None) -> int:
    """The images of ``shards``, counted up to ``limit``: a folder block's files without reading them, a tar's
    samples with an image by reading it in stored order until the count reaches ``limit``. A tar that cannot be
    read counts what was read before the fault (its extraction then reports it)."""
    count = 0
    for shard in shards:
        if count >= limit:
            break
        if shard.is_folder_block:
            count += len(shard.files)
            continue
        try:
            for sample in iter_samples(shard, label_key=None, storage_options=storage_options):
                count += sample.image is not None
                if count >= limit:
                    break
        except (OSError, EOFError, ValueError, tarfile.TarError):
            continue
    return min(count, limit)


_SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.uint32) * 510 + 65535) // 131070).astype(
    np.uint8
)  # round(v / 65535 * 255)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Map 16/32-bit integer and float images to 8 bits (full range), keeping other modes.

    16-bit images go through a 65,536-entry lookup table (no wider copy), 32-bit ones through float32.
    """
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image)
        if image.mode.startswith("I;16"):
            return Image.fromarray(_SIXTEEN_TO_EIGHT[array] if array.max(initial=0) > 255 else array.astype(np.uint8))
        if image.mode == "F":
            top = 1.0 if array.max(initial=0) <= 1.0 else 255.0
        else:
            top = 65535.0 if array.max(initial=0) > 255 else 255.0
        scaled = np.clip(array.astype(np.float32) * np.float32(255.0 / top) + np.float32(0.5), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled)
    return image


def _admit_in_pil(max_pixels: int) -> None:
    """Raise PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, never lowered) to ``max_pixels``:
    PIL refuses images above twice its limit (~179 M pixels) in ``Image.open``, before ``--max-pixels`` is
    checked, so a larger ``--max-pixels`` would have no effect."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def decode_image(data: bytes, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes into an 8-bit image with ``channels`` (1: ``L``, 3: ``RGB``).

    Grayscale, palette (with transparency), RGBA, CMYK and 16-bit inputs are converted; alpha is dropped.
    Raises :class:`ImageTooLarge` (from the header, before decoding) above ``max_pixels`` and
    ``OSError``/``ValueError`` (from PIL) for undecodable or truncated data.
    """
    _admit_in_pil(max_pixels)
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # far above PIL's limit, so above max_pixels too
        raise ImageTooLarge(f"image too large: above --max-pixels {max_pixels:,} ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image too large: {width}x{height} = {width * height:,} pixels, above --max-pixels {max_pixels:,}"
        )
    image.load()
    image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    return image.convert("L" if channels == 1 else "RGB")
