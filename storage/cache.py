"""The one public reader of a feature cache, :class:`FeatureCache`: opens and validates a cache, lists its shard
groups and their status, reads samples (decoding tokens and pixels as ``storage/token_codecs.py`` and
``storage/pixel_codecs.py`` say), sums token moments, and holds the cache-wide parts written once (root attributes,
low-rank bases, the teacher head).

A failed read of stored bytes becomes one line naming what is damaged and how to repair it (:func:`reading`).
Creating a cache and writing shard groups is ``storage/writer.py``'s; the format itself ``storage/format.py``'s.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.errors import ZarrUserWarning

from .errors import ApmError, CacheError, plain_message
from .format import (
    BASES_GROUP,
    FORMAT_NAME,
    HEAD_GROUP,
    MOMENTS_GROUP,
    READABLE_VERSIONS,
    ROOT_KEY,
    SHARDS_GROUP,
    STATUS_COMPLETE,
    STATUS_WRITING,
    CacheSpec,
    create_checked_array,
    is_count,
    parse_stored_spec,
    sample_arrays,
    writes_every_chunk,
)
from .kinds import FEATURE_CACHE, wrong_kind
from .lowrank import TokenBasis
from .moments import TokenMoments
from .pixel_codecs import decode_pixels
from .redact import redact_in, redact_url
from .token_codecs import decode_tokens

_TEMPORARY_WARNING = r"Object at \S*\.[0-9a-f]{32}\.partial is not recognized"  # see quiet_zarr_temporaries
_REWRITE = "delete its group (shards/{name}) and rerun apmpipe extract to rewrite it"


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


def zarr_storage_options(url: str, storage_options: dict | None) -> dict | None:
    """``storage_options`` for a remote ``url``; None for a local one (zarr refuses options there, and one
    ``--storage-option`` set serves every URL of a command, e.g. a local cache and a run on S3)."""
    return None if _local_path(url) is not None else (storage_options or None)


def describe_error(exc: Exception) -> str:
    """``exc`` in a few words for a one-line message: its type and the first sentence of its text."""
    first = (plain_message(exc).splitlines() or [""])[0].split(". ")[0]  # zarr's checksum error goes on with both sums
    text = f"{type(exc).__name__}: {first}"
    return text if len(text) <= 120 else text[:117] + "..."


def _check_every_chunk_stored(array: zarr.Array) -> None:
    """Raise when ``array`` was written with every chunk stored (format version 3) and some are not: zarr would read
    them as fill values, and a training run would learn zeros. One listing of the array's files, no chunk read."""
    if writes_every_chunk(array) and array.nchunks_initialized < array.nchunks:
        missing = array.nchunks - array.nchunks_initialized
        raise FileNotFoundError(f"{missing} of its {array.nchunks} chunks are not stored; zarr reads them as zeros")


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

    @staticmethod
    def joined(parts: Sequence[CachedSamples]) -> CachedSamples:
        """The samples of ``parts`` (slices of one cache) one after another."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return CachedSamples(
            pixels=None if first.pixels is None else np.concatenate([p.pixels for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            keys=[key for p in parts for key in p.keys],
            logits=None if first.logits is None else np.concatenate([p.logits for p in parts]),
            tokens=[np.concatenate(level) for level in zip(*(p.tokens for p in parts), strict=True)],
        )


def stored_spec(url: str, storage_options: dict | None = None) -> CacheSpec | None:
    """The spec of the cache at ``url``; None when there is no cache there yet."""
    if not is_zarr_group(url, storage_options):
        return None
    return FeatureCache.open(url, storage_options=storage_options).spec


def quiet_zarr_temporaries() -> None:
    """Keep zarr from warning about another writer's temporary: its LocalStore writes NAME.<32 hex>.partial and
    renames it into place, and a group listing that meets one (dask workers, a concurrent extract) says it is no
    hierarchy component, which it is not meant to be. Called before each listing (a filter set at import time is
    lost when the import ran inside a ``catch_warnings``, as pytest's collection does)."""
    quiet = ("ignore", _TEMPORARY_WARNING, ZarrUserWarning)
    first = warnings.filters[0] if warnings.filters else (None, None, None)
    if (first[0], first[1] and first[1].pattern, first[2]) != quiet:  # first, or filters set since would win; adding
        warnings.filterwarnings(*quiet)  # it again each time would reset every warning's "once" registry


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
            root = zarr.open_group(url, mode=mode, storage_options=zarr_storage_options(url, storage_options))
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

    def update_attrs(self, **values: Any) -> None:
        """Merge values into the apmpipe root attributes (driver only: one writer of the root)."""
        self.attrs = {**self.attrs, **values}
        self.root.update_attributes({ROOT_KEY: self.attrs})

    # -- shards ----------------------------------------------------------------------------------------------
    def _shards(self) -> zarr.Group:
        return self.root[SHARDS_GROUP]

    def shard_attrs(self) -> dict[str, dict[str, Any]]:
        """Attributes of every shard group, in one listing (each group's metadata is one read, remote ones too).
        When a group's metadata cannot be read, the group is found and named (CacheError)."""
        quiet_zarr_temporaries()
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
            name: self.recorded_samples(name, attrs[name])
            for name in sorted(attrs)
            if attrs[name].get("status") == STATUS_COMPLETE
        }

    def recorded_samples(self, name: str, attrs: dict[str, Any]) -> int:
        """The sample count that complete shard group ``name`` records in its ``attrs``; CacheError when malformed."""
        count = attrs.get("num_samples")
        if not is_count(count):
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
            quiet_zarr_temporaries()
            with reading(f"shard {name!r} of cache {redact_url(self.url)!r}", _REWRITE.format(name=name)):
                group = self.shard(name)
                arrays = {path: node for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array)}
            count = self.recorded_samples(name, dict(group.attrs))
            for key in sample_arrays(self.spec):
                held = arrays[key].shape[0] if key in arrays else None
                if held != count:
                    what = "lacks array" if held is None else f"holds {held} samples in array"
                    raise CacheError(
                        f"shard {name!r} of cache {redact_url(self.url)!r} records {count} samples but "
                        f"{what} {key!r}; {_REWRITE.format(name=name)}"
                    )
            for key, array in arrays.items():
                with self.reading_shard(name, key):
                    _check_every_chunk_stored(array)
            self._array_handles[name] = arrays
        return self._array_handles[name]

    def image_rows(self, name: str, count: int) -> np.ndarray:
        """The rows of complete shard group ``name`` (of ``count`` samples) that hold its images as they are: every
        row, or with ``--views`` the rows of view 0. What scores a student reads: a view is a training sample,
        not another image."""
        if self.spec.views == 1:
            return np.arange(count)
        return np.flatnonzero(self._stored(name, "view", 0, count) == 0)

    def check_shard(self, name: str) -> None:
        """Refuse complete shard group ``name`` when an array lacks samples or chunk files (readers that open its
        arrays themselves, as tensorstore does, call this first)."""
        self._arrays(name)

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

    def stored_bytes(self) -> int:
        """Bytes on disk of the whole cache (one listing; ``storage/describe.py`` breaks them down by array)."""
        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        return int(fs.du(path))


def _no_cache_message(url: str, storage_options: dict | None) -> str:
    """Why ``url`` cannot be opened as a cache: what it is when apmpipe knows (input data, a run), else that
    nothing is there."""
    shown = redact_url(url)
    return wrong_kind(url, FEATURE_CACHE, storage_options) or (
        f"no feature cache at {shown!r}; create one with apmpipe extract SOURCES --out {shown} --teacher NAME"
    )
