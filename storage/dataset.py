"""Cached samples for other training loops: a streaming and a map-style torch dataset over feature caches.

:class:`CacheStream` feeds apmpipe's own loop whole windows of batches; the datasets here give any PyTorch loop
one sample at a time, a dict that ``DataLoader``'s default collate stacks into batches::

    pixels  uint8 [C, H, W]   the exact teacher input (pixels=True)
    tokens  list per level of [T, D] (token_dtype), in the order of ``dataset.levels``
    label   int (-1 when absent)
    key     str, the sample's key in its input shard
    logits  float32 [K], the teacher's logits (logits=True and the caches hold them)

:class:`CacheIterableDataset` streams in :class:`~apmpipe.storage.stream.StreamPlan` order (chunk-aligned reads,
shuffled per epoch with the seed), split by DDP rank and DataLoader worker; its ``state_dict`` lets torchdata's
``StatefulDataLoader`` resume mid-epoch exactly. :class:`CacheMapDataset` reads any sample by index (small caches,
samplers of one's own), keeping recently decoded chunks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .cache import CachedSamples, FeatureCache
from .errors import CacheError, ConfigError
from .format import LevelLayout
from .stream import Block, StreamPlan, open_caches, open_views, read_block, read_threads, resolve_token_dtype


@dataclass
class _SampleReader:
    """What both datasets share: the caches (opened lazily in each process), what to read and the sample dict."""

    urls: list[str]
    layers: tuple[int, ...] | None
    token_dtype: np.dtype
    pixels: bool
    logits: bool
    storage_options: dict[str, Any]
    _open: list[FeatureCache] | None = field(default=None, repr=False)

    @classmethod
    def open(
        cls,
        urls: Sequence[str] | str,
        levels: Sequence[int] | None,
        token_dtype: str | None,
        pixels: bool,
        logits: bool,
        storage_options: dict | None,
    ) -> _SampleReader:
        """Open and check the caches (see :func:`open_caches`) and the options, once, in the constructing process."""
        urls = [urls] if isinstance(urls, str) else list(urls)
        layers = None if levels is None else tuple(levels)
        caches = open_caches(urls, storage_options, layers)
        spec = caches[0].spec
        reader = cls(
            [c.url for c in caches],
            layers,
            resolve_token_dtype(spec, token_dtype),
            pixels,
            logits and spec.num_classes > 0,
            storage_options or {},
        )
        reader._open = caches
        return reader

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": None}  # each DataLoader worker opens its own zarr handles

    def caches(self) -> list[FeatureCache]:
        if self._open is None:
            self._open = open_views(self.urls, self.storage_options, self.layers)
        return self._open

    @property
    def levels(self) -> tuple[LevelLayout, ...]:
        return self.caches()[0].spec.levels

    def read_options(self) -> dict[str, Any]:
        return {
            "pixels": self.pixels,
            "token_dtype": self.token_dtype,
            "extras": False,
            "keys": True,
            "logits": self.logits,
        }

    def sample(self, data: CachedSamples, row: int, copy: bool = False) -> dict[str, Any]:
        """Sample ``row`` of ``data`` as the dict the module docstring describes; its tensors share ``data``'s
        memory unless ``copy`` (for ``data`` that is read again, so an in-place change of a sample stays there)."""

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array[row].copy() if copy else array[row])

        out: dict[str, Any] = {
            "tokens": [tensor(tokens) for tokens in data.tokens],
            "label": int(data.labels[row]),
            "key": data.keys[row],
        }
        if self.pixels:
            out["pixels"] = tensor(data.pixels)
        if self.logits:
            out["logits"] = tensor(data.logits)
        return out


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank`` and ``world_size``, each taken from ``torch.distributed`` (when initialised) where None."""
    live = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = (torch.distributed.get_rank() if live else 0) if rank is None else rank
    world_size = (torch.distributed.get_world_size() if live else 1) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
    return rank, world_size


