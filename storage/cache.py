"""The feature cache: apmpipe's public, versioned Zarr v3 format (see ``storage/FORMAT.md``).

This module alone knows array names, chunking, codecs, attributes and the format version. It creates a cache,
checks that a run may append to it, writes one input shard as one group (whole zarr shards at a time, marked
complete only after every array is written), opens and validates caches for reading and describes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.dtype import VariableLengthBytes
from zarr.errors import UnstableSpecificationWarning

from .errors import ApmError, CacheError, ConfigError, plain_message
from .locks import lock_name
from .lowrank import TokenBasis
from .pixel_codecs import IMAGE_CHANNELS, IMAGE_CODECS, decode_images, encode_images
from .redact import redact_in, redact_url

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

TOKEN_DTYPES = ("float32", "float16", "int8")
CODECS = ("blosc-lz4", "zstd", "none")
DEFAULT_CODEC = CODECS[0]  # see _compressors: smaller and faster to decode than zstd on float16 tokens
PIXEL_CODECS = ("raw", *IMAGE_CODECS)
INT8_MAX = 127.0


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
        if self.dtype not in TOKEN_DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
        if self.codec not in CODECS:
            raise ConfigError(f"--codec {self.codec!r} is not one of {', '.join(CODECS)}")
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
        if self.pixel_codec not in PIXEL_CODECS:
            raise ConfigError(f"--pixel-codec {self.pixel_codec!r} is not one of {', '.join(PIXEL_CODECS)}")
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
        diff = _differences(layout, self.layout())
        if diff:
            key, was, now = diff[0]
            raise CacheError(
                f"{what} differs in {key}: {_short(was)} vs {_short(now)}; use a cache and student of one "
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


def _is_int(value: Any, minimum: int = 0) -> bool:
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
    if not (isinstance(size, list) and len(size) == 3 and all(_is_int(v, 1) for v in size)):
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
            and _is_int(level["layer"], 1)
        )
        ok = ok and _is_int(level["prefix_tokens"]) and _is_int(level["dim"], 1)
        if not (
            ok
            and isinstance(level["grid"], list)
            and len(level["grid"]) == 2
            and all(_is_int(v, 1) for v in level["grid"])
        ):
            return f"spec.levels[{index}] is {_short(level)}, not {{layer, prefix_tokens, grid: [h, w], dim}}"
    for key in ("num_classes", "chunk_samples", "shard_samples"):
        if not _is_int(data.get(key), 0 if key == "num_classes" else 1):
            return f"spec.{key} is {data.get(key)!r}, not a count"
    if data.get("dtype") not in TOKEN_DTYPES or data.get("codec") not in CODECS:
        return f"spec.dtype/codec are {data.get('dtype')!r}/{data.get('codec')!r}, not one of {TOKEN_DTYPES}/{CODECS}"
    if (
        not _is_int(data.get("rank", 0)) or data.get("pixel_codec", "raw") not in PIXEL_CODECS
    ):  # optional: absent in older v2 caches
        return (
            f"spec.rank/pixel_codec are {data.get('rank')!r}/{data.get('pixel_codec')!r}, not a count/one of "
            f"{PIXEL_CODECS}"
        )
    if not _is_int(data.get("views", 1), 1) or not isinstance(data.get("view_augment", []), list):
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


@dataclass(frozen=True)
class EncodedTokens:
    """Tokens (or, with a basis, their coefficients) in the storage dtype; ``scale`` (float32 ``[B, T]``) only for
    int8."""

    values: np.ndarray
    scale: np.ndarray | None = None


def encode_tokens(tokens: np.ndarray, dtype: str, basis: TokenBasis | None = None) -> EncodedTokens:
    """Encode float32 tokens ``[B, T, D]`` in the storage dtype, as ``[B, T, K]`` coefficients of ``basis`` when
    given; int8 is symmetric per token with a scale.

    Raises CacheError when a value is not finite after encoding (e.g. float16 overflow).
    """
    if basis is not None:
        tokens = basis.project(tokens)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected and reported below
        encoded = _encode(tokens, dtype)
    if not _finite(tokens, encoded):
        hint = (
            "use --dtype float32"
            if dtype != "float32"
            else "the teacher itself produced inf/nan; check its weights and inputs"
        )
        raise CacheError(
            f"teacher tokens are not finite in {dtype} (max |x| = {np.nanmax(np.abs(tokens)):.3g}); {hint}"
        )
    return encoded


def _encode(tokens: np.ndarray, dtype: str) -> EncodedTokens:
    if dtype == "int8":
        absmax = np.abs(tokens).max(axis=-1)
        scale = (np.where(absmax > 0, absmax, 1.0) / INT8_MAX).astype(np.float32)
        values = np.clip(np.rint(tokens / scale[..., None]), -INT8_MAX, INT8_MAX).astype(np.int8)
        return EncodedTokens(values, scale)
    return EncodedTokens(tokens.astype(dtype))


def _finite(tokens: np.ndarray, encoded: EncodedTokens) -> bool:
    if encoded.scale is not None:
        return bool(np.isfinite(encoded.scale).all() and np.isfinite(tokens).all())
    return bool(np.isfinite(encoded.values).all())


def decode_tokens(
    values: np.ndarray, scale: np.ndarray | None = None, dtype: Any = np.float32, basis: TokenBasis | None = None
) -> np.ndarray:
    """Stored tokens back to floats ``[B, T, D]`` (float32 by default; float16 halves loader memory), reconstructed
    from their coefficients when stored with ``basis``."""
    if scale is not None:
        values = values.astype(np.float32) * scale[..., None].astype(np.float32)
    if basis is not None:
        return basis.reconstruct(values, dtype)
    return values.astype(dtype, copy=False)


def encode_pixels(pixels: np.ndarray, codec: str) -> np.ndarray:
    """uint8 pixels ``[B, C, H, W]`` in the stored form of ``--pixel-codec``: as they are for ``raw``, else one
    encoded image (``bytes``) per sample, an object array ``[B]``."""
    return pixels if codec == "raw" else encode_images(pixels, codec)


def decode_pixels(stored: np.ndarray, codec: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Stored pixels (see :func:`encode_pixels`) back to uint8 ``[B, C, H, W]``."""
    return stored if codec == "raw" else decode_images(stored, shape)


