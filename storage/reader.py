"""The hot read path of training: blocks of a cache's per-sample arrays, several in flight, fetched by the reader
that measures best per core.

zarr-python owns the format and writes it (``storage/format.py``, ``storage/writer.py``); for reading, tensorstore
(Google's C++ Zarr v3 reader) opens the same arrays unchanged, decodes without the GIL and keeps many block reads in
flight from one Python thread, with no thread pool of ours (``apmpipe bench pipeline`` measures both side by side).
It serves local caches whose arrays it can open; everything else (remote caches through fsspec storage options,
caches tensorstore cannot open, tensorstore not installed) is read with zarr-python through
:meth:`FeatureCache.read`, which gives the same samples. Both engines hand their arrays to
:meth:`FeatureCache.samples_from`, so decoding (int8 scales, low-rank rebuild, compressed pixels) is one code path.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .cache import CachedSamples, FeatureCache

ENGINES = ("auto", "tensorstore", "zarr")

PendingRead = Callable[[], CachedSamples]  # waits for one block's arrays and decodes them


def tensorstore_available() -> bool:
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        return False
    return True


class BlockReader:
    """Reads blocks ``[start, stop)`` of one cache's shards as :class:`CachedSamples` (as :meth:`FeatureCache.read`
    with ``extras=False``), ``threads`` blocks decoding at once. :meth:`submit` starts a read and returns a callable
    that waits for it, so a caller keeps several blocks in flight.

    Args:
        cache: an open cache (or level view).
        threads: blocks read at once (tensorstore: its file concurrency, decoding on at most one thread per core;
            zarr: a thread pool).
        engine: ``auto`` (tensorstore where it opens the cache, else zarr), ``tensorstore`` (where it cannot open the
            cache, zarr all the same) or ``zarr``. :attr:`engine` says which one reads.
    """

    def __init__(self, cache: FeatureCache, threads: int = 1, engine: str = "auto") -> None:
        assert engine in ENGINES, engine
        self.cache = cache
        self.threads = max(1, threads)
        self._context = None
        self._stores: dict[tuple[str, str], Any] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.engine = "tensorstore" if engine != "zarr" and self._tensorstore_opens() else "zarr"

    def _tensorstore_opens(self) -> bool:
        """Whether tensorstore reads this cache: it is installed, the cache is local and its first complete shard's
        arrays open (a variable-length pixel array, for one, does not)."""
        shards = self.cache.complete_shards()
        if not shards or self.cache.local_array_path(shards[0], "labels") is None or not tensorstore_available():
            return False
        import tensorstore as ts

        decoding = min(self.threads, os.cpu_count() or 1)  # more decoding threads than cores only contend
        # memmap: chunks decode from the page cache without a read() copy (complete shards are never rewritten);
        # ViT-B/16 float16 blocks, loaded 2-core CPU: ~1,600 -> ~2,000 samples per CPU second, median of 5 runs
        self._context = ts.Context(
            {
                "data_copy_concurrency": {"limit": decoding},
                "file_io_concurrency": {"limit": self.threads},
                "file_io_mode": {"mode": "memmap"},
            }
        )
        try:
            for name in self.cache.read_arrays(tokens=True, pixels=True, logits=True, keys=False):
                self._store(shards[0], name)
        except (ValueError, OSError):  # tensorstore reports what it cannot open as ValueError
            self._stores.clear()
            return False
        return True

    def _store(self, shard: str, name: str) -> Any:
        key = (shard, name)
        if key not in self._stores:
            import tensorstore as ts

            if not any(opened == shard for opened, _ in self._stores):  # the shard's first array opened here
                self.cache.check_shard(shard)  # tensorstore, like zarr, would read a missing chunk file as zeros

            path = self.cache.local_array_path(shard, name)
            spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}
            self._stores[key] = ts.open(spec, read=True, open=True, context=self._context).result()
        return self._stores[key]

    def submit(
        self,
        shard: str,
        start: int,
        stop: int,
        *,
        logits: bool = False,
        token_dtype: Any = np.float32,
        reconstruct: bool = True,
    ) -> PendingRead:
        """Start reading samples ``start:stop`` of shard ``shard`` (pixels, labels, tokens; logits when asked);
        the returned callable waits for them."""
        if self.engine == "zarr":
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads)
            future = self._pool.submit(
                self.cache.read,
                shard,
                start,
                stop,
                extras=False,
                logits=logits,
                token_dtype=token_dtype,
                reconstruct=reconstruct,
            )
            return future.result
        names = self.cache.read_arrays(tokens=True, pixels=True, logits=logits, keys=False)
        futures = {}
        for name in names:
            with self.cache.reading_shard(shard, name):  # a damaged zarr.json: one line naming it and the repair
                futures[name] = self._store(shard, name)[start:stop].read()

        def wait() -> CachedSamples:
            stored = {}
            for name, future in futures.items():
                with self.cache.reading_shard(shard, name):  # a damaged chunk: one line naming it and the repair
                    stored[name] = future.result()
            with self.cache.reading_shard(shard, "pixels"):
                return self.cache.samples_from(stored, token_dtype, reconstruct)

        return wait

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
