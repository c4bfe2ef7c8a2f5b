"""Streaming training batches from one or more feature caches, by DDP rank and DataLoader worker.

Every epoch has a plan (:class:`StreamPlan`) computed from indices alone (no data read): the complete shard groups
of all caches are cut into blocks of whole zarr chunks, the blocks are shuffled with ``(seed, epoch)``, dealt to
ranks (``blocks[rank::world_size]``), and each rank's sample sequence is cut to the same number of whole batches
on every rank (no DDP hang at epoch end). The sequence is then split into *windows* of ``window_samples``
(the shuffle buffer): a window is read whole (chunk-aligned reads), its samples permuted with
``(seed, epoch, rank, window)``, and yielded as one DataLoader item: the window's buffers and the rows of each
of its batches — ``echo`` passes of them, every pass after the first a fresh shuffle of the window (example
echoing). :func:`window_batches` cuts an item into batches. Windows are dealt to DataLoader workers round-robin, so
the DataLoader delivers them in plan order.

Because the plan is a pure function of the seed, a :class:`StreamPosition` (epoch, window, batch; ``batch``
counts echoed batches) is all a checkpoint needs to resume mid-epoch exactly, skipping finished windows without
reading them. Memory is a few windows per worker, independent of cache size; caches are opened lazily inside each
worker. ``storage/dataset.py`` streams single samples in the same plan for other training loops.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .cache import CachedSamples, FeatureCache, decode_without_thread_pools, is_local_url
from .errors import CacheError, check_choice
from .format import STATUS_FAILED, CacheSpec
from .lowrank import TokenBasis
from .moments import TokenMoments
from .reader import ENGINES, BlockReader, PendingRead
from .redact import redact_url
from .remote import canonical_url

READ_THREADS = 4


def read_threads(urls: Sequence[str]) -> int:
    """Threads reading a window's blocks in this process, set up for it. READ_THREADS overlap storage latency and
    decoding, except in a DataLoader worker on local caches: one of a pool of processes sized to the cores, it
    reads its blocks in turn and decodes on its own thread (nested thread pools in every worker oversubscribed the
    cores: 2-core CPU, 2 workers, float16 tokens: loader ~880 -> ~1,100 samples/s)."""
    if get_worker_info() is None or not all(is_local_url(url) for url in urls):
        return READ_THREADS
    decode_without_thread_pools()
    return 1


TOKEN_READ_DTYPES = ("float16", "float32")
_VIEW_SALT = 0x71E5  # keeps the view draws apart from the block shuffle of the same epoch


@dataclass(frozen=True)
class StreamPosition:
    """Where an epoch's stream stands: next window to read and batches of it already consumed."""

    epoch: int = 0
    window: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Block:
    """Samples ``start:stop`` of one shard group of cache number ``cache``. In a plan of a cache with ``views``
    V > 1 (``extract --views``), view 0 of a block of images, whose view ``v`` is the ``v``-th run of as many
    samples after it (see :func:`apmpipe.storage.format.view_order`)."""

    cache: int
    shard: str
    start: int
    stop: int
    views: int = 1

    @property
    def size(self) -> int:
        return self.stop - self.start

    def view(self, view: int) -> Block:
        """The samples of view ``view`` of this block's images."""
        return Block(self.cache, self.shard, self.start + view * self.size, self.stop + view * self.size)


