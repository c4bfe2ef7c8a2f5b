"""Integrity of a stored feature cache (``apmpipe verify --integrity``): read every stored chunk of every array of
some shard groups, each whole, so that zarr verifies every CRC-32C checksum the format writes (version 3), and
list the chunks that are missing or cannot be read. No teacher, no model: only the cache's bytes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import fsspec
import zarr

from .cache import FeatureCache, describe_error
from .errors import CacheError
from .format import SHARDS_GROUP, writes_every_chunk
from .redact import redact_url


@dataclass(frozen=True)
class DamagedChunk:
    """One stored chunk of a shard group's array (a zarr shard file, or a plain chunk) that is missing or unreadable."""

    shard: str
    array: str  # e.g. tokens/12; empty when the group's metadata itself cannot be read
    chunk: str  # the chunk key inside the array, e.g. c/0/0/0
    problem: str


@dataclass
class IntegrityReport:
    """What reading every stored chunk of the shard groups ``shards`` found."""

    shards: list[str]
    chunks: int = 0  # stored chunks read
    checksummed: int = 0  # of them, those whose bytes carry CRC-32C checksums (format version 3)
    damaged: list[DamagedChunk] = field(default_factory=list)


def check_integrity(url: str, shards: Sequence[str] = (), storage_options: dict | None = None) -> IntegrityReport:
    """Read every stored chunk of every array of the complete shard groups ``shards`` (default: all of them) of the
    cache at ``url``."""
    cache = FeatureCache.open(url, storage_options=storage_options)
    complete = cache.complete_shards()
    unknown = [name for name in shards if name not in complete]
    if unknown or not complete:
        known = ", ".join(complete[:6]) + (", ..." if len(complete) > 6 else "") if complete else "none"
        what = f"no complete shard group {unknown[0]!r}" if unknown else "no complete shard group"
        raise CacheError(f"cache {redact_url(url)!r} has {what} to check; its complete groups: {known}")
    report = IntegrityReport(shards=list(shards) or complete)
    for name in report.shards:
        _check_group(cache, name, report)
    return report


def _check_group(cache: FeatureCache, name: str, report: IntegrityReport) -> None:
    """Add what reading every stored chunk of shard group ``name`` finds to ``report``."""
    fs, path = fsspec.core.url_to_fs(cache.url, **cache.storage_options)
    root = fs._strip_protocol(path).rstrip("/") + "/"
    group_path = f"{SHARDS_GROUP}/{name}"
    try:
        stored = {fs._strip_protocol(file)[len(root) :] for file in fs.find(root + group_path)}
        arrays = [node for _, node in cache.shard(name).members(max_depth=None) if isinstance(node, zarr.Array)]
    except Exception as exc:  # a group or array zarr.json that does not parse
        report.damaged.append(DamagedChunk(name, "", "zarr.json", describe_error(exc)))
        return
    for array in sorted(arrays, key=lambda a: a.path):
        array_name, checked = array.path[len(group_path) + 1 :], writes_every_chunk(array)
        for key, region in _chunk_regions(array):
            report.chunks += 1
            report.checksummed += checked
            if checked and f"{array.path}/{key}" not in stored:  # zarr would read fill values
                report.damaged.append(DamagedChunk(name, array_name, key, "missing"))
                continue
            try:
                array[region]
            except Exception as exc:  # undecodable, checksum mismatch, truncated: any failed read is damage here
                report.damaged.append(DamagedChunk(name, array_name, key, describe_error(exc)))


def _chunk_regions(array: zarr.Array) -> Iterator[tuple[str, tuple[slice, ...]]]:
    """(key, region) of every stored chunk of ``array``: its zarr shards when sharded, else its chunks."""
    outer = array.shards or array.chunks
    grid = [math.ceil(size / step) for size, step in zip(array.shape, outer, strict=True)]
    for coords in itertools.product(*map(range, grid)):
        region = tuple(
            slice(i * step, min((i + 1) * step, size)) for i, step, size in zip(coords, outer, array.shape, strict=True)
        )
        yield array.metadata.encode_chunk_key(coords), region