class CacheIterableDataset(IterableDataset):
    """Every cached sample once per epoch, shuffled in chunk-aligned windows, split by DDP rank and DataLoader
    worker; resumable mid-epoch through torchdata's ``StatefulDataLoader``.

    The epoch's order is CacheStream's plan with one-sample units: blocks of whole zarr chunks shuffled with
    ``(seed, epoch)`` and dealt to ranks, every rank cut to the same number of samples (so DDP ranks take equal
    steps; with several ranks a few samples sit out each epoch, others the next), windows of ``window_samples`` read
    whole and permuted, windows dealt to DataLoader workers round-robin. Call :meth:`set_epoch` before each epoch.

    ``state_dict()`` (epoch and samples this worker has yielded) is what ``StatefulDataLoader`` snapshots in every
    worker; restoring it skips finished windows without reading them, so a loop restored from
    ``loader.state_dict()`` gets the batches an uninterrupted one would have (same ``num_workers`` and batch size).
    A plain ``DataLoader`` works too, without resume. With ``persistent_workers=True`` workers keep the epoch they
    started with: leave it off, or build a loader per epoch.

    Args:
        urls: feature caches written by ``apmpipe extract`` (one teacher layout), local paths or fsspec URLs.
        levels: teacher layers to read (cached ``layer`` numbers, see ``apmpipe info``); None: every level.
        token_dtype: ``float16`` or ``float32``; default float16 for float16 caches, float32 otherwise.
        pixels: include the uint8 ``pixels``.
        logits: include the teacher's ``logits`` (when the caches hold them).
        window_samples: shuffle window (samples read and permuted together; memory is about one window per worker).
        seed: seeds block order and in-window permutations.
        rank, world_size: DDP split; None: from ``torch.distributed`` when it is initialised, else 0 and 1.
        storage_options: fsspec options for remote caches (e.g. ``{"anon": True}``).
    """

    def __init__(
        self,
        urls: Sequence[str] | str,
        *,
        levels: Sequence[int] | None = None,
        token_dtype: str | None = None,
        pixels: bool = True,
        logits: bool = True,
        window_samples: int = 512,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        storage_options: dict | None = None,
    ) -> None:
        super().__init__()
        if window_samples < 1:
            raise ConfigError(f"window_samples must be at least 1, got {window_samples}")
        self.reader = _SampleReader.open(urls, levels, token_dtype, pixels, logits, storage_options)
        rank, world_size = _rank_and_world(rank, world_size)
        self.plan = StreamPlan.of(self.reader.caches(), 1, window_samples, seed, rank, world_size)
        self.plan_id = self.plan.fingerprint(self.reader.urls)
        self.epoch = 0
        self._yielded = 0  # samples of this epoch this worker has yielded (what state_dict reports)
        self._resume: dict[str, int] | None = None  # a restored state, applied by the next iter()
        if len(self) == 0:
            raise CacheError(
                f"{sum(self.plan.sizes.values())} cached samples in {len(self.plan.blocks)} chunks give no sample to "
                f"each of {world_size} ranks; use fewer ranks or more data"
            )

    @property
    def levels(self) -> tuple[LevelLayout, ...]:
        """The levels each sample's ``tokens`` hold, in that order (layer, prefix tokens, grid, width)."""
        return self.reader.levels

    def set_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch``'s order next (each epoch shuffles differently)."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Samples this rank reads in the current epoch (all workers together)."""
        return self.plan.units_per_rank(self.epoch)

    def state_dict(self) -> dict[str, Any]:
        """Where this worker's stream stands (StatefulDataLoader keeps one per worker)."""
        info = get_worker_info()
        return {
            "epoch": self.epoch,
            "samples": self._yielded,
            "workers": info.num_workers if info else 0,
            "plan": self.plan_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` at the next ``iter()``; refuses a state saved over other caches or
        options."""
        if state.get("plan") != self.plan_id:
            raise CacheError(
                "the loader state was saved over other caches, shards, seed, window or world size; resume with the "
                "same ones, or start without load_state_dict"
            )
        self.epoch = state["epoch"]
        self._resume = {"samples": state["samples"], "workers": state["workers"]}
        self._yielded = state["samples"]  # what state_dict reports until the restored stream moves on

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        skip = 0
        if self._resume is not None:
            saved = self._resume["workers"]
            if saved != (info.num_workers if info else 0):
                raise ConfigError(
                    f"the loader state was saved with num_workers={saved}; resume with that many DataLoader workers"
                )
            skip, self._resume = self._resume["samples"], None
        self._yielded = skip  # set now, not at the first next(): StatefulDataLoader snapshots before that
        return self._samples(self.epoch, worker, workers, skip)

    def _samples(self, epoch: int, worker: int, workers: int, skip: int) -> Iterator[dict[str, Any]]:
        """This worker's samples of ``epoch`` after the first ``skip``: windows ``worker``, ``worker + workers``, ..."""
        windows = self.plan.windows(epoch)
        with ThreadPoolExecutor(max_workers=read_threads(self.reader.urls)) as pool:
            for index in range(worker, len(windows), workers):
                blocks = windows[index]
                count = sum(block.size for block in blocks)
                if skip >= count:  # finished before a resume: not read
                    skip -= count
                    continue
                parts = list(pool.map(self._read_block, blocks))
                ends = np.cumsum([block.size for block in blocks])
                for position in self.plan.order(epoch, index, count)[skip:]:
                    part = int(np.searchsorted(ends, position, side="right"))
                    row = int(position - (ends[part - 1] if part else 0))
                    self._yielded += 1
                    yield self.reader.sample(parts[part], row)
                skip = 0

    def _read_block(self, block: Block) -> CachedSamples:
        cache = self.reader.caches()[block.cache]
        return read_block(cache, block, self.plan, **self.reader.read_options())


class CacheMapDataset(Dataset):
    """Random access to every sample of the complete shards of one or more caches: ``len(ds)``, ``ds[i]``.

    Index ``i`` runs over the caches in the order given, each one's complete shards sorted by name, samples in
    stored order. ``ds[i]`` decodes the zarr chunk that holds ``i`` and keeps the ``cached_chunks`` most recently
    used ones, so a sequential pass decodes every chunk once, and so does a shuffled pass when the cache has at
    most ``cached_chunks`` chunks (``chunk_samples`` samples each; see ``apmpipe info``). For larger caches shuffle
    with :class:`CacheIterableDataset`, which reads whole chunks in a shuffled order. Each DataLoader worker keeps
    its own chunks.

    Args:
        urls, levels, token_dtype, pixels, logits, storage_options: as for :class:`CacheIterableDataset`.
        cached_chunks: decoded chunks kept per process (memory: about ``cached_chunks * chunk_samples`` samples).
    """

    def __init__(
        self,
        urls: Sequence[str] | str,
        *,
        levels: Sequence[int] | None = None,
        token_dtype: str | None = None,
        pixels: bool = True,
        logits: bool = True,
        cached_chunks: int = 64,
        storage_options: dict | None = None,
    ) -> None:
        super().__init__()
        if cached_chunks < 1:
            raise ConfigError(f"cached_chunks must be at least 1, got {cached_chunks}")
        self.reader = _SampleReader.open(urls, levels, token_dtype, pixels, logits, storage_options)
        self.shards = [
            (number, name, count)
            for number, cache in enumerate(self.reader.caches())
            for name, count in cache.sample_counts().items()
        ]
        self.ends = np.cumsum([count for _, _, count in self.shards])
        self.cached_chunks = cached_chunks
        self._chunks: OrderedDict[tuple[int, int], CachedSamples] = OrderedDict()

    @property
    def levels(self) -> tuple[LevelLayout, ...]:
        """The levels each sample's ``tokens`` hold, in that order (layer, prefix tokens, grid, width)."""
        return self.reader.levels

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_chunks": OrderedDict()}

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} is out of range for {len(self)} cached samples")
        index %= len(self)
        shard = int(np.searchsorted(self.ends, index, side="right"))
        row = index - (int(self.ends[shard - 1]) if shard else 0)
        chunk_samples = self.reader.caches()[self.shards[shard][0]].spec.chunk_samples
        data = self._chunk(shard, row // chunk_samples, chunk_samples)
        return self.reader.sample(data, row % chunk_samples, copy=True)  # the chunk stays in the LRU for later reads

    def _chunk(self, shard: int, chunk: int, chunk_samples: int) -> CachedSamples:
        """Chunk ``chunk`` of shard number ``shard``, decoded once while it stays among the recently used."""
        key = (shard, chunk)
        if key in self._chunks:
            self._chunks.move_to_end(key)
        else:
            number, name, count = self.shards[shard]
            start = chunk * chunk_samples
            cache = self.reader.caches()[number]
            self._chunks[key] = cache.read(name, start, min(start + chunk_samples, count), **self.reader.read_options())
            if len(self._chunks) > self.cached_chunks:
                self._chunks.popitem(last=False)
        return self._chunks[key]
