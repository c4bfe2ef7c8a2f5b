"""``apmpipe bench pipeline``: the stage-two data path taken apart, stage by stage, old path beside new.

Every stage is timed alone on the same cache, in one process, on the device at hand (CUDA when present, else the
CPU): the storage read (stored bytes fetched), read + decode per block (zarr-python, the old reader, beside the block
reader training uses now), window assembly in this process beside a DataLoader's worker->main transfer, pinning,
the host->device copy, the batch gather / echo reshuffle / low-rank rebuild on the device, the student step, and
the end-to-end rate of both paths. Rates are samples/s and GB/s (decoded bytes, stored bytes for the storage read);
"per core" rates divide by the CPU seconds used (the process's threads and its DataLoader workers), so they hold
on a shared machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apmpipe.storage.errors import AT_LEAST_ONE, NON_NEGATIVE
from apmpipe.storage.redact import redact_url

from .caches import bench_cache_config
from .measure import bench_progress, machine_line, read_bytes_per_sample

WINDOWS, STUDENT = "windows to the main process", "student step"
RANGES = {
    "images": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE,
    "window_samples": AT_LEAST_ONE,
    "echo": AT_LEAST_ONE,
    "locations": NON_NEGATIVE,
    "old_workers": NON_NEGATIVE,
    "student_rate": NON_NEGATIVE,
}
OLD_WORKERS = 2  # the old path: apmpipe train's default --loader-workers, every window through a DataLoader


@dataclass
class StageRate:
    """One stage of one path: samples/s over wall time, and per CPU second when measured so."""

    samples_per_s: float
    bytes_per_sample: float  # decoded bytes per sample (stored bytes for the storage read)
    per_core: float | None = None  # samples per CPU second of this process (all threads) and its ended workers

    @property
    def gb_per_s(self) -> float:
        return self.samples_per_s * self.bytes_per_sample / 1e9


@dataclass
class PipelineStage:
    name: str
    old: StageRate | None
    new: StageRate | None
    note: str = ""
    serial: bool = True  # on the new path's critical path (the limiting stage is the slowest of these)

    @property
    def ratio(self) -> float | None:
        return self.new.samples_per_s / self.old.samples_per_s if self.old and self.new else None

    @property
    def core_ratio(self) -> float | None:
        """new / old in samples per CPU second (None where either lacks it)."""
        if self.old and self.new and self.old.per_core and self.new.per_core:
            return self.new.per_core / self.old.per_core
        return None


@dataclass
class PipelineBench:
    machine: str
    device: str
    cache: str
    samples: int
    batch_size: int
    window: int
    echo: int
    locations: int
    preset: str
    old_workers: int
    reader: str  # the engine the new path read with
    stored_bytes_per_sample: float
    raw_bytes_per_sample: float
    stages: list[PipelineStage] = field(default_factory=list)

    def limiting(self) -> PipelineStage:
        """The slowest stage of the new path that every trained sample passes through."""
        return min((s for s in self.stages if s.serial and s.new), key=lambda s: s.new.samples_per_s)

    def stage(self, name: str) -> PipelineStage:
        return next(s for s in self.stages if s.name.startswith(name))

    def loader_per_core(self) -> float:
        """Windows delivered to the main process by the new path, samples per CPU second of the process."""
        return self.stage(WINDOWS).new.per_core or float("nan")

    def student_rate(self) -> float:
        return self.stage(STUDENT).new.samples_per_s

    def loader_cores_needed(self, student_rate: float | None = None) -> float:
        """Cores the new loader needs to feed a student of ``student_rate`` trained samples/s (default: the
        measured one); each loaded sample trains ``echo`` steps."""
        return (student_rate or self.student_rate()) / self.echo / self.loader_per_core()


def _rate(count: int, run: Callable[[], object], bytes_per_sample: float, repeats: int = 3) -> StageRate:
    """``run()`` once to warm up (page cache, allocators, kernels), then the best of ``repeats`` timed runs (wall and
    CPU apart: the least disturbed run on a shared machine); ``count`` samples per run."""
    run()
    _sync()
    wall, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        started, used = time.perf_counter(), _cpu_seconds()
        run()
        _sync()
        wall, cpu = min(wall, time.perf_counter() - started), min(cpu, _cpu_seconds() - used)
    return StageRate(count / wall, bytes_per_sample, count / cpu if cpu > 0 else None)


def _cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its children that ended (DataLoader workers, once joined)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_bench_cache(
    workdir: Path,
    teacher: str,
    images: int,
    device: str,
    model_kwargs: dict[str, Any] | None = None,
    layers: tuple[int, ...] = (4, 8, 12),
) -> str:
    """A float16 cache of ``images`` bundled digits through ``teacher`` (random init, ``model_kwargs``) at
    ``layers``, at the teacher's own input size (a ViT-B/16-shaped cache by default)."""
    from apmpipe.stages.extract import extract

    config = bench_cache_config(workdir, teacher, images, layers, model_kwargs, device=device)
    shown = ",".join(map(str, layers))
    bench_progress(f"extracting {images} images with {teacher} (random init, float16, layers {shown})")
    extract(config)
    return config.out


