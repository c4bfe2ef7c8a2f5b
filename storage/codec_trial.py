"""One cache array rewritten under another ``--codec``, as extract writes it and the loader reads it: what
``apmpipe bench codecs`` times. Only this module and :mod:`.format` touch zarr for it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr

from .cache import FeatureCache
from .errors import CacheError, ConfigError
from .format import CacheSpec, create_sample_array, sample_array_layouts
from .redact import redact_url


def trial_arrays(cache: FeatureCache) -> list[str]:
    """The per-sample arrays a training step reads whose compressor ``--codec`` sets: pixels (stored raw; PNG,
    WebP and JPEG bytes are not recompressed), labels, logits, tokens and int8 scales."""
    return [
        name
        for name in sample_array_layouts(cache.spec)
        if name != "keys" and not (name == "pixels" and cache.spec.pixel_codec != "raw")
    ]


def trial_samples(cache: FeatureCache, samples: int) -> tuple[str, int]:
    """The first complete shard group holding at least one block, and how many of its first samples to use: at most
    ``samples``, in whole blocks of ``chunk_samples`` (a partial block would be padded by zarr and skew the bytes)."""
    block = cache.spec.chunk_samples
    if samples < block:
        raise ConfigError(f"--samples must be at least the cache's chunk_samples ({block}), got {samples}")
    for name, count in cache.sample_counts().items():
        if count >= block:
            return name, min(samples, count) // block * block
    raise CacheError(
        f"cache {redact_url(cache.url)!r} has no complete shard with {block} samples or more to measure; "
        "finish it with apmpipe extract"
    )


class CodecTrial:
    """``data``, the first samples of array ``name``, written under ``spec`` to a fresh local group in ``folder``
    exactly as extract writes it (chunks, shards, compressors), then read back one block at a time."""

    def __init__(self, folder: Path, spec: CacheSpec, name: str, data: np.ndarray) -> None:
        self.folder, self.spec, self.name, self.data = folder, spec, name, data
        item_shape, dtype = sample_array_layouts(spec)[name]
        self.array = create_sample_array(zarr.open_group(str(folder), mode="w"), spec, name, item_shape, dtype)
        self.array.resize(data.shape)

    @classmethod
    def of(cls, folder: Path, cache: FeatureCache, shard: str, name: str, count: int, codec: str) -> CodecTrial:
        """The trial of ``codec`` on the first ``count`` stored samples of ``shard``'s array ``name``."""
        return cls(folder, replace(cache.spec, codec=codec), name, cache.shard(shard)[name][:count])

    def write(self) -> None:
        self.array[...] = self.data

    def read_blocks(self) -> None:
        """Every block of ``chunk_samples``, one read each, as a loader thread reads them."""
        block = self.spec.chunk_samples
        for start in range(0, len(self.data), block):
            self.array[start : start + block]

    def stored_bytes(self) -> int:
        """Bytes of the array's chunk and shard files (its metadata left out)."""
        files = (self.folder / self.name).rglob("*")
        return sum(f.stat().st_size for f in files if f.is_file() and f.name != "zarr.json")
