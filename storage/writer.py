"""Writing a feature cache: creating or reopening it for an ``extract`` run (beside that run's writer lock),
recording its inputs, and writing one input shard as one group, whole zarr shards at a time, marked complete only
after every array holds every sample. The arrays are created as ``storage/format.py`` says."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
import zarr
from fsspec.implementations.local import LocalFileSystem

from .cache import FeatureCache, is_zarr_group, zarr_storage_options
from .errors import CacheError
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MOMENTS_GROUP,
    ROOT_KEY,
    SHARDS_GROUP,
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_WRITING,
    CacheSpec,
    create_checked_array,
    create_sample_array,
    differences,
    quiet_bytes_dtype,
    sample_array_layouts,
    short_repr,
    view_order,
)
from .locks import lock_name
from .moments import TokenMoments
from .redact import redact_url
from .token_codecs import EncodedTokens, decode_tokens

# zarr's LocalStore writes each file under ``NAME.<32 hex>.partial`` and renames it into place: a killed writer
# leaves one behind, and a group listing that meets it warns that it is not part of the hierarchy
ZARR_TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.partial$")


def remove_stale_zarr_temporaries(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete the temporaries a killed writer left in the local cache at ``path`` (call under its writer lock: no
    live writer has one open); object stores write whole objects and have none."""
    if not isinstance(fs, LocalFileSystem):
        return
    for folder, _, names in os.walk(path):
        for name in names:
            if ZARR_TEMPORARY.search(name):
                os.remove(os.path.join(folder, name))


def create_or_open(url: str, spec: CacheSpec, *, storage_options: dict | None = None) -> FeatureCache:
    """Open ``url`` for appending shards made with ``spec``, creating the cache if it does not exist; an existing
    cache first loses the temporaries a killed run left (:func:`remove_stale_zarr_temporaries`).

    Refuses (CacheError) a cache written with another teacher, layers, dtype or layout.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    remove_stale_zarr_temporaries(fs, path)
    if is_zarr_group(url, storage_options):
        cache = FeatureCache.open(url, mode="r+", storage_options=storage_options)
        old, new = (
            json.loads(json.dumps(s.to_dict())) for s in (cache.spec, spec)
        )  # compare as stored (tuples -> lists)
        diff = differences(old, new)
        if diff:
            key, was, now = diff[0]
            raise CacheError(
                f"cache {redact_url(url)!r} was written with {key} {short_repr(was)}, not {short_repr(now)}; use "
                "another --out or the same options"
            )
        return cache
    if fs.exists(path) and [p for p in fs.ls(path, detail=False) if not p.endswith(lock_name("extract"))]:
        raise CacheError(f"--out {redact_url(url)!r} exists and is not an apmpipe cache; choose a new path")
    attrs = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "spec": spec.to_dict(), "sources": [], "classes": []}
    # "a" creates in place beside the lock file: "w" would delete the directory that writer_lock holds, "w-" wants
    # it empty
    root = zarr.open_group(
        url, mode="a", storage_options=zarr_storage_options(url, storage_options), attributes={ROOT_KEY: attrs}
    )
    root.create_group(SHARDS_GROUP)
    return FeatureCache(url=url, root=root, spec=spec, attrs=attrs, storage_options=storage_options or {})


def record_sources(cache: FeatureCache, sources: Sequence[str], classes: Sequence[str]) -> None:
    """Add input URLs to the root attributes of ``cache`` and check image-folder classes against earlier runs."""
    known = list(cache.attrs.get("sources", []))
    old_classes = list(cache.attrs.get("classes", []))
    if classes and old_classes and list(classes) != old_classes:
        raise CacheError(
            f"cache {redact_url(cache.url)!r} holds image-folder classes {old_classes[:4]}...; these inputs have "
            f"{list(classes)[:4]}...: use another --out"
        )
    redacted = [redact_url(s) for s in sources]
    cache.update_attrs(sources=known + [s for s in redacted if s not in known], classes=list(classes) or old_classes)


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
            with quiet_bytes_dtype():
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
