"""The feature cache format (see ``storage/FORMAT.md``): the one place that knows its name and version, group and
array names, attributes (the :class:`CacheSpec` and its validation), and how every array is chunked, sharded,
compressed and checksummed.

Creating arrays as the format says is here too; writing samples into them is ``storage/writer.py``'s, reading them
``storage/cache.py``'s, and the stored form of tokens and pixels ``storage/token_codecs.py``'s and
``storage/pixel_codecs.py``'s.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.dtype import VariableLengthBytes
from zarr.errors import UnstableSpecificationWarning

from .errors import CacheError, ConfigError, check_choice
from .pixel_codecs import IMAGE_CHANNELS, PIXEL_CODECS
from .redact import redact_url
from .token_codecs import TOKEN_DTYPES

FORMAT_NAME = "apmpipe.feature-cache"
FORMAT_VERSION = 3  # 3: every array's chunks carry a CRC-32C checksum and are all written (see FORMAT.md)
READABLE_VERSIONS = (2, FORMAT_VERSION)
ROOT_KEY = "apmpipe"
SHARDS_GROUP = "shards"
HEAD_GROUP = "teacher_head"
MOMENTS_GROUP = "moments"
BASES_GROUP = "bases"

STATUS_WRITING = "writing"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"

CODECS = ("blosc-lz4", "zstd", "none")
DEFAULT_CODEC = CODECS[0]  # see _compressors: smaller and faster to decode than zstd on float16 tokens

WHOLE_SHARD_CHUNKS = ("labels", "keys", "view", "augment")  # a few bytes per sample: one chunk per shard group
AUGMENTS = ("flip", "crop")  # train --augment and extract --view-augment (stages/augment.py draws them)
VIEW_PARAMETERS = ("flip", "x0", "y0", "x1", "y1")  # the ``augment`` array's last axis (extract --views)


@dataclass(frozen=True)
class LevelLayout:
    """Token layout of one cached teacher level: ``prefix_tokens`` (CLS, registers) then a row-major grid."""

    layer: int  # 1-based block/stage index in the teacher
    prefix_tokens: int
    grid: tuple[int, int]
    dim: int

    @property
    def num_tokens(self) -> int:
        return self.prefix_tokens + self.grid[0] * self.grid[1]

    @property
    def array_name(self) -> str:
        return str(self.layer)


@dataclass(frozen=True)
class CacheSpec:
    """Everything two runs must agree on to write into the same cache (stored in the root attributes)."""

    teacher: dict[str, Any]
    data_config: dict[str, Any]
    levels: tuple[LevelLayout, ...]
    final_norm: bool
    num_classes: int
    dtype: str = "float16"
    codec: str = DEFAULT_CODEC
    chunk_samples: int = 16
    shard_samples: int = 256
    rank: int = 0  # > 0: tokens stored as this many coefficients of one basis per level (bases/<layer>)
    pixel_codec: str = "raw"
    views: int = 1  # > 1: each image stored as this many samples (view 0 the image, then augmented views)
    view_augment: tuple[str, ...] = ()  # the augmentations of views 1.. (stages/augment.py names)
    view_crop_scale: tuple[float, float] = (0.08, 1.0)  # area share of a view's crop

    def __post_init__(self) -> None:
        check_choice("--dtype", self.dtype, TOKEN_DTYPES)
        check_choice("--codec", self.codec, CODECS)
        if self.chunk_samples < 1 or self.shard_samples < 1 or self.shard_samples % self.chunk_samples:
            raise ConfigError(
                f"--shard-samples ({self.shard_samples}) must be a positive multiple of --chunk-samples "
                f"({self.chunk_samples})"
            )
        if not self.levels:
            raise ConfigError("no teacher levels to cache; pass --layers")
        narrowest = min(level.dim for level in self.levels)
        if not 0 <= self.rank <= narrowest:
            raise ConfigError(
                f"--rank {self.rank} must be between 0 (full tokens) and the narrowest cached level's "
                f"width ({narrowest})"
            )
        check_choice("--pixel-codec", self.pixel_codec, PIXEL_CODECS)
        if self.pixel_codec != "raw" and self.pixel_shape[0] not in IMAGE_CHANNELS:
            raise ConfigError(
                f"--pixel-codec {self.pixel_codec} stores 1- or 3-channel images, the teacher takes "
                f"{self.pixel_shape[0]} channels; use --pixel-codec raw"
            )

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        c, h, w = self.data_config["input_size"]
        return int(c), int(h), int(w)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["levels"] = [asdict(level) for level in self.levels]
        return out

    def layout(self) -> dict[str, Any]:
        """What a student and every cache it trains or evaluates on must share: teacher, input, token layout
        (JSON-normalised, as stored in checkpoints)."""
        layout = {
            "teacher": self.teacher,
            "data_config": self.data_config,
            "levels": [asdict(lv) for lv in self.levels],
            "final_norm": self.final_norm,
        }
        return json.loads(json.dumps(layout))

    def check_layout(self, layout: dict[str, Any], what: str) -> None:
        """Refuse (CacheError) a student or cache whose ``layout`` differs, naming the first differing field."""
        diff = differences(layout, self.layout())
        if diff:
            key, was, now = diff[0]
            raise CacheError(
                f"{what} differs in {key}: {short_repr(was)} vs {short_repr(now)}; use a cache and student of one "
                "teacher and layers"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheSpec:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["levels"] = tuple(LevelLayout(**{**lv, "grid": tuple(lv["grid"])}) for lv in data["levels"])
        for key in ("view_augment", "view_crop_scale"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def token_width(self, level: LevelLayout) -> int:
        """Stored values per token of ``level``: ``rank`` coefficients, or all ``dim`` channels."""
        return self.rank or level.dim

    def raw_array_bytes(self) -> dict[str, int]:
        """Uncompressed bytes per sample of each fixed-size array (pixels as decoded uint8; keys vary: left out)."""
        out = {"pixels": int(np.prod(self.pixel_shape)), "labels": 8}
        if self.num_classes:
            out["logits"] = 4 * self.num_classes
        for level in self.levels:
            out[f"tokens/{level.array_name}"] = (
                level.num_tokens * self.token_width(level) * np.dtype(self.dtype).itemsize
            )
            if self.dtype == "int8":
                out[f"scales/{level.array_name}"] = 4 * level.num_tokens
        if self.views > 1:
            out.update(view=8, augment=4 * len(VIEW_PARAMETERS))
        return out

    @property
    def raw_bytes_per_sample(self) -> int:
        """Uncompressed bytes of one sample's fixed-size arrays (pixels, label, logits, tokens, scales)."""
        return sum(self.raw_array_bytes().values())