def _storage_read(stream: Any, stored_per_sample: float) -> StageRate:
    """Every stored file of the trained arrays fetched whole through fsspec (no decoding): the storage's rate."""
    import fsspec

    cache = stream.readers()[0].cache
    fs, root = fsspec.core.url_to_fs(cache.url, **stream.storage_options)
    names = cache.read_arrays(tokens=True, pixels=True, logits=stream.logits, keys=False)
    files = [
        f
        for shard in stream.plan.sizes
        for name in names
        for f in fs.find(f"{root.rstrip('/')}/shards/{shard[1]}/{name}")
        if not f.endswith("zarr.json")
    ]
    samples = sum(stream.plan.sizes.values())
    return _rate(samples, lambda: [fs.cat_file(f) for f in files], stored_per_sample)


def _blocks_read(stream: Any, engine: str, raw: float) -> StageRate:
    """Read + decode every block of an epoch with ``engine`` on one decoding thread, blocks kept in flight."""
    from apmpipe.storage.reader import BlockReader
    from apmpipe.storage.stream import submit_block

    readers = [BlockReader(reader.cache, 1, engine) for reader in stream.readers()]
    blocks = stream.plan.blocks
    options = {"logits": stream.logits, "token_dtype": stream.token_dtype, "reconstruct": False}

    def read_all() -> None:
        pending = [submit_block(readers[b.cache], b, stream.plan, **options) for b in blocks]
        for wait in pending:
            wait()

    rate = _rate(sum(b.size for b in blocks), read_all, raw)
    for reader in readers:
        reader.close()
    return rate


def _items_rate(make_items: Callable[[], Iterable[dict]], samples: int, raw: float) -> StageRate:
    return _rate(samples, lambda: [item["data"]["labels"].shape for item in make_items()], raw)


def _pin_rate(item: dict, samples: int, raw: float) -> StageRate:
    """The DataLoader's pin-memory copy of one window, alone."""
    data = item["data"]
    return _rate(samples, lambda: [t.pin_memory() for t in (data["pixels"], *data["tokens"])], raw)


def _to_device_rate(item: dict, device: torch.device, samples: int, raw: float) -> StageRate:
    """One asynchronous host->device copy of a pinned window, alone."""
    data = {k: [t.pin_memory() for t in v] if k == "tokens" else v.pin_memory() for k, v in item["data"].items()}
    pinned = {**item, "data": data}

    def copy() -> None:
        for batch in _window_batches(pinned, device, first_only=True):
            del batch

    return _rate(samples, copy, raw)


def _window_batches(item: dict, device: torch.device, first_only: bool = False) -> Iterable[dict]:
    from apmpipe.storage.stream import window_batches

    return window_batches({**item, "rows": item["rows"][:1]} if first_only else item, device)


