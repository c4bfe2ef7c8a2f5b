"""Decoded, preprocessed batches of input shards, produced in DataLoader workers.

:class:`ShardBatches` is a torch ``IterableDataset`` over a list of :class:`~storage.sources.ShardSource`.
Each DataLoader worker takes whole shards (``shards[worker::num_workers]``), decodes and transforms their
images and yields one :class:`dict` per batch. Batches never span two shards and always start at the shard's
first sample, so the batch partition (and hence the teacher's output) does not depend on how many workers
or machines ran the job.

A batch record holds ``shard`` (name), ``pixels`` (uint8 ``[B, C, H, W]``), ``labels`` (int64 ``[B]``),
``keys`` (list of str), ``skipped`` (list of ``(key, reason)`` for samples skipped in this batch: no image,
undecodable or too large image, bad label), ``last`` (True on the shard's final record) and ``error`` (a
reason when the shard itself could not be read; then ``last`` is True and nothing more comes for it).

DataLoader workers should start with :func:`die_with_parent`, so that a killed driver leaves no decoding
process behind.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .errors import failure_line, plain_message
from .sources import DEFAULT_MAX_PIXELS, ImageTooLarge, ShardSource, decode_image, iter_samples

PixelTransform = Callable[[Image.Image], torch.Tensor]


class InputOptions(Protocol):
    """How a stage reads its input shards (the fields extract and embed share)."""

    batch_size: int
    label_key: str | None
    class_names: tuple[str, ...]
    max_pixels: int
    storage_options: dict[str, Any]


class ShardBatches(IterableDataset):
    """Batches of teacher-ready uint8 pixels, whole shards per DataLoader worker.

    Args:
        shards: the shard units to read, in order.
        transform: PIL image -> uint8 tensor ``[C, H, W]`` (the teacher's geometric preprocessing).
        pixel_shape: ``(C, H, W)`` of the transform's output, used for empty batches.
        batch_size: images per batch.
        label_key: WebDataset field holding the label (``cls``, or ``json:path.in.json``), or None.
        class_names: names that labels may be given as (index = label).
        max_pixels: images with more pixels are skipped before decoding.
        storage_options: fsspec options for remote inputs.
    """

    def __init__(
        self,
        shards: Sequence[ShardSource],
        transform: PixelTransform,
        pixel_shape: tuple[int, int, int],
        batch_size: int,
        label_key: str | None = "cls",
        storage_options: dict | None = None,
        class_names: tuple[str, ...] = (),
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        self.shards = list(shards)
        self.transform = transform
        self.pixel_shape = pixel_shape
        self.batch_size = batch_size
        self.label_key = label_key
        self.class_names = tuple(class_names)
        self.max_pixels = max_pixels
        self.storage_options = storage_options or {}

    def _my_shards(self) -> list[ShardSource]:
        info = get_worker_info()
        if info is None:
            return self.shards
        return self.shards[info.id :: info.num_workers]

    def _record(
        self,
        shard: str,
        pixels: list[torch.Tensor],
        labels: list[int],
        keys: list[str],
        skipped: list,
        *,
        last: bool,
        error: str | None = None,
    ) -> dict:
        stacked = torch.stack(pixels) if pixels else torch.zeros((0, *self.pixel_shape), dtype=torch.uint8)
        return {
            "shard": shard,
            "pixels": stacked,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "keys": list(keys),
            "skipped": list(skipped),
            "last": last,
            "error": error,
        }

    def _preprocess(self, data: bytes) -> torch.Tensor:
        pixels = self.transform(decode_image(data, self.pixel_shape[0], self.max_pixels))
        assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == self.pixel_shape, (pixels.dtype, pixels.shape)
        return pixels

    def _iter_shard(self, shard: ShardSource) -> Iterator[dict]:
        pixels: list[torch.Tensor] = []
        labels: list[int] = []
        keys: list[str] = []
        skipped: list[tuple[str, str]] = []
        try:
            for sample in iter_samples(
                shard, label_key=self.label_key, class_names=self.class_names, storage_options=self.storage_options
            ):
                if sample.problem or sample.image is None:
                    skipped.append((sample.key, sample.problem or "no image field"))
                    continue
                try:
                    pixels.append(self._preprocess(sample.image))
                except ImageTooLarge as exc:
                    skipped.append((sample.key, str(exc)))
                    continue
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                    skipped.append((sample.key, f"undecodable image: {plain_message(exc)}"))
                    continue
                labels.append(sample.label)
                keys.append(sample.key)
                if len(pixels) == self.batch_size:
                    yield self._record(shard.name, pixels, labels, keys, skipped, last=False)
                    pixels, labels, keys, skipped = [], [], [], []
        except Exception as exc:  # an unreadable shard fails alone; the run goes on with the others
            yield self._record(shard.name, [], [], [], skipped, last=True, error=failure_line(exc, [shard.url]))
            return
        yield self._record(shard.name, pixels, labels, keys, skipped, last=True)

    def __iter__(self) -> Iterator[dict]:
        for shard in self._my_shards():
            yield from self._iter_shard(shard)

    @classmethod
    def of(
        cls,
        options: InputOptions,
        shards: Sequence[ShardSource],
        transform: PixelTransform,
        pixel_shape: tuple[int, int, int],
    ) -> ShardBatches:
        """Batches of ``shards`` decoded as ``options`` ask (batch size, labels, pixel limit, storage options)."""
        return cls(
            shards,
            transform,
            pixel_shape,
            options.batch_size,
            options.label_key,
            options.storage_options,
            options.class_names,
            options.max_pixels,
        )


def batch_loader(batches: ShardBatches, workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over ``batches`` in ``workers`` decoding processes (at most one per shard; 0: in this process),
    each of which dies with this process."""
    workers = min(workers, len(batches.shards))
    return DataLoader(
        batches,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        worker_init_fn=functools.partial(die_with_parent, os.getpid()) if workers else None,
    )


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn`` (bind ``parent`` = the driver's pid with functools.partial): the kernel kills
    this worker when its parent dies (Linux; elsewhere torch's own watchdog ends it within seconds)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(0)