def is_count(value: Any, minimum: int = 0) -> bool:
    """Whether ``value`` is an int (not a bool) of at least ``minimum``, as a count in stored attributes must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _stored_spec_problem(data: Any) -> str | None:
    """What is wrong with a spec read from a cache's attributes (its types and ranges), or None."""
    if not isinstance(data, dict):
        return "spec is not an object"
    for key, kind in (("teacher", dict), ("data_config", dict), ("levels", list), ("final_norm", bool)):
        if not isinstance(data.get(key), kind):
            return f"spec.{key} is missing or not a {kind.__name__}"
    if not isinstance(data["teacher"].get("weights_sha256"), str):
        return "spec.teacher.weights_sha256 is missing"
    size = data["data_config"].get("input_size")
    if not (isinstance(size, list) and len(size) == 3 and all(is_count(v, 1) for v in size)):
        return f"spec.data_config.input_size is {size!r}, not [C, H, W]"
    for key in ("mean", "std"):
        values = data["data_config"].get(key)
        if not (
            isinstance(values, list) and len(values) == size[0] and all(isinstance(v, (int, float)) for v in values)
        ):
            return f"spec.data_config.{key} is {values!r}, not {size[0]} numbers"
    for index, level in enumerate(data["levels"]):
        ok = (
            isinstance(level, dict)
            and set(level) == {"layer", "prefix_tokens", "grid", "dim"}
            and is_count(level["layer"], 1)
        )
        ok = ok and is_count(level["prefix_tokens"]) and is_count(level["dim"], 1)
        if not (
            ok
            and isinstance(level["grid"], list)
            and len(level["grid"]) == 2
            and all(is_count(v, 1) for v in level["grid"])
        ):
            return f"spec.levels[{index}] is {short_repr(level)}, not {{layer, prefix_tokens, grid: [h, w], dim}}"
    for key in ("num_classes", "chunk_samples", "shard_samples"):
        if not is_count(data.get(key), 0 if key == "num_classes" else 1):
            return f"spec.{key} is {data.get(key)!r}, not a count"
    if data.get("dtype") not in TOKEN_DTYPES or data.get("codec") not in CODECS:
        return f"spec.dtype/codec are {data.get('dtype')!r}/{data.get('codec')!r}, not one of {TOKEN_DTYPES}/{CODECS}"
    if (
        not is_count(data.get("rank", 0)) or data.get("pixel_codec", "raw") not in PIXEL_CODECS
    ):  # optional: absent in older v2 caches
        return (
            f"spec.rank/pixel_codec are {data.get('rank')!r}/{data.get('pixel_codec')!r}, not a count/one of "
            f"{PIXEL_CODECS}"
        )
    if not is_count(data.get("views", 1), 1) or not isinstance(data.get("view_augment", []), list):
        return f"spec.views/view_augment are {data.get('views')!r}/{data.get('view_augment')!r}, not a count/a list"
    return None