@contextlib.contextmanager
def _quiet_bytes_dtype() -> Iterator[None]:
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


def decode_without_thread_pools() -> None:
    """Make this process's zarr reads decode on one thread (zarr's codec pool sized to 1; zarr runs Blosc without
    threads already): for a DataLoader worker, one of a pool of processes that fills the cores. Call before the
    process's first read: zarr makes its pool then."""
    zarr.config.set({"threading.max_workers": 1})


def is_local_url(url: str) -> bool:
    return _local_path(url) is not None


def _local_path(url: str) -> str | None:
    fs, path = fsspec.core.url_to_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else None


def _zarr_storage_options(url: str, storage_options: dict | None) -> dict | None:
    """``storage_options`` for a remote ``url``; None for a local one (zarr refuses options there, and one
    ``--storage-option`` set serves every URL of a command, e.g. a local cache and a run on S3)."""
    return None if _local_path(url) is not None else (storage_options or None)


def describe_error(exc: Exception) -> str:
    """``exc`` in a few words for a one-line message: its type and the first sentence of its text."""
    first = (plain_message(exc).splitlines() or [""])[0].split(". ")[0]  # zarr's checksum error goes on with both sums
    text = f"{type(exc).__name__}: {first}"
    return text if len(text) <= 120 else text[:117] + "..."


@contextlib.contextmanager
def reading(what: str, repair: str, urls: Sequence[str] = ()) -> Iterator[None]:
    """Turn a failed read of stored bytes (undecodable, checksum mismatch, truncated chunk, malformed metadata) into
    one line: ``what`` cannot be read, why (``urls`` redacted in it), and ``repair``. Domain errors pass as they
    are."""
    try:
        yield
    except (ApmError, MemoryError):
        raise
    except Exception as exc:
        why = redact_in(describe_error(exc), urls)
        raise CacheError(f"{what} cannot be read ({why}): it is damaged; {repair}") from exc


_ITEM_DIMENSIONS = {
    "pixels": ("channel", "y", "x"),
    "labels": (),
    "keys": (),
    "logits": ("class",),
    "view": (),
    "augment": ("view_parameter",),
}
_REWRITE = "delete its group (shards/{name}) and rerun apmpipe extract to rewrite it"


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


def _sample_arrays(spec: CacheSpec) -> list[str]:
    """Names of the arrays with one entry per sample that every complete shard group holds."""
    return list(sample_array_layouts(spec))


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(field, old, new) for every differing leaf, descending into dicts and equal-length lists, so a message
    names e.g. ``levels[1].layer`` with 8 and 12 rather than two whole lists."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(old) + [k for k in new if k not in old]
        return [
            d
            for k in keys
            for d in _differences(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{path}.{k}" if path else str(k))
        ]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in _differences(a, b, f"{path}[{i}]")]
    return [(path, old, new)]


@dataclass(frozen=True)
class TokenMoments:
    """First and second moments of one level's tokens per location over ``count`` samples (float64 ``[T, D]``).

    Stored per shard group (``moments/<layer>``, shape ``[2, T, D]``: sums, sums of squares) so that any set of
    complete shards can be summed without reading tokens: the student's target standardisation and the
    constant baseline (the mean token per location) come from here.
    """

    count: int
    sums: np.ndarray
    squares: np.ndarray

    @classmethod
    def of(cls, tokens: np.ndarray) -> TokenMoments:
        """Moments of float tokens ``[B, T, D]``."""
        values = tokens.astype(np.float64)
        return cls(len(values), values.sum(0), np.square(values).sum(0))

    def __add__(self, other: TokenMoments) -> TokenMoments:
        return TokenMoments(self.count + other.count, self.sums + other.sums, self.squares + other.squares)

    @property
    def mean(self) -> np.ndarray:
        """The mean token per location ``[T, D]`` (the constant baseline predictor)."""
        return self.sums / max(self.count, 1)

    @property
    def variance(self) -> np.ndarray:
        """Per-location, per-channel variance ``[T, D]`` (population, clipped at 0)."""
        return np.maximum(self.squares / max(self.count, 1) - np.square(self.mean), 0.0)