class _Student:
    """The student and optimiser of ``apmpipe train`` on the bench cache, stepped from batches on the device."""

    def __init__(self, stream: Any, preset: str, locations: int, device: torch.device, steps: int) -> None:
        from apmpipe.stages.apm import APM, config_for_cache
        from apmpipe.stages.inputs import PixelNormalizer
        from apmpipe.stages.objectives import LossConfig
        from apmpipe.stages.train import TrainConfig, fit_target_scales, make_optimizer
        from apmpipe.storage.stream import TokenDecoder

        self.config = TrainConfig(
            caches=tuple(stream.urls),
            out="unused",
            preset=preset,
            locations=locations,
            batch_size=stream.batch_size,
            loss=LossConfig(0.0),
        ).for_device(device)
        self.model = APM(config_for_cache(stream.spec, preset, query=self.config.query))
        fit_target_scales(self.model, stream)
        self.model = self.model.to(device)
        self.optimizer, self.scheduler = make_optimizer(self.model, self.config, steps, device)
        self.normalize = PixelNormalizer(stream.spec.data_config).to(device)
        self.decoder = TokenDecoder(stream.coefficient_bases).to(device) if stream.coefficient_bases else None
        self.device, self.locations, self.step_index = device, locations, 0

    def targets(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.decoder(tokens) if self.decoder is not None else tokens

    def step(self, batch: dict) -> None:
        from apmpipe.stages.objectives import location_generator, locations_to, sample_level_locations
        from apmpipe.stages.train import train_step

        cfg = self.model.config
        images = self.normalize(batch["pixels"])
        where = sample_level_locations(cfg, len(images), self.locations, location_generator(0, 0, self.step_index))
        train_step(
            self.model,
            self.model,
            self.optimizer,
            self.scheduler,
            images,
            self.targets(batch["tokens"]),
            locations_to(where, self.device),
            self.config.loss,
            self.device.type == "cuda",
        )
        self.step_index += 1


def bench_pipeline(
    workdir: Path,
    cache: str | None,
    teacher: str,
    images: int,
    batch_size: int,
    window: int,
    echo: int,
    locations: int,
    preset: str,
    device: str,
    old_workers: int = OLD_WORKERS,
    storage_options: dict | None = None,
    *,
    model_kwargs: dict[str, Any] | None = None,
    layers: tuple[int, ...] = (4, 8, 12),
) -> PipelineBench:
    """Each stage of stage two alone and the whole path end to end, the old path (zarr-python in ``old_workers``
    DataLoader processes, pin-memory thread) beside the new (the block reader in this process, one window read
    ahead into pinned pages); builds a cache in ``workdir`` unless ``cache`` is given."""
    from apmpipe.storage.stream import CacheStream, loader_items

    dev = torch.device(device)
    url = cache or build_bench_cache(workdir, teacher, images, device, model_kwargs, layers)
    on_device = dev.type == "cuda"  # low-rank caches: coefficients cross to a GPU, as apmpipe train does

    def stream_of(engine: str) -> CacheStream:
        return CacheStream(
            [url],
            batch_size,
            window,
            echo=echo,
            coefficients=on_device,
            storage_options=storage_options,
            engine=engine,
        )

    old, new = stream_of("zarr"), stream_of("auto")
    paths = _Paths(old, new, old_workers, dev, new.readers()[0].engine)
    stored, raw = read_bytes_per_sample(url)
    result = PipelineBench(
        machine_line(dev), dev.type, redact_url(url), sum(new.plan.sizes.values()), batch_size, new.plan.window, echo,
        locations, preset, old_workers, paths.reader, stored, raw,
    )  # fmt: skip
    result.stages += _read_stages(paths, stored, raw)
    item = next(iter(loader_items(new, 0)))
    result.stages += _copy_stages(paths, item, raw)
    student = _Student(new, preset, locations, dev, steps=10_000)
    result.stages += _device_stages(paths, item, student, raw)
    result.stages.append(_end_to_end(paths, student, raw))
    return result


@dataclass
class _Paths:
    """The old path (zarr-python in ``old_workers`` DataLoader processes) and the new (the block reader in this
    process), on one cache and device."""

    old: Any
    new: Any
    old_workers: int
    device: torch.device
    reader: str  # the engine the new path reads with

    @property
    def on_device(self) -> bool:
        return self.device.type == "cuda"

    @property
    def loaded(self) -> int:
        """Samples an epoch yields (whole batches)."""
        return self.new.plan.units_per_rank() * self.new.batch_size


def _read_stages(paths: _Paths, stored: float, raw: float) -> list[PipelineStage]:
    """The storage read alone, read + decode per block on one thread, and windows delivered to the main process."""
    from apmpipe.storage.stream import loader_items

    old, new, reader, workers = paths.old, paths.new, paths.reader, paths.old_workers
    bench_progress("storage read: every stored file of the trained arrays, whole")
    storage = PipelineStage(
        "storage read (stored bytes)", None, _storage_read(new, stored), "fsspec, no decoding", False
    )
    bench_progress("read + decode per block, one decoding thread: zarr-python beside the block reader")
    decode = PipelineStage(
        "read + decode, 1 thread",
        _blocks_read(old, "zarr", raw),
        _blocks_read(new, reader, raw),
        f"old: FeatureCache.read (zarr-python); new: {reader}, every block in flight",
    )
    bench_progress(f"windows: {workers} DataLoader workers (zarr) beside in-process read-ahead ({reader})")
    windows = PipelineStage(
        WINDOWS,
        _items_rate(lambda: loader_items(old, workers), paths.loaded, raw),
        _items_rate(lambda: loader_items(new, 0, pin_memory=paths.on_device), paths.loaded, raw),
        f"old: {workers} workers + worker->main transfer; new: in-process, no transfer",
    )
    return [storage, decode, windows]


def _copy_stages(paths: _Paths, item: dict, raw: float) -> list[PipelineStage]:
    """Pinning a window and its host->device copy (CUDA only)."""
    if not paths.on_device:
        return [PipelineStage("pinning, host->device copy", None, None, "no CUDA device: not measured", False)]
    samples = len(item["data"]["labels"])
    bench_progress("pinning a window (the DataLoader's pin-memory thread), host->device copy of a window")
    pinning = PipelineStage("pinning", _pin_rate(item, samples, raw), None, "new: read straight into pinned")
    copy = _to_device_rate(item, paths.device, samples, raw)
    return [pinning, PipelineStage("host->device copy", copy, copy, "one asynchronous copy per window")]


def _device_stages(paths: _Paths, item: dict, student: _Student, raw: float) -> list[PipelineStage]:
    """A window already on the device: its batch views / echo gathers / low-rank rebuild, and the student's steps."""
    dev, batch_size = paths.device, paths.new.batch_size
    data = item["data"]  # the window already on the device: its batches are views / echo gathers of it
    resident = {**item, "data": {k: [t.to(dev) for t in v] if k == "tokens" else v.to(dev) for k, v in data.items()}}
    trained = len(item["rows"]) * batch_size

    def gather_all() -> None:
        for batch in _window_batches(resident, dev):
            student.targets(batch["tokens"])

    bench_progress("batch views, echo gathers and low-rank rebuild of a window on the device")
    gather = _rate(trained, gather_all, raw)
    batches = list(_window_batches(resident, dev))
    bench_progress(f"student steps from memory ({student.config.preset}, K={student.locations}, batch {batch_size})")
    step = _rate(len(batches) * batch_size, lambda: [student.step(b) for b in batches], raw, repeats=2)
    return [
        PipelineStage("batch gather / echo / rebuild (device)", gather, gather, f"echo {paths.new.echo}"),
        PipelineStage(f"{STUDENT} (K={student.locations})", step, step, "trained samples/s"),
    ]


def _end_to_end(paths: _Paths, student: _Student, raw: float) -> PipelineStage:
    """One epoch through each path, the student stepping every batch."""
    from apmpipe.storage.stream import loader_items

    def epoch_of(stream: Any, workers: int) -> Callable[[], None]:
        def epoch() -> None:
            for window_item in loader_items(stream, workers, pin_memory=paths.on_device):
                for batch in _window_batches(window_item, paths.device):
                    student.step(batch)

        return epoch

    bench_progress("end to end: one epoch through each path")
    trained = paths.loaded * paths.new.echo
    return PipelineStage(
        "end to end",
        _rate(trained, epoch_of(paths.old, paths.old_workers), raw, repeats=2),
        _rate(trained, epoch_of(paths.new, 0), raw, repeats=2),
        "trained samples/s",
        False,
    )