def parse_stored_spec(url: str, data: Any) -> CacheSpec:
    """The spec of the cache at ``url`` from its attributes; one-line CacheError when they are malformed."""
    problem = _stored_spec_problem(data)
    if problem is None:
        try:
            return CacheSpec.from_dict(data)
        except ConfigError as exc:
            problem = str(exc)
    raise CacheError(
        f"cache {redact_url(url)!r} has malformed attributes: {problem}; it was damaged or not written by "
        "apmpipe: re-extract it"
    )


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(field, old, new) for every differing leaf, descending into dicts and equal-length lists, so a message
    names e.g. ``levels[1].layer`` with 8 and 12 rather than two whole lists."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [
            d
            for k in keys
            for d in differences(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{path}.{k}" if path else str(k))
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in differences(a, b, f"{path}[{i}]")]
    return [(path, old, new)]


def short_repr(value: Any) -> str:
    """A value for a one-line message in plain words, at most 60 characters: lists of records by their first field
    (``[layer 4, layer 8]``), records as ``key value`` pairs, strings quoted, a missing field as ``none``."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and v for v in value):
        text = "[" + ", ".join(f"{next(iter(v))} {short_repr(next(iter(v.values())))}" for v in value) + "]"
    elif isinstance(value, dict):
        text = ", ".join(f"{key} {short_repr(item)}" for key, item in value.items()) or "none"
    elif value is _ABSENT or value is None:
        text = "none"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_ITEM_DIMENSIONS = {
    "pixels": ("channel", "y", "x"),
    "labels": (),
    "keys": (),
    "logits": ("class",),
    "view": (),
    "augment": ("view_parameter",),
}


def _dimension_names(name: str, ndim: int, low_rank: bool = False) -> tuple[str, ...]:
    """Names of a shard array's axes (zarr ``dimension_names``, which xarray needs): ``sample`` first; token
    axes carry their level (levels may differ in token count and width); low-rank tokens end in
    ``component_<layer>``."""
    kind, _, layer = name.partition("/")
    width = f"component_{layer}" if low_rank else f"feature_{layer}"
    item = (f"token_{layer}", width)[: ndim - 1] if kind in ("tokens", "scales") else _ITEM_DIMENSIONS.get(name)
    if item is None or len(item) != ndim - 1:
        item = tuple(f"{name.replace('/', '_')}_{axis}" for axis in range(1, ndim))
    return ("sample", *item)


def sample_array_layouts(spec: CacheSpec) -> dict[str, tuple[tuple[int, ...], Any]]:
    """The arrays with one entry per sample that every complete shard group holds: name -> (item shape, dtype)."""
    pixels = (spec.pixel_shape, "uint8") if spec.pixel_codec == "raw" else ((), VariableLengthBytes())
    layouts: dict[str, tuple[tuple[int, ...], Any]] = {"pixels": pixels, "labels": ((), "int64"), "keys": ((), str)}
    if spec.num_classes:
        layouts["logits"] = ((spec.num_classes,), "float32")
    for level in spec.levels:
        layouts[f"tokens/{level.array_name}"] = ((level.num_tokens, spec.token_width(level)), spec.dtype)
        if spec.dtype == "int8":
            layouts[f"scales/{level.array_name}"] = ((level.num_tokens,), "float32")
    if spec.views > 1:
        layouts["view"] = ((), "int64")
        layouts["augment"] = ((len(VIEW_PARAMETERS),), "float32")
    return layouts


def sample_arrays(spec: CacheSpec) -> list[str]:
    """Names of the arrays with one entry per sample that every complete shard group holds."""
    return list(sample_array_layouts(spec))


@contextlib.contextmanager
def quiet_bytes_dtype() -> Iterator[None]:
    """zarr-python warns on every metadata write of its variable_length_bytes dtype (see FORMAT.md, pixels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableSpecificationWarning)
        yield