@dataclass(frozen=True)
class CachedSamples:
    """A slice of one shard: uint8 pixels ``[B, C, H, W]``, labels, keys, logits and float32 tokens per level."""

    pixels: np.ndarray | None
    labels: np.ndarray
    keys: list[str]
    logits: np.ndarray | None
    tokens: list[np.ndarray]

    def rows(self, index: slice | np.ndarray) -> CachedSamples:
        """The samples at ``index`` (a slice or an integer array) of this slice."""
        return CachedSamples(
            pixels=None if self.pixels is None else self.pixels[index],
            labels=self.labels[index],
            keys=list(np.asarray(self.keys, dtype=object)[index]) if self.keys else [],
            logits=None if self.logits is None else self.logits[index],
            tokens=[t[index] for t in self.tokens],
        )


WHOLE_SHARD_CHUNKS = ("labels", "keys", "view", "augment")  # a few bytes per sample: one chunk per shard group
AUGMENTS = ("flip", "crop")  # train --augment and extract --view-augment (stages/augment.py draws them)
VIEW_PARAMETERS = ("flip", "x0", "y0", "x1", "y1")  # the ``augment`` array's last axis (extract --views)


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
    with _quiet_bytes_dtype():
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


class ShardWriter:
    """Writes one input shard into its own group, whole zarr shards at a time.

    The group is deleted and recreated on open (an incomplete group is rewritten whole), buffered samples are
    flushed every ``spec.shard_samples`` and the group is marked complete by :meth:`finish` only after every
    array holds all samples.
    """

    def __init__(self, cache: FeatureCache, name: str, source: str, fingerprint: str, precision: str) -> None:
        self.spec = cache.spec
        self.name = name
        shards = cache.root[SHARDS_GROUP]
        if name in shards:
            del shards[name]
        attributes = {
            "status": STATUS_WRITING,
            "source": redact_url(source),
            "fingerprint": redact_url(fingerprint),
            "precision": precision,
        }
        self.group = shards.create_group(name, attributes=attributes)
        self.arrays = self._create_arrays()
        self.buffers: dict[str, list[np.ndarray]] = {key: [] for key in self.arrays}
        self.buffered = 0
        self.written = 0
        self.moments: list[TokenMoments | None] = [None] * len(self.spec.levels)
        self.bases = cache.level_bases()

    def _create_arrays(self) -> dict[str, zarr.Array]:
        return {
            name: create_sample_array(self.group, self.spec, name, shape, dtype)
            for name, (shape, dtype) in sample_array_layouts(self.spec).items()
        }

    def append(
        self,
        pixels: np.ndarray,
        labels: np.ndarray,
        keys: Sequence[str],
        tokens: Sequence[EncodedTokens],
        logits: np.ndarray | None,
        views: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Buffer one batch and flush whole zarr shards. Already encoded: ``pixels`` (see :func:`encode_pixels`) and
        ``tokens`` (one per level, with this cache's bases, see :meth:`FeatureCache.level_bases`). With
        ``spec.views`` V > 1 the batch holds V samples per image, image by image (view 0, 1, ...), and ``views``
        their view numbers and ``augment`` parameters; the writer stores them in the order :func:`view_order` says."""
        batch = {"pixels": pixels, "labels": labels, "keys": np.asarray(keys, dtype=object)}
        if views is not None:
            batch["view"], batch["augment"] = views[0].astype(np.int64), views[1].astype(np.float32)
        if "logits" in self.arrays:
            assert logits is not None, "teacher has a head: logits required"
            batch["logits"] = logits.astype(np.float32)
        for i, (level, encoded, basis) in enumerate(zip(self.spec.levels, tokens, self.bases, strict=True)):
            moments = TokenMoments.of(
                decode_tokens(encoded.values, encoded.scale, basis=basis)
            )  # of the values readers will get
            self.moments[i] = moments if self.moments[i] is None else self.moments[i] + moments
            batch[f"tokens/{level.array_name}"] = encoded.values
            if encoded.scale is not None:
                batch[f"scales/{level.array_name}"] = encoded.scale
        for key, value in batch.items():
            self.buffers[key].append(value)
        self.buffered += len(labels)
        if self.buffered >= self.spec.shard_samples:
            self._flush(whole_shards_only=True)

    def _flush(self, whole_shards_only: bool) -> None:
        views = self.spec.views
        # whole zarr shards; with views whole image blocks (chunk_samples images x views), so a block keeps its order
        step = self.spec.shard_samples if views == 1 else self.spec.chunk_samples * views
        count = (self.buffered // step) * step if whole_shards_only else self.buffered
        if count == 0:
            return
        start, stop = self.written, self.written + count
        joined = {key: np.concatenate(parts) if len(parts) > 1 else parts[0] for key, parts in self.buffers.items()}
        order = slice(0, count) if views == 1 else view_order(count // views, views, self.spec.chunk_samples)
        for key, data in joined.items():
            array = self.arrays[key]
            with _quiet_bytes_dtype():
                array.resize((stop, *array.shape[1:]))
            array[start:stop] = data[order]
        # only once every array holds the samples: a failed write leaves the bookkeeping (and the group) unfinished
        self.buffers = {key: [data[count:]] if len(data) > count else [] for key, data in joined.items()}
        self.buffered -= count
        self.written = stop

    def finish(self, skipped: Sequence[tuple[str, str]], stats: dict[str, Any] | None = None) -> int:
        """Write what is buffered, then mark the group complete. Returns the number of samples."""
        self._flush(whole_shards_only=False)
        self._write_moments()
        self.group.update_attributes(
            {
                "num_samples": self.written,
                "skipped": [{"key": k, "reason": r} for k, r in skipped],
                "stats": stats or {},
                "status": STATUS_COMPLETE,
            }
        )
        return self.written

    def _write_moments(self) -> None:
        for level, moments in zip(self.spec.levels, self.moments, strict=True):
            if moments is None:  # an empty shard: zero sums keep the sum over shards exact
                moments = TokenMoments(0, *np.zeros((2, level.num_tokens, level.dim)))
            create_checked_array(
                self.group,
                f"{MOMENTS_GROUP}/{level.array_name}",
                data=np.stack([moments.sums, moments.squares]),
                dimension_names=("moment", f"token_{level.layer}", f"feature_{level.layer}"),
            )

    def fail(self, reason: str, skipped: Sequence[tuple[str, str]] = ()) -> None:
        """Record why this shard could not be written; a later run rewrites it."""
        self.group.update_attributes(
            {"status": STATUS_FAILED, "error": reason, "skipped": [{"key": k, "reason": r} for k, r in skipped]}
        )


def stored_codec(url: str, storage_options: dict | None = None) -> str | None:
    """The ``--codec`` of the cache at ``url``; None when there is no cache there yet."""
    if not is_zarr_group(url, storage_options):
        return None
    return FeatureCache.open(url, storage_options=storage_options).spec.codec


def is_zarr_group(url: str, storage_options: dict | None = None) -> bool:
    """Whether ``url`` (local path or fsspec URL) holds a Zarr v3 group (a feature cache or another one), without
    opening it: callers that accept a cache or image files tell them apart with this."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.exists(f"{path.rstrip('/')}/zarr.json")


@dataclass
class FeatureCache:
    """An open feature cache: root group, spec and the apmpipe root attributes."""

    url: str
    root: zarr.Group
    spec: CacheSpec
    attrs: dict[str, Any] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    _array_handles: dict[str, dict[str, zarr.Array]] = field(default_factory=dict, repr=False)
    _bases: list[TokenBasis | None] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, url: str, *, mode: str = "r", storage_options: dict | None = None) -> FeatureCache:
        """Open an existing cache, checking that it is an apmpipe cache of a supported version."""
        try:
            root = zarr.open_group(url, mode=mode, storage_options=_zarr_storage_options(url, storage_options))
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            raise CacheError(_no_cache_message(url, storage_options)) from None
        attrs = dict(root.attrs).get(ROOT_KEY)
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
            raise CacheError(
                f"{redact_url(url)!r} is a zarr group but not an apmpipe feature cache (no '{ROOT_KEY}' root attribute)"
            )
        if attrs.get("version") not in READABLE_VERSIONS:
            raise CacheError(
                f"cache {redact_url(url)!r} has format version {attrs.get('version')}; this apmpipe reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))}: re-extract it or use a matching apmpipe"
            )
        return cls(
            url=url,
            root=root,
            spec=parse_stored_spec(url, attrs.get("spec")),
            attrs=attrs,
            storage_options=storage_options or {},
        )

    @classmethod
    def create_or_open(cls, url: str, spec: CacheSpec, *, storage_options: dict | None = None) -> FeatureCache:
        """Open ``url`` for appending shards made with ``spec``, creating the cache if it does not exist.

        Refuses (CacheError) a cache written with another teacher, layers, dtype or layout.
        """
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if is_zarr_group(url, storage_options):
            cache = cls.open(url, mode="r+", storage_options=storage_options)
            old, new = (
                json.loads(json.dumps(s.to_dict())) for s in (cache.spec, spec)
            )  # compare as stored (tuples -> lists)
            diff = _differences(old, new)
            if diff:
                key, was, now = diff[0]
                raise CacheError(
                    f"cache {redact_url(url)!r} was written with {key} {_short(was)}, not {_short(now)}; use another "
                    "--out or the same options"
                )
            return cache
        if fs.exists(path) and [p for p in fs.ls(path, detail=False) if not p.endswith(lock_name("extract"))]:
            raise CacheError(f"--out {redact_url(url)!r} exists and is not an apmpipe cache; choose a new path")
        attrs = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "spec": spec.to_dict(), "sources": [], "classes": []}
        # "a" creates in place beside the lock file: "w" would delete the directory that writer_lock holds, "w-" wants
        # it empty
        root = zarr.open_group(
            url, mode="a", storage_options=_zarr_storage_options(url, storage_options), attributes={ROOT_KEY: attrs}
        )
        root.create_group(SHARDS_GROUP)
        return cls(url=url, root=root, spec=spec, attrs=attrs, storage_options=storage_options or {})

    def update_attrs(self, **values: Any) -> None:
        """Merge values into the apmpipe root attributes (driver only: one writer of the root)."""
        self.attrs = {**self.attrs, **values}
        self.root.update_attributes({ROOT_KEY: self.attrs})

    def record_sources(self, sources: Sequence[str], classes: Sequence[str]) -> None:
        """Add input URLs to the root attributes and check image-folder classes against earlier runs."""
        known = list(self.attrs.get("sources", []))
        old_classes = list(self.attrs.get("classes", []))
        if classes and old_classes and list(classes) != old_classes:
            raise CacheError(
                f"cache {redact_url(self.url)!r} holds image-folder classes {old_classes[:4]}...; these inputs have "
                f"{list(classes)[:4]}...: use another --out"
            )
        redacted = [redact_url(s) for s in sources]
        self.update_attrs(sources=known + [s for s in redacted if s not in known], classes=list(classes) or old_classes)

    # -- shards ----------------------------------------------------------------------------------------------
    def _shards(self) -> zarr.Group:
        return self.root[SHARDS_GROUP]

    def shard_attrs(self) -> dict[str, dict[str, Any]]:
        """Attributes of every shard group, in one listing (each group's metadata is one read, remote ones too).
        When a group's metadata cannot be read, the group is found and named (CacheError)."""
        try:
            return {name: dict(group.attrs) for name, group in self._shards().groups()}
        except Exception:
            self._name_unreadable_group()
            raise

    def _name_unreadable_group(self) -> None:
        """Open each shard group by itself (found by listing the folder, not its metadata) and raise the CacheError
        of the first whose metadata cannot be read."""
        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        for folder in sorted(fs.ls(f"{path.rstrip('/')}/{SHARDS_GROUP}", detail=False)):
            name = folder.rstrip("/").rsplit("/", 1)[-1]
            if fs.isdir(folder):
                with reading(f"shard {name!r} of cache {redact_url(self.url)!r}", _REWRITE.format(name=name)):
                    self.shard(name)

    def shard_status(self) -> dict[str, str]:
        """Status (``complete``, ``writing``, ``failed``) of every shard group."""
        return {name: attrs.get("status", STATUS_WRITING) for name, attrs in self.shard_attrs().items()}

    def sample_counts(self) -> dict[str, int]:
        """Samples in each complete shard group, sorted by name."""
        attrs = self.shard_attrs()
        return {
            name: self._num_samples(name, attrs[name])
            for name in sorted(attrs)
            if attrs[name].get("status") == STATUS_COMPLETE
        }

    def _num_samples(self, name: str, attrs: dict[str, Any]) -> int:
        count = attrs.get("num_samples")
        if not _is_int(count):
            raise CacheError(
                f"shard {name!r} of cache {redact_url(self.url)!r} is marked complete but records "
                f"num_samples={count!r}; {_REWRITE.format(name=name)}"
            )
        return count

    def complete_shards(self) -> list[str]:
        return list(self.sample_counts())

    def precision(self) -> str | None:
        """How the complete shards' tokens were computed (``float32``, ``bfloat16-autocast``); None when there are
        none. Raises CacheError when shards disagree: their numerics must not be mixed silently."""
        found: dict[str, str] = {}
        for name, attrs in self.shard_attrs().items():
            if attrs.get("status") == STATUS_COMPLETE:
                found.setdefault(str(attrs.get("precision")), name)
        if len(found) > 1:
            kinds = ", ".join(f"{kind} (e.g. shard {name!r})" for kind, name in sorted(found.items()))
            raise CacheError(
                f"cache {redact_url(self.url)!r} mixes shards computed in {kinds}; re-extract the odd "
                "ones into another --out with matching --device/--amp"
            )
        return next(iter(found), None)

    def shard(self, name: str) -> zarr.Group:
        return self._shards()[name]

    # -- level subsets ---------------------------------------------------------------------------------------
    def select_levels(self, layers: Sequence[int] | None) -> FeatureCache:
        """A read-only view holding only the levels of teacher ``layers`` (kept in cache order; None: all levels).

        Reads, moments, bases and the spec's layout of the view cover only those levels, so nothing else is
        decoded; the teacher head stays available only while the final cached level is kept.
        """
        if layers is None:
            return self
        cached = [level.layer for level in self.spec.levels]
        unknown = [layer for layer in layers if layer not in cached]
        if unknown or len(set(layers)) != len(layers) or not layers:
            wrong = f"layer(s) {', '.join(map(str, unknown))} not cached" if unknown else "repeated or no layers"
            raise CacheError(
                f"levels {','.join(map(str, layers))}: {wrong} in {redact_url(self.url)!r}; choose among the "
                f"cached layers {','.join(map(str, cached))}"
            )
        kept = tuple(level for level in self.spec.levels if level.layer in layers)
        view = replace(self, spec=replace(self.spec, levels=kept), _array_handles={})
        if self._bases is not None:
            view._bases = [basis for basis, level in zip(self._bases, self.spec.levels, strict=True) if level in kept]
        return view

    def keeps_final_level(self) -> bool:
        """Whether this cache (or level view) holds the teacher's final cached level, the one its head reads."""
        return self.spec.levels[-1].layer == self.attrs["spec"]["levels"][-1]["layer"]

    def copy_shard(self, name: str, new_name: str) -> None:
        """Copy shard group ``name`` whole (arrays, attributes, status) under ``new_name`` (benchmarks grow a cache
        this way); byte for byte, through the cache's own store."""
        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        shards = f"{path.rstrip('/')}/{SHARDS_GROUP}"
        fs.copy(f"{shards}/{name}", f"{shards}/{new_name}", recursive=True)
        self._array_handles.pop(new_name, None)

    def _arrays(self, name: str) -> dict[str, zarr.Array]:
        """The arrays of a complete shard group, opened once per cache object (metadata reads are not free) and
        checked against the group's ``num_samples``."""
        if name not in self._array_handles:
            with reading(f"shard {name!r} of cache {redact_url(self.url)!r}", _REWRITE.format(name=name)):
                group = self.shard(name)
                arrays = {path: node for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}
            count = self._num_samples(name, dict(group.attrs))
            for key in _sample_arrays(self.spec):
                held = arrays[key].shape[0] if key in arrays else None
                if held != count:
                    what = "lacks array" if held is None else f"holds {held} samples in array"
                    raise CacheError(
                        f"shard {name!r} of cache {redact_url(self.url)!r} records {count} samples but "
                        f"{what} {key!r}; {_REWRITE.format(name=name)}"
                    )
            self._array_handles[name] = arrays
        return self._array_handles[name]

    def read(
        self,
        name: str,
        start: int,
        stop: int,
        *,
        tokens: bool = True,
        pixels: bool = True,
        extras: bool = True,
        logits: bool = False,
        keys: bool = False,
        token_dtype: Any = np.float32,
        reconstruct: bool = True,
    ) -> CachedSamples:
        """Samples ``start:stop`` of a complete shard, tokens decoded to ``token_dtype``; ``extras``: keys and logits
        (``logits`` or ``keys`` alone: only that one). ``reconstruct=False`` leaves low-rank tokens as their
        ``[B, T, K]`` coefficients (see :meth:`level_bases`), for readers that rebuild them elsewhere (on the GPU)."""
        arrays = self._arrays(name)
        wanted = self.read_arrays(tokens=tokens, pixels=pixels, logits=extras or logits, keys=extras or keys)
        stored = {key: self._stored(name, key, start, stop) for key in wanted if key in arrays}
        with self.reading_shard(name, "pixels"):  # an image codec's files may be undecodable too
            return self.samples_from(stored, token_dtype, reconstruct)

    def read_arrays(self, *, tokens: bool, pixels: bool, logits: bool, keys: bool) -> list[str]:
        """The shard arrays a read of these parts fetches (``logits`` only where the cache stores them)."""
        names = ["labels"] + ["pixels"] * pixels + ["keys"] * keys + ["logits"] * (logits and self.spec.num_classes > 0)
        for level in self.spec.levels if tokens else ():
            names.append(f"tokens/{level.array_name}")
            if self.spec.dtype == "int8":
                names.append(f"scales/{level.array_name}")
        return names

    def samples_from(self, stored: dict[str, np.ndarray], token_dtype: Any, reconstruct: bool) -> CachedSamples:
        """Decode the arrays of :meth:`read_arrays` as fetched from storage (tokens only when their arrays are given;
        see :meth:`read`)."""
        levels = []
        for level, basis in zip(self.spec.levels, self.level_bases(), strict=True):
            if f"tokens/{level.array_name}" in stored:
                values, scale = stored[f"tokens/{level.array_name}"], stored.get(f"scales/{level.array_name}")
                levels.append(decode_tokens(values, scale, token_dtype, basis if reconstruct else None))
        return CachedSamples(
            pixels=decode_pixels(stored["pixels"], self.spec.pixel_codec, self.spec.pixel_shape)
            if "pixels" in stored
            else None,
            labels=stored["labels"],
            keys=[str(k) for k in stored["keys"]] if "keys" in stored else [],
            logits=stored.get("logits"),
            tokens=levels,
        )

    def reading_shard(self, name: str, array: str) -> contextlib.AbstractContextManager[None]:
        """See :func:`reading`: array ``array`` of shard group ``name``, rewritten by deleting the group."""
        return reading(
            f"array {array!r} of shard {name!r} in cache {redact_url(self.url)!r}",
            _REWRITE.format(name=name),
            [self.url],
        )

    def _stored(self, name: str, array: str, start: int, stop: int) -> np.ndarray:
        """Samples ``start:stop`` of array ``array`` of complete shard group ``name`` as stored (every read of shard
        data comes here: a damaged chunk becomes one line naming group, array and repair)."""
        with self.reading_shard(name, array):
            return self._arrays(name)[array][start:stop]

    def local_array_path(self, name: str, array: str) -> str | None:
        """The folder of shard ``name``'s array ``array`` on the local file system; None for a remote cache."""
        path = _local_path(self.url)
        return None if path is None else os.path.join(path, SHARDS_GROUP, name, array)

    def open_writer(self, name: str, source: str, fingerprint: str, precision: str) -> ShardWriter:
        """A writer for shard group ``name``; ``precision`` is how its tokens were computed (see :meth:`precision`)."""
        return ShardWriter(self, name, source, fingerprint, precision)

    def token_moments(self) -> list[TokenMoments]:
        """Per-level token moments summed over the complete shards (no token is read)."""
        counts = self.sample_counts()
        totals = []
        for level in self.spec.levels:
            key = f"{MOMENTS_GROUP}/{level.array_name}"
            total = TokenMoments(0, *np.zeros((2, level.num_tokens, level.dim)))
            for name, count in counts.items():
                arrays = self._arrays(name)
                if key not in arrays:
                    raise CacheError(
                        f"shard {name!r} of cache {redact_url(self.url)!r} lacks {key!r}; {_REWRITE.format(name=name)}"
                    )
                sums, squares = self._stored(name, key, 0, 2)  # [2, T, D]: sums, then sums of squares
                total = total + TokenMoments(count, sums, squares)
            totals.append(total)
        return totals

    # -- low-rank bases --------------------------------------------------------------------------------------
    def has_bases(self) -> bool:
        """Whether the bases of a ``rank`` > 0 cache are stored and complete."""
        return BASES_GROUP in self.root and self.root[BASES_GROUP].attrs.get("status") == STATUS_COMPLETE

    def write_bases(self, bases: Sequence[TokenBasis], attrs: dict[str, Any]) -> None:
        """Store, once and before any shard, one basis per level (``bases/<layer>/mean``, ``.../components``)."""
        assert len(bases) == len(self.spec.levels) and all(b.rank == self.spec.rank for b in bases)
        if BASES_GROUP in self.root:
            del self.root[BASES_GROUP]
        group = self.root.create_group(BASES_GROUP, attributes={"status": STATUS_WRITING, **attrs})
        for level, basis in zip(self.spec.levels, bases, strict=True):
            create_checked_array(
                group, f"{level.array_name}/mean", data=basis.mean, dimension_names=(f"feature_{level.layer}",)
            )
            create_checked_array(
                group,
                f"{level.array_name}/components",
                data=basis.components,
                dimension_names=(f"component_{level.layer}", f"feature_{level.layer}"),
            )
        group.update_attributes({"status": STATUS_COMPLETE})
        self._bases = list(bases)

    def level_bases(self) -> list[TokenBasis | None]:
        """The basis of every level (read once per cache object), or None per level when tokens are stored whole."""
        if self._bases is None:
            if not self.spec.rank:
                self._bases = [None] * len(self.spec.levels)
            elif not self.has_bases():
                raise CacheError(
                    f"cache {redact_url(self.url)!r} stores rank-{self.spec.rank} tokens but lacks "
                    f"complete bases ({BASES_GROUP}/); re-extract it into a new --out"
                )
            else:
                with reading(
                    f"the bases ({BASES_GROUP}/) of cache {redact_url(self.url)!r}", "re-extract it into a new --out"
                ):
                    group = self.root[BASES_GROUP]
                    self._bases = [
                        TokenBasis(group[f"{lv.array_name}/mean"][...], group[f"{lv.array_name}/components"][...])
                        for lv in self.spec.levels
                    ]
        return self._bases

    # -- teacher head ----------------------------------------------------------------------------------------
    def write_head(self, tensors: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
        """Store, once, what classifies from the final level without the teacher (float32 arrays + attrs)."""
        if HEAD_GROUP in self.root:
            del self.root[HEAD_GROUP]
        group = self.root.create_group(HEAD_GROUP, attributes={"status": STATUS_WRITING, **attrs})
        for name, value in tensors.items():
            value = np.ascontiguousarray(value, dtype=np.float32)
            create_checked_array(
                group, name, data=value, dimension_names=tuple(f"{name}_{axis}" for axis in range(value.ndim))
            )
        group.update_attributes({"status": STATUS_COMPLETE})

    def head(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The stored teacher head (tensors, attributes), or None when absent, incomplete or outside a level view."""
        if HEAD_GROUP not in self.root or not self.keeps_final_level():
            return None
        group = self.root[HEAD_GROUP]
        attrs = dict(group.attrs)
        if attrs.pop("status", None) != STATUS_COMPLETE:
            return None
        with reading(
            f"the teacher head ({HEAD_GROUP}/) of cache {redact_url(self.url)!r}",
            f"delete {HEAD_GROUP}/ and rerun apmpipe extract to rewrite it",
        ):
            return {name: array[...] for name, array in group.arrays()}, attrs

    # -- description -----------------------------------------------------------------------------------------
    def stored_bytes(self) -> int:
        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return int(fs.du(path))

    def stored_array_bytes(self) -> dict[str, int]:
        """Bytes on disk of each per-sample array summed over all shard groups, and ``other`` (metadata, moments,
        bases, teacher head), from one listing of every file of the cache."""
        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        root = fs._strip_protocol(path).rstrip("/") + "/"
        names = _sample_arrays(self.spec)
        out = dict.fromkeys([*names, "other"], 0)
        for file, info in fs.find(path, detail=True).items():
            parts = fs._strip_protocol(file)[len(root) :].split("/")  # shards/<group>/<array...>/c/...
            inside = "/".join(parts[2:]) if parts[0] == SHARDS_GROUP else ""
            out[next((n for n in names if inside.startswith(n + "/")), "other")] += int(info.get("size") or 0)
        return out

    def recorded_fidelity(self, records: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """Fidelity recorded by extraction over the complete shards of ``records`` (shard attributes; default: read
        now): per level as :func:`level_fidelity` combines it; ``pixels``: the worst ``psnr_db`` (JPEG)."""
        records = self.shard_attrs() if records is None else records
        complete = {n: a for n, a in records.items() if a.get("status") == STATUS_COMPLETE}
        shards = [(self._num_samples(n, a), (a.get("stats") or {}).get("fidelity") or {}) for n, a in complete.items()]
        psnr = [
            a["stats"]["pixel_fidelity"]["psnr_db"]
            for a in complete.values()
            if "psnr_db" in ((a.get("stats") or {}).get("pixel_fidelity") or {})
        ]
        return {"levels": level_fidelity(shards), "pixels": {"psnr_db": min(psnr)} if psnr else {}}

    def describe(self, sizes: bool = False) -> dict[str, Any]:
        """Counts, precision and problems of this cache from one listing of shard attributes, for ``apmpipe info``.

        Raw bytes come from the spec (no array is opened); ``sizes`` also measures the stored bytes, which lists
        every file of the cache (thousands of requests on an object store).
        """
        records = self.shard_attrs()
        status = {name: attrs.get("status", STATUS_WRITING) for name, attrs in records.items()}
        complete = sorted(n for n, s in status.items() if s == STATUS_COMPLETE)
        samples = sum(self._num_samples(name, records[name]) for name in complete)
        skipped = [{"shard": name, **s} for name in sorted(records) for s in records[name].get("skipped", [])]
        failed = [
            {"shard": name, "error": records[name].get("error", "")}
            for name in sorted(records)
            if status[name] == STATUS_FAILED
        ]
        raw = samples * self.spec.raw_bytes_per_sample
        out = {
            "url": redact_url(self.url),
            "format": f"{FORMAT_NAME} v{self.attrs['version']}",
            "spec": self.spec.to_dict(),
            "head": self.attrs.get("head", {}),
            "shards": {
                "complete": len(complete),
                "writing": sum(s == STATUS_WRITING for s in status.values()),
                "failed": len(failed),
            },
            "samples": samples,
            "precision": sorted({str(records[name].get("precision")) for name in complete}),
            "raw_bytes": raw,
            "arrays": {name: {"raw_bytes_per_sample": size} for name, size in self.spec.raw_array_bytes().items()},
            "fidelity": self.recorded_fidelity(records),
            "skipped_samples": skipped,
            "failed_shards": failed,
            "sources": [redact_url(s) for s in self.attrs.get("sources", [])],
            "classes": self.attrs.get("classes", []),
        }
        if sizes:
            per_array = self.stored_array_bytes()
            stored = sum(per_array.values())
            out.update(
                stored_bytes=stored,
                compression_ratio=raw / stored if stored else 0.0,
                bytes_per_sample=stored / samples if samples else 0.0,
            )
            amplification = self.read_amplification()
            for name, size in per_array.items():
                stored_per_sample = size / samples if samples else 0.0
                entry = out["arrays"].setdefault(name, {})
                entry["stored_bytes_per_sample"] = stored_per_sample
                if name in amplification:
                    entry["read_bytes_per_sample"] = stored_per_sample * amplification[name]
        return out

    def read_amplification(self) -> dict[str, float]:
        """Per per-sample array, stored bytes fetched per stored byte of the samples a block wants, averaged over
        the complete shard groups by samples: a block of ``chunk_samples`` fetches whole chunks, so an array chunked
        by whole shard groups (labels, keys; logits and scales of caches written before they were sharded) costs
        ``shard_samples / chunk_samples`` times its share. Reads array metadata only; missing arrays are left out."""
        counts = self.sample_counts()
        total = sum(counts.values())
        out: dict[str, float] = {}
        for name, count in counts.items():
            group = self.shard(name)
            for array in _sample_arrays(self.spec):
                if array in group:
                    factor = max(1.0, group[array].chunks[0] / self.spec.chunk_samples)
                    out[array] = out.get(array, 0.0) + factor * count / total
        return out


def level_fidelity(shards: Iterable[tuple[int, dict[str, dict[str, float]]]]) -> dict[str, dict[str, float]]:
    """Per level, the fidelity of several shards from each one's ``(samples, stats.fidelity)``: the worst
    ``cosine_min`` and the sample-weighted ``relative_mse`` (what ``info`` and the extract summary both show)."""
    levels: dict[str, dict[str, float]] = {}
    for count, fidelity in shards:
        for layer, found in fidelity.items():
            agg = levels.setdefault(layer, {"cosine_min": 1.0, "relative_mse": 0.0, "samples": 0})
            agg["cosine_min"] = min(agg["cosine_min"], found["cosine_min"])
            agg["relative_mse"] += found["relative_mse"] * count
            agg["samples"] += count
    return {
        layer: {**agg, "relative_mse": agg["relative_mse"] / max(agg["samples"], 1)} for layer, agg in levels.items()
    }


def _no_cache_message(url: str, storage_options: dict | None) -> str:
    """Why ``url`` cannot be opened as a cache: what it is when apmpipe knows (input data, a run), else that
    nothing is there."""
    from .kinds import FEATURE_CACHE, wrong_kind

    shown = redact_url(url)
    return wrong_kind(url, FEATURE_CACHE, storage_options) or (
        f"no feature cache at {shown!r}; create one with apmpipe extract SOURCES --out {shown} --teacher NAME"
    )


def _short(value: Any) -> str:
    """A value for a one-line message in plain words, at most 60 characters: lists of records by their first field
    (``[layer 4, layer 8]``), records as ``key value`` pairs, strings quoted, a missing field as ``none``."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and v for v in value):
        text = "[" + ", ".join(f"{next(iter(v))} {_short(next(iter(v.values())))}" for v in value) + "]"
    elif isinstance(value, dict):
        text = ", ".join(f"{key} {_short(item)}" for key, item in value.items()) or "none"
    elif value is _ABSENT or value is None:
        text = "none"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