@dataclass(frozen=True)
class StreamPlan:
    """Which samples one rank reads in an epoch, in which windows and order (indices only, nothing is read).

    ``unit`` is what every rank's sequence is cut to whole multiples of, equal on every rank (CacheStream: its
    batch; the sample datasets: one sample); ``window`` samples (a multiple of ``unit``) are read and permuted
    together. ``sizes`` holds the samples of every complete shard group, by (cache number, shard name).
    """

    sizes: dict[tuple[int, str], int]
    blocks: tuple[Block, ...]
    unit: int
    window: int
    seed: int
    rank: int
    world_size: int

    @classmethod
    def of(
        cls, caches: Sequence[FeatureCache], unit: int, window_samples: int, seed: int, rank: int, world_size: int
    ) -> StreamPlan:
        """The plan over the complete shards of ``caches``, cut into blocks of whole zarr chunks (with views, of
        the ``chunk_samples`` images whose views are stored together)."""
        sizes = {(i, name): count for i, cache in enumerate(caches) for name, count in cache.sample_counts().items()}
        blocks = tuple(
            block for (i, name), count in sizes.items() for block in _image_blocks(i, name, count, caches[i].spec)
        )
        window = max(1, -(-window_samples // unit)) * unit
        return cls(sizes, blocks, unit, window, seed, rank, world_size)

    @property
    def images(self) -> int:
        """Distinct images in the plan (an image's views counted once)."""
        return sum(block.size for block in self.blocks)

    @property
    def views(self) -> float:
        """Views per distinct image over the plan's images (1 without ``extract --views``; caches extracted with
        different ``--views`` weigh by their images)."""
        return sum(block.size * block.views for block in self.blocks) / max(1, self.images)

    def fingerprint(self, urls: Sequence[str]) -> str:
        """Identifies the plan: the blocks read and how they are dealt. Equal fingerprints give equal epochs.
        Caches are named by canonical URL (``./c.zarr`` and ``/abs/c.zarr`` are one cache)."""
        text = json.dumps(
            [
                [canonical_url(url) for url in urls],
                [{k: v for k, v in asdict(b).items() if k != "views" or v > 1} for b in self.blocks],  # as before views
                self.unit,
                self.window,
                self.seed,
                self.world_size,
            ]
        )
        return hashlib.sha1(text.encode()).hexdigest()

    def rank_blocks(self, epoch: int) -> list[list[Block]]:
        """Every rank's blocks for ``epoch``, in reading order; of a block with views, the view drawn for this
        epoch (seeded by seed and epoch: one view per image per epoch)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
        draws = np.random.default_rng([self.seed, epoch, _VIEW_SALT]).random(len(self.blocks))
        blocks = [b.view(int(draw * b.views)) if b.views > 1 else b for b, draw in zip(self.blocks, draws, strict=True)]
        return [[blocks[i] for i in order[r :: self.world_size]] for r in range(self.world_size)]

    def units_per_rank(self, epoch: int = 0) -> int:
        """Whole units per rank; equal on every rank (the smallest rank's count)."""
        return min(sum(b.size for b in blocks) // self.unit for blocks in self.rank_blocks(epoch))

    def windows(self, epoch: int) -> list[list[Block]]:
        """This rank's windows for ``epoch``: each a list of block slices covering ``window`` samples (the last
        fewer)."""
        total = self.units_per_rank(epoch) * self.unit
        windows: list[list[Block]] = [[]]
        filled = 0
        for block in self.rank_blocks(epoch)[self.rank]:
            start = block.start
            while start < block.stop and total > 0:
                take = min(block.stop - start, self.window - filled, total)
                windows[-1].append(Block(block.cache, block.shard, start, start + take))
                start, filled, total = start + take, filled + take, total - take
                if filled == self.window:
                    windows.append([])
                    filled = 0
        return [w for w in windows if w]

    def order(self, epoch: int, index: int, count: int) -> np.ndarray:
        """The shuffled order of window ``index``'s ``count`` samples: position ``j`` holds read sample
        ``order[j]``."""
        return np.random.default_rng([self.seed, epoch, self.rank, index]).permutation(count)


def _image_blocks(cache: int, shard: str, count: int, spec: CacheSpec) -> list[Block]:
    """The blocks of one shard group of ``count`` samples: runs of ``chunk_samples``; with ``spec.views`` V > 1, of
    ``chunk_samples`` images (view 0 of each; the last block may be shorter)."""
    chunk, views = spec.chunk_samples, spec.views
    images = count // views
    return [
        Block(cache, shard, first * views, first * views + min(chunk, images - first), views)
        for first in range(0, images, chunk)
    ]


def _whole_chunks(cache: FeatureCache, block: Block, plan: StreamPlan) -> tuple[int, int]:
    """The span of whole zarr chunks that holds ``block``."""
    chunk = cache.spec.chunk_samples
    first = block.start // chunk * chunk
    return first, min(-(-block.stop // chunk) * chunk, plan.sizes[(block.cache, block.shard)])


def read_block(cache: FeatureCache, block: Block, plan: StreamPlan, **options: Any) -> CachedSamples:
    """The samples of ``block``, read as whole zarr chunks then cut (``options`` as for :meth:`FeatureCache.read`)."""
    first, last = _whole_chunks(cache, block, plan)
    return cache.read(block.shard, first, last, **options).rows(slice(block.start - first, block.stop - first))


def submit_block(reader: BlockReader, block: Block, plan: StreamPlan, **options: Any) -> PendingRead:
    """Start reading ``block`` as whole zarr chunks with ``reader`` (``options`` as for :meth:`BlockReader.submit`);
    the returned callable waits and cuts the block's samples."""
    first, last = _whole_chunks(reader.cache, block, plan)
    pending = reader.submit(block.shard, first, last, **options)
    return lambda: pending().rows(slice(block.start - first, block.stop - first))


def resolve_token_dtype(spec: CacheSpec, token_dtype: str | None) -> np.dtype:
    """``token_dtype`` (float16 or float32) or, when None, float16 for float16 caches and float32 otherwise
    (float32 and int8 caches may hold values float16 cannot represent)."""
    if token_dtype is not None:
        check_choice("token dtype", token_dtype, TOKEN_READ_DTYPES)
    return np.dtype(token_dtype or ("float16" if spec.dtype == "float16" else "float32"))


def open_views(
    urls: Sequence[str], storage_options: dict | None = None, levels: Sequence[int] | None = None
) -> list[FeatureCache]:
    """Each cache opened as a view of teacher layers ``levels`` (None: all), without further checks."""
    return [FeatureCache.open(url, storage_options=storage_options).select_levels(levels) for url in urls]


def open_caches(
    urls: Sequence[str], storage_options: dict | None = None, levels: Sequence[int] | None = None
) -> list[FeatureCache]:
    """Open caches for training (as views of teacher layers ``levels``; None: all; a cache given twice under two
    spellings, once), checking they exist, hold complete shards and share one teacher layout, one token dtype (all
    are decoded as one dtype) and one precision (float32 or bfloat16 autocast: not mixed silently)."""
    if not urls:
        raise CacheError("no CACHE given; pass one or more caches written by apmpipe extract")
    caches = open_views(_distinct(urls), storage_options, levels)
    first = caches[0]
    precision = first.precision()  # also refuses a cache that mixes precisions
    for cache in caches:
        url, first_url = redact_url(cache.url), redact_url(first.url)
        counts = cache.sample_counts()
        failed = not counts and any(a.get("status") == STATUS_FAILED for a in cache.shard_attrs().values())
        if failed or (counts and not any(counts.values())):
            raise CacheError(
                f"no samples in {url!r}: its extraction kept none (apmpipe info {url} lists what was skipped and "
                "why); rerun apmpipe extract with the fix, then train"
            )
        if not counts:
            raise CacheError(
                f"cache {url!r} has no complete shard; finish it with apmpipe extract (rerun the same command)"
            )
        first.spec.check_layout(cache.spec.layout(), f"cache {url!r} (beside {first_url!r})")
        if cache.spec.dtype != first.spec.dtype:
            raise CacheError(
                f"cache {url!r} stores {cache.spec.dtype} tokens, {first_url!r} {first.spec.dtype}: "
                "a token dtype must be common to all caches; re-extract one with --dtype "
                f"{first.spec.dtype}"
            )
        if cache is not first and cache.precision() != precision:
            raise CacheError(
                f"cache {url!r} was computed in {cache.precision()}, {first_url!r} in {precision}; "
                "train on caches of one precision (--device/--amp at extraction)"
            )
    return caches


def _distinct(urls: Sequence[str]) -> list[str]:
    """``urls`` less repeats of one cache under another spelling (by :func:`canonical_url`; the first is kept)."""
    first: dict[str, str] = {}
    for url in urls:
        first.setdefault(canonical_url(url), url)
    return list(first.values())


def _summed_moments(caches: Sequence[FeatureCache]) -> list[TokenMoments]:
    """Token moments per level over every complete shard of ``caches`` (fits the student's target scales)."""
    per_cache = [cache.token_moments() for cache in caches]
    return [sum(levels[1:], levels[0]) for levels in zip(*per_cache, strict=True)]


class CacheStream(IterableDataset):
    """Batches of ``pixels`` (uint8 ``[B, C, H, W]``), ``tokens`` (list per level of ``[B, T, D]``) and ``labels``.

    Use with ``DataLoader(stream, batch_size=None)``; each item is one window, ``{"window": k, "first_batch": b,
    "data": buffers, "rows": [...]}``, whose batches :func:`window_batches` gives.

    Args:
        urls: feature caches to train on (one teacher layout).
        batch_size: samples per batch (per rank).
        window_samples: shuffle window (rounded up to whole batches).
        seed: seeds block order and in-window permutations.
        rank, world_size: DDP rank split.
        token_dtype: ``float16`` or ``float32``; default: float16 for float16 caches, float32 otherwise
            (float32 and int8 caches may hold values float16 cannot represent).
        logits: also yield the teacher's cached ``logits`` ``[B, K]`` (when the caches have a head).
        levels: teacher layers to read (None: every cached level); the other levels' arrays are never decoded.
        coefficients: for low-rank caches (``extract --rank``) sharing one basis per level, yield the ``[B, T, K]``
            coefficients of :attr:`coefficient_bases` and leave the rebuild to a :class:`TokenDecoder` on the
            training device (K/D of the loader's output and host-to-device copy; the matrix product runs on the
            GPU). Caches with different bases are rebuilt in the loader (``coefficient_bases`` is None).
        echo: passes over every loaded window (``train --echo``): E× the batches per byte read, each further pass
            a fresh shuffle of the window (see :meth:`window_rows`); positions count the echoed batches.
        engine: the block reader in this process (see :class:`BlockReader`): ``auto`` (tensorstore where it opens
            the caches, else zarr-python), ``tensorstore`` or ``zarr``; DataLoader workers read with zarr-python
            (see :meth:`readers`). Every engine yields the same samples.

    ``pin_memory``: windows read in this process land in page-locked memory (one asynchronous copy to a GPU; torch's
    host allocator reuses the pages of windows already consumed); set by :func:`loader_items`.
    """

    def __init__(
        self,
        urls: Sequence[str],
        batch_size: int,
        window_samples: int = 512,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        token_dtype: str | None = None,
        storage_options: dict | None = None,
        logits: bool = False,
        levels: Sequence[int] | None = None,
        coefficients: bool = False,
        echo: int = 1,
        engine: str = "auto",
    ) -> None:
        super().__init__()
        check_choice("reader", engine, ENGINES)
        self.engine = engine
        self.pin_memory = False
        self._reading: tuple[int, list[BlockReader]] | None = None
        self._buffers = WindowBuffers()
        caches = open_caches(urls, storage_options, levels)
        self.levels = None if levels is None else tuple(levels)
        bases = caches[0].level_bases()
        shared = all(_same_bases(cache.level_bases(), bases) for cache in caches[1:])
        self.coefficient_bases = bases if coefficients and shared and any(bases) else None
        self.urls = [c.url for c in caches]
        self._read_threads = READ_THREADS  # set again where iteration starts (see read_threads)
        self.spec = caches[0].spec
        self.batch_size = batch_size
        self.echo = echo
        self.plan = StreamPlan.of(caches, batch_size, window_samples, seed, rank, world_size)
        self.token_dtype = resolve_token_dtype(self.spec, token_dtype)
        self.storage_options = storage_options or {}
        self.logits = logits and self.spec.num_classes > 0
        self.moments = _summed_moments(caches)
        self.position = StreamPosition()
        self._open: list[FeatureCache] | None = None
        if self.steps_per_epoch() == 0:
            raise CacheError(
                f"{sum(self.plan.sizes.values())} cached samples give no full batch of {batch_size} per rank on "
                f"{world_size} rank(s); lower --batch-size"
            )

    # -- the plan (indices only) -----------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Identifies the plan (see :meth:`StreamPlan.fingerprint`); a checkpoint resumes only on an equal one."""
        return self.plan.fingerprint(self.urls)

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Batches (optimiser steps) per rank, echoed ones included; equal on every rank (the smallest rank's)."""
        return self.plan.units_per_rank(epoch) * self.echo

    def windows(self, epoch: int) -> list[list[Block]]:
        """This rank's windows for ``epoch`` (see :meth:`StreamPlan.windows`)."""
        return self.plan.windows(epoch)

    # -- reading ---------------------------------------------------------------------------------------------
    def _caches(self) -> list[FeatureCache]:
        if self._open is None:
            self._open = open_views(self.urls, self.storage_options, self.levels)
        return self._open

    def readers(self) -> list[BlockReader]:
        """One block reader per cache, opened in the process that reads. DataLoader workers read with zarr-python:
        tensorstore aborts a forked process that uses it after its parent did (its threads do not survive fork)."""
        if self._reading is None or self._reading[0] != os.getpid():
            engine = "zarr" if get_worker_info() is not None else self.engine
            self._reading = (os.getpid(), [BlockReader(c, self._read_threads, engine) for c in self._caches()])
        return self._reading[1]

    def __getstate__(self) -> dict[str, Any]:
        # readers hold thread pools, buffers this process's memory: each process makes its own
        return {**self.__dict__, "_reading": None, "_buffers": WindowBuffers()}

    def read_window(self, blocks: list[Block]) -> list[CachedSamples]:
        """The samples of ``blocks``, every block's read in flight before the first is awaited."""
        readers = self.readers()
        options = {"logits": self.logits, "token_dtype": self.token_dtype}
        pending = [
            submit_block(readers[b.cache], b, self.plan, reconstruct=self.coefficient_bases is None, **options)
            for b in blocks
        ]
        return [wait() for wait in pending]

    def load_window(self, epoch: int, index: int, blocks: list[Block]) -> dict[str, Any]:
        """Read one window and permute its samples: one buffer per array (``pixels``, ``labels``, ``tokens`` per
        level, ``logits``), in the order of its first pass."""
        parts = self.read_window(blocks)
        count = sum(len(p.labels) for p in parts)
        destination = np.argsort(self.plan.order(epoch, index, count))
        # in a DataLoader worker: shared memory, saving the IPC copy; in-process for a GPU: pinned pages
        memory = "shared" if get_worker_info() is not None else "pinned" if self.pin_memory else "plain"

        def scatter(name: str, arrays: list[np.ndarray]) -> torch.Tensor:
            return _scatter(arrays, destination, self._buffers.take(name, arrays[0], count, memory))

        data = {
            "pixels": scatter("pixels", [p.pixels for p in parts]),
            "labels": scatter("labels", [p.labels for p in parts]),
            "tokens": [scatter(f"tokens/{i}", [p.tokens[i] for p in parts]) for i in range(len(self.spec.levels))],
        }
        if self.logits:
            data["logits"] = scatter("logits", [p.logits for p in parts])
        return data

    def window_rows(self, epoch: int, index: int, count: int) -> list[slice | torch.Tensor]:
        """The rows of each batch of a window of ``count`` samples, ``echo`` passes in all: the first pass cuts the
        window in order (slices), every further pass reshuffles it with ``(seed, epoch, rank, window, pass)``, so an
        echoed sample meets other samples in each of its batches (example echoing, not batch repetition)."""
        rows: list[slice | torch.Tensor] = [slice(s, s + self.batch_size) for s in range(0, count, self.batch_size)]
        for again in range(1, self.echo):
            order = torch.from_numpy(
                np.random.default_rng([self.plan.seed, epoch, self.plan.rank, index, again]).permutation(count)
            )
            rows += [order[s : s + self.batch_size] for s in range(0, count, self.batch_size)]
        return rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        self._read_threads = read_threads(self.urls)
        pos = self.position
        for index, blocks in enumerate(self.windows(pos.epoch)):
            if index < pos.window or (index - pos.window) % workers != worker:
                continue
            data = self.load_window(pos.epoch, index, blocks)
            rows = self.window_rows(pos.epoch, index, len(data["labels"]))
            first = pos.batch if index == pos.window else 0
            yield {"window": index, "first_batch": first, "data": data, "rows": rows[first:]}


WINDOWS_AHEAD = 1  # in-process loading: windows read ahead of the one being trained on


def loader_items(stream: CacheStream, workers: int, pin_memory: bool = False) -> Iterable[dict[str, Any]]:
    """The items of ``stream`` from its position: read by ``workers`` DataLoader processes (each window crosses to
    this process through shared memory, then a pin-memory thread copies it again when ``pin_memory``), or, with 0
    workers, in this process on one background thread with every block of a window in flight at once (tensorstore
    decodes without the GIL), straight into pinned pages when ``pin_memory``.

    Memory, in windows of ``stream.plan.window`` samples: in-process, the window in use, ``WINDOWS_AHEAD`` ready and
    one being read; with workers, one per worker in flight plus the one in use (and its pinned copy)."""
    if workers:
        return DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory, prefetch_factor=1)
    stream.pin_memory = pin_memory
    return read_ahead(iter(stream), WINDOWS_AHEAD)


def read_ahead(items: Iterator[Any], ahead: int) -> Iterator[Any]:
    """``items`` produced on a background thread, at most ``ahead`` waiting beyond the one the caller holds; an
    error in the producer is raised here, and closing this generator stops the producer."""
    waiting: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _offer(waiting, (True, item), stop):
                    return
            _offer(waiting, (False, None), stop)
        except BaseException as error:  # handed to the consumer, which raises it
            _offer(waiting, (False, error), stop)

    worker = threading.Thread(target=produce, name="apmpipe-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            more, value = waiting.get()
            if not more:
                if value is not None:
                    raise value
                return
            yield value
    finally:
        stop.set()
        worker.join()


def _offer(waiting: queue.Queue, entry: tuple[bool, Any], stop: threading.Event) -> bool:
    """Put ``entry`` once there is room; False when the consumer stopped first."""
    while not stop.is_set():
        try:
            waiting.put(entry, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def window_batches(item: dict[str, Any], device: torch.device | None = None) -> Iterator[dict[str, Any]]:
    """The batches of one :class:`CacheStream` item, in order: the window moves to ``device`` once (when given) and
    each batch is a view (first pass) or a gather (echo passes) of it there."""
    data = item["data"]
    if device is not None:
        data = {
            k: [t.to(device, non_blocking=True) for t in v] if k == "tokens" else v.to(device, non_blocking=True)
            for k, v in data.items()
        }
    for rows in item["rows"]:
        if isinstance(rows, torch.Tensor):
            rows = rows.to(data["labels"].device)
        yield {k: [t[rows] for t in v] if k == "tokens" else v[rows] for k, v in data.items()}


def _same_bases(a: Sequence[TokenBasis | None], b: Sequence[TokenBasis | None]) -> bool:
    return all(
        (x is None and y is None)
        or (
            x is not None
            and y is not None
            and np.array_equal(x.mean, y.mean)
            and np.array_equal(x.components, y.components)
        )
        for x, y in zip(a, b, strict=True)
    )


class TokenDecoder(torch.nn.Module):
    """Rebuilds low-rank tokens where the step runs: per level ``mean + coefficients @ components`` (float32), the
    identity for levels stored whole. Move it to the training device with ``.to(device)``."""

    def __init__(self, bases: Sequence[TokenBasis | None]) -> None:
        super().__init__()
        self.low_rank = [basis is not None for basis in bases]
        for index, basis in enumerate(bases):
            if basis is not None:
                self.register_buffer(f"mean_{index}", torch.from_numpy(basis.mean), persistent=False)
                self.register_buffer(f"components_{index}", torch.from_numpy(basis.components), persistent=False)

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per level ``[B, T, K]`` coefficients (or ``[B, T, D]`` whole tokens) -> ``[B, T, D]`` tokens."""
        return [
            torch.addmm(
                getattr(self, f"mean_{i}"), t.reshape(-1, t.shape[-1]).float(), getattr(self, f"components_{i}")
            ).reshape(*t.shape[:-1], -1)
            if low
            else t
            for i, (t, low) in enumerate(zip(tokens, self.low_rank, strict=True))
        ]


KEPT_WINDOWS = 4  # window buffers per array kept for reuse by in-process reading


class WindowBuffers:
    """The buffers windows are assembled in, in ``memory``: ``shared`` (a DataLoader worker's, which leave with the
    item), ``pinned`` (from torch's caching host allocator, which reuses pages once their copies to the device are
    done) or ``plain``, reused here once nothing references them any more: fresh pages cost a fault per 4 KiB
    (2-core CPU, a ViT-B/16 float16 window: permuting into fresh memory ~1,750 samples/s, into a reused buffer
    ~13,700). Each buffer handed out is a view; at most ``KEPT_WINDOWS`` per array are kept."""

    def __init__(self) -> None:
        self._kept: dict[str, list[tuple[torch.Tensor, int]]] = {}

    def take(self, name: str, like: np.ndarray, count: int, memory: str) -> torch.Tensor:
        """A buffer for ``count`` items of ``like``'s item shape and dtype, for array ``name``."""
        shape = (count, *like.shape[1:])
        dtype = torch.from_numpy(np.empty(0, dtype=like.dtype)).dtype
        if memory != "plain":
            out = torch.empty(shape, dtype=dtype, pin_memory=memory == "pinned")
            return out.share_memory_() if memory == "shared" else out
        kept = self._kept.setdefault(name, [])
        for buffer, alone in kept:
            if alone >= 0 and buffer.shape == shape and buffer.dtype == dtype and _storage_references(buffer) == alone:
                return buffer.view(shape)
        buffer = torch.empty(shape, dtype=dtype)
        if len(kept) < KEPT_WINDOWS:
            kept.append((buffer, _storage_references(buffer)))
        return buffer.view(shape)


def _storage_references(tensor: torch.Tensor) -> int:
    """References to ``tensor``'s storage (its views, numpy arrays over it); -1 where torch does not say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return -1 if count is None else count(tensor.untyped_storage()._cdata)


def _scatter(parts: list[np.ndarray], destination: np.ndarray, out: torch.Tensor) -> torch.Tensor:
    """Concatenate ``parts`` and permute in one copy into ``out``: sample ``i`` of the concatenation goes to
    ``destination[i]``."""
    target = out.numpy()
    start = 0
    for part in parts:
        target[destination[start : start + len(part)]] = part
        start += len(part)
    return out


def sample_subset(cache: FeatureCache, count: int, seed: int, every_view: bool = False) -> dict[str, np.ndarray]:
    """A seeded random choice of ``count`` images across all complete shards (0 or more than held: all), as sorted
    row indices per shard; of a cache with ``--views``, view 0 of each (see :meth:`FeatureCache.image_rows`), or
    with ``every_view`` every sample. Shard order is not class order, but folder caches are class-sorted: never
    take the first N."""
    rows = {
        name: np.arange(size) if every_view else cache.image_rows(name, size)
        for name, size in cache.sample_counts().items()
    }
    total = sum(len(held) for held in rows.values())
    chosen = (
        np.arange(total)
        if not count or count >= total
        else np.sort(np.random.default_rng(seed).choice(total, count, replace=False))
    )
    out, offset = {}, 0
    for name, held in rows.items():
        mine = chosen[(chosen >= offset) & (chosen < offset + len(held))] - offset
        if len(mine):
            out[name] = held[mine]
        offset += len(held)
    return out


def first_images(cache: FeatureCache, count: int) -> dict[str, np.ndarray]:
    """The first ``count`` images of the cache in stored order (complete shards sorted by name), as row indices
    per shard (see :func:`sample_subset`)."""
    out: dict[str, np.ndarray] = {}
    for name, size in cache.sample_counts().items():
        if count <= 0:
            break
        out[name] = cache.image_rows(name, size)[:count]
        count -= len(out[name])
    return out


def iter_subset(
    cache: FeatureCache, subset: dict[str, np.ndarray], batch_size: int, token_dtype: str = "float32"
) -> Iterator[CachedSamples]:
    """The samples of ``subset`` (see :func:`sample_subset`) in batches of at most ``batch_size``, reading the whole
    chunks that hold them (and no chunk between two of them that holds none: a cache's other views)."""
    chunk, sizes = cache.spec.chunk_samples, cache.sample_counts()
    for name, indices in subset.items():
        for first in range(0, len(indices), batch_size):
            wanted = indices[first : first + batch_size]
            runs = np.split(wanted, np.flatnonzero(np.diff(wanted // chunk) > 1) + 1)  # rows of adjacent chunks
            parts = []
            for run in runs:
                start, stop = run[0] // chunk * chunk, min((run[-1] // chunk + 1) * chunk, sizes[name])
                parts.append(
                    cache.read(name, int(start), int(stop), token_dtype=np.dtype(token_dtype)).rows(run - start)
                )
            yield CachedSamples.joined(parts)