def _compressors(codec: str, float_tokens: bool) -> list:
    """Compressors of one array under ``--codec``: ``blosc-lz4`` bit-shuffles float16/float32 token arrays with LZ4
    (float16 tokens of a trained teacher: 1.105x at ~2.7 GB/s decode per core vs zstd's 1.082x at ~0.9 GB/s) and
    gives zstd to the rest (pixels, labels, logits, scales, and int8 tokens, where a bit shuffle finds nothing);
    ``zstd`` gives zstd to every array, ``none`` nothing."""
    if codec == "none":
        return []
    if codec == "blosc-lz4" and float_tokens:
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]
    return [ZstdCodec(level=3)]


def fixed_compressors() -> list:
    """Compressors of the arrays ``--codec`` does not govern (keys, moments, bases, teacher head: a few bytes per
    sample or per cache): zstd at level 0, which zstd reads as its default level (3). Named here rather than left to
    zarr-python's defaults, which a zarr release could change."""
    return [ZstdCodec(level=0)]


def create_checked_array(
    group: zarr.Group, name: str, compressors: Sequence[Any] | None = None, **options: Any
) -> zarr.Array:
    """Array ``name`` in ``group`` as this format writes every array: ``compressors`` (default
    :func:`fixed_compressors`) then a CRC-32C checksum of each chunk (of each inner chunk of a zarr shard), which
    every read verifies, and every chunk written, fill values too, so that a missing chunk file is damage (zarr
    would read it as fill values)."""
    return group.create_array(
        name,
        compressors=[*(fixed_compressors() if compressors is None else compressors), Crc32cCodec()],
        config={"write_empty_chunks": True},
        **options,
    )


def writes_every_chunk(array: zarr.Array) -> bool:
    """Whether ``array`` was written as format version 3 writes every array (:func:`create_checked_array`): CRC-32C
    per chunk and every chunk stored, so a chunk file that is not there is damage, not fill values."""
    return any(isinstance(codec, Crc32cCodec) for codec in array.compressors)


def create_sample_array(
    group: zarr.Group, spec: CacheSpec, name: str, item_shape: tuple[int, ...], dtype: Any
) -> zarr.Array:
    """An empty per-sample array ``name`` in ``group``, chunked, sharded and compressed as ``spec`` says. Arrays
    read per training block (pixels, tokens, scales, logits) hold ``chunk_samples`` per read unit inside zarr
    shards of ``shard_samples``, so a block fetches only its own samples; labels and keys are whole-shard chunks."""
    if name in WHOLE_SHARD_CHUNKS:
        chunks, shards = (spec.shard_samples, *item_shape), None
    else:
        chunks, shards = (spec.chunk_samples, *item_shape), (spec.shard_samples, *item_shape)
    compressors = (
        fixed_compressors()
        if dtype is str
        else []
        if isinstance(dtype, VariableLengthBytes)  # images are compressed already
        else _compressors(spec.codec, float_tokens=name.startswith("tokens/") and np.dtype(dtype).itemsize > 1)
    )
    with quiet_bytes_dtype():
        return create_checked_array(
            group,
            name,
            compressors,
            shape=(0, *item_shape),
            chunks=chunks,
            shards=shards,
            dtype=dtype,
            dimension_names=_dimension_names(name, 1 + len(item_shape), low_rank=spec.rank > 0),
        )


def parse_augments(names: Sequence[str], option: str = "--augment") -> tuple[str, ...]:
    """The augmentations in canonical order (``none`` or empty: off); ConfigError for an unknown name."""
    unknown = [name for name in names if name not in (*AUGMENTS, "none")]
    if unknown:
        raise ConfigError(f"{option} {unknown[0]!r} is not one of {', '.join(AUGMENTS)}; e.g. {option} flip,crop")
    return tuple(name for name in AUGMENTS if name in names)


def check_crop_scale(scale: Sequence[float], option: str = "--crop-scale") -> None:
    """ConfigError unless ``scale`` is (min, max) area fractions with 0 < min <= max <= 1."""
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"{option} needs MIN,MAX with 0 < MIN <= MAX <= 1, e.g. {option} 0.08,1; got {scale}")


def view_order(images: int, views: int, chunk: int) -> np.ndarray:
    """Where stored samples come from when ``images`` images of ``views`` views each arrive image by image (index
    ``i * views + v``): blocks of ``chunk`` images (the last may be shorter) one after the other, and inside a
    block its images' view 0, then their view 1, and so on, so one view of a block is one run of whole zarr chunks.
    Stored sample ``s`` is arrival ``order[s]``."""
    out = []
    for first in range(0, images, chunk):
        block = np.arange(first, min(first + chunk, images))
        out += [block * views + view for view in range(views)]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
