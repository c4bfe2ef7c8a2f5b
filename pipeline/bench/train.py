"""``apmpipe bench train``: loader vs student throughput, cached vs online trained samples/s, bytes read per trained
sample and peak RSS as the cache grows."""

from __future__ import annotations

import contextlib
import functools
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from apmpipe.stages.extract import extract, teacher_for
from apmpipe.storage.errors import ConfigError

from .caches import bench_cache_config, grow_cache
from .measure import bench_progress, machine_line, read_bytes_per_sample, synchronize

if TYPE_CHECKING:
    import psutil

    from apmpipe.stages.train import TrainConfig
    from apmpipe.storage.stream import CacheStream


@dataclass
class TrainBench:
    """One ``bench train`` run: every rate in samples/s on one machine, measured side by side."""

    machine: str
    teacher: str
    samples: int
    loader_workers: int
    echo: int
    bytes_per_sample: float  # stored bytes the loader reads per loaded sample (tokens, pixels, labels)
    raw_bytes_per_sample: float  # the same arrays decoded
    loader_sps: float
    rebuilds_on_device: bool  # low-rank caches: coefficients cross to the device (loader_sps) ...
    loader_other_sps: float | None  # ... and the loader with the rebuild placed the other way
    student_sps: dict[str, float]  # per-step student rate, by location setting ("all", "K=64")
    cached_sps: float  # trained samples/s of apmpipe train (one epoch, after a warm-up run)
    online_sps: dict[int, float]  # trained samples/s of online distillation, by its batch size
    online_setup: str  # how the online teacher runs (precision, attention kernel, memory format)
    rss: list[tuple[int, float]]  # (cache samples, peak RSS MiB of the training process tree)

    @property
    def bytes_per_trained_sample(self) -> float:
        return self.bytes_per_sample / self.echo

    @property
    def decode_mb_s_per_worker(self) -> float:
        return self.loader_sps * self.raw_bytes_per_sample / max(1, self.loader_workers) / 1e6

    def loader_needed(self, student_sps: float) -> float:
        """Loaded samples/s a student of that rate consumes (each loaded sample trains ``echo`` steps)."""
        return student_sps / self.echo

    @property
    def online_batch(self) -> int:
        """The online baseline's own best batch size."""
        return max(self.online_sps, key=self.online_sps.__getitem__)

    @property
    def cached_speedup(self) -> float:
        """Cached over online trained samples/s, online at its best batch."""
        return self.cached_sps / self.online_sps[self.online_batch]

    def to_dict(self) -> dict[str, object]:
        """The measured figures and the ratios derived from them (``bench train --json``)."""
        derived = {"online_batch": self.online_batch, "cached_speedup": self.cached_speedup}
        return asdict(self) | derived


LOADER_PASSES = 3  # epochs timed back to back (each starts its workers, as training does)


def bench_train(
    workdir: Path,
    teacher_name: str,
    images: int,
    batch_size: int,
    preset: str,
    loader_workers: int,
    device: str,
    growth: int,
    locations: int = 64,
    echo: int = 1,
    storage: dict[str, object] | None = None,
    layers: tuple[int, ...] = (4, 8, 12),
    model_kwargs: dict[str, object] | None = None,
    compile: bool = False,
    online_batches: tuple[int, ...] = (),
) -> TrainBench:
    """Loader vs student throughput (all locations and ``locations``), cached vs online trained samples/s, bytes read
    per trained sample, and peak RSS at 1x and ``growth``x cache size.

    ``storage``: cache options (``dtype``, ``rank``, ``pixel_codec``). ``teacher_name`` (random init, with
    ``model_kwargs``) caches ``layers``. ``compile``: the student step compiled (as ``train --compile``) in every
    measurement. The online baseline runs its teacher with autocast on CUDA, fused attention and channels_last
    (:meth:`Teacher.use_fast_kernels`), at each of ``online_batches`` (default :func:`online_batch_sizes`); its
    best rate counts.
    """
    from apmpipe.stages.train import rebuilds_on_device
    from apmpipe.storage.stream import CacheStream

    extract_config = bench_cache_config(
        workdir,
        teacher_name,
        images,
        layers,
        model_kwargs,
        batch_size=batch_size,
        loader_workers=loader_workers,
        device=device,
        **(storage or {}),
    )
    cache = extract_config.out
    bench_progress(f"extracting {images} images with {teacher_name} (random init)")
    extract(extract_config)
    window = batch_size  # several windows even in the 1x cache: every loader worker has work, RSS compares alike
    on_device = rebuilds_on_device(torch.device(device))  # as apmpipe train reads low-rank caches on this device
    stream_of = functools.partial(CacheStream, [cache], batch_size, window_samples=window)
    stream = stream_of(coefficients=on_device)
    loader_sps, other_sps, batches = _loader_rates(
        stream, functools.partial(stream_of, coefficients=not on_device), loader_workers
    )
    samples = sum(len(b["labels"]) for b in batches)
    train_config = _train_config(
        workdir, cache, preset, batch_size, loader_workers, device, locations, echo, window, compile
    )
    teacher = teacher_for(extract_config)
    clock = _StudentClock(stream, preset, train_config, teacher.device, compile)
    student_sps = {}
    for label, count in (("all", 0), (f"K={locations}", locations)):
        bench_progress(f"student steps from memory, {label} locations")
        student_sps[label] = clock.rate(batches, clock.from_memory, count)
    online_setup = _online_setup(teacher, compile)
    online_sizes = online_batches or online_batch_sizes(batch_size, teacher.device)
    online_sps = _online_rates(clock, teacher, batches, online_sizes, locations, online_setup)
    cached = _cached_epoch(train_config, workdir, compile or teacher.device.type == "cuda")
    stored, raw = read_bytes_per_sample(cache)
    rss = [
        (factor * samples, _peak_rss(train_config, workdir, factor)) for factor in ((1, growth) if growth > 1 else ())
    ]
    return TrainBench(
        machine=machine_line(teacher.device),
        teacher=teacher_name,
        samples=samples,
        loader_workers=loader_workers,
        echo=echo,
        bytes_per_sample=stored,
        raw_bytes_per_sample=raw,
        loader_sps=loader_sps,
        rebuilds_on_device=on_device,
        loader_other_sps=other_sps,
        student_sps=student_sps,
        cached_sps=cached.samples / cached.seconds,
        online_sps=online_sps,
        online_setup=online_setup,
        rss=rss,
    )


def _loader_rates(
    stream: CacheStream, other_way: Callable[[], CacheStream], workers: int
) -> tuple[float, float | None, list[dict]]:
    """The loader's samples/s as ``apmpipe train`` reads ``stream``, the same with a low-rank rebuild placed the
    other way (``other_way``; None for whole tokens), and the batches of its first pass."""
    bench_progress(f"loader: {LOADER_PASSES} passes with {workers} workers")
    loader_sps, batches = _loader_rate(stream, workers)
    other_sps = None
    if stream.spec.rank:  # the other placement of the rebuild, side by side
        bench_progress("loader with the low-rank rebuild placed the other way (loader CPU vs training device)")
        other_sps, _ = _loader_rate(other_way(), workers)
    return loader_sps, other_sps, batches


def _loader_rate(stream: CacheStream, workers: int) -> tuple[float, list[dict]]:
    """Samples/s of ``LOADER_PASSES`` passes over ``stream`` as ``apmpipe train`` loads it (``workers`` DataLoader
    processes, or in-process read-ahead with 0), and the batches of the first pass."""
    from apmpipe.storage.stream import loader_items, window_batches

    start = time.perf_counter()
    passes = [[b for item in loader_items(stream, workers) for b in window_batches(item)] for _ in range(LOADER_PASSES)]
    samples = sum(len(b["labels"]) for b in passes[0])
    return LOADER_PASSES * samples / (time.perf_counter() - start), passes[0]


def _train_config(
    workdir: Path,
    cache: str,
    preset: str,
    batch_size: int,
    loader_workers: int,
    device: str,
    locations: int,
    echo: int,
    window: int,
    compile: bool,
) -> TrainConfig:
    """The one-epoch ``apmpipe train`` run every cached figure comes from (its loss read at the last step only)."""
    from apmpipe.stages.objectives import LossConfig
    from apmpipe.stages.train import TrainConfig

    return TrainConfig(
        caches=(cache,),
        out=str(workdir / "run"),
        preset=preset,
        batch_size=batch_size,
        epochs=1,
        loader_workers=loader_workers,
        device=device,
        warmup_steps=1,
        locations=locations,
        echo=echo,
        window_samples=window,
        compile=compile,
        log_every=10**9,  # losses are read at the last step only, as a long run reads them rarely
        loss=LossConfig(logit_weight=0.0),
    ).for_device(torch.device(device))


class _StudentClock:
    """Trained samples/s of fresh students stepped from batches in memory, ``echo`` steps per batch, as
    ``apmpipe train`` steps them (the config's optimiser and loss, the objective compiled or not)."""

    def __init__(
        self, stream: CacheStream, preset: str, config: TrainConfig, device: torch.device, compile: bool
    ) -> None:
        from apmpipe.stages.inputs import PixelNormalizer
        from apmpipe.stages.train import compiled_objective, step_losses
        from apmpipe.storage.stream import TokenDecoder

        self.stream, self.preset, self.config, self.device = stream, preset, config, device
        self.normalize = PixelNormalizer(stream.spec.data_config).to(device)
        self.objective = compiled_objective() if compile else step_losses
        bases = stream.coefficient_bases
        self.decoder = TokenDecoder(bases).to(device) if bases else (lambda tokens: tokens)

    def from_memory(self, batch: dict) -> list[torch.Tensor]:
        """The batch's teacher tokens on the device (low-rank ones rebuilt there, once per loaded batch)."""
        return [t.float() for t in self.decoder([t.to(self.device) for t in batch["tokens"]])]

    def rate(self, epoch: list[dict], targets_of: Callable[[dict], list[torch.Tensor]], count: int) -> float:
        """Trained samples/s over ``epoch`` (``echo`` steps per batch) at ``count`` locations (0: all), after one
        untimed step (CUDA context, cuBLAS handles, kernel selection and compilation stay out of the figure)."""
        echo, dev = self.config.echo, self.device
        step = self._fresh_student(len(epoch) * echo, count)
        warm = epoch[0]
        step(self.normalize(warm["pixels"].to(dev)), targets_of(warm), 0)
        synchronize(dev)
        begin = time.perf_counter()
        for index, batch in enumerate(epoch):
            images, targets = self.normalize(batch["pixels"].to(dev)), targets_of(batch)
            for repeat in range(echo):
                step(images, targets, index * echo + repeat)
        synchronize(dev)
        return sum(len(b["pixels"]) for b in epoch) * echo / (time.perf_counter() - begin)

    def _fresh_student(self, steps: int, count: int) -> Callable[[torch.Tensor, list[torch.Tensor], int], None]:
        """A new student and optimiser for ``steps`` steps; returns its step at ``count`` locations per image."""
        from apmpipe.stages.apm import APM, config_for_cache
        from apmpipe.stages.objectives import location_generator, locations_to, sample_level_locations
        from apmpipe.stages.train import fit_target_scales, make_optimizer, train_step

        dev = self.device
        model = APM(config_for_cache(self.stream.spec, self.preset, query=self.config.query))
        fit_target_scales(model, self.stream)
        model = model.to(dev)
        optimizer, scheduler = make_optimizer(model, self.config, steps, dev)
        cfg, amp, loss = model.config, dev.type == "cuda", self.config.loss

        def step(images: torch.Tensor, targets: list[torch.Tensor], index: int) -> None:
            where = locations_to(sample_level_locations(cfg, len(images), count, location_generator(0, 0, index)), dev)
            train_step(model, model, optimizer, scheduler, images, targets, where, loss, amp, objective=self.objective)

        return step


def online_batch_sizes(batch_size: int, device: torch.device) -> tuple[int, ...]:
    """The batch sizes the online baseline is timed at (its best one counts): the training batch, and on CUDA also
    2x and 4x (a teacher fills a GPU at larger batches than a small student's step needs)."""
    return (batch_size, 2 * batch_size, 4 * batch_size) if device.type == "cuda" else (batch_size,)


def rebatched(batches: list[dict], size: int) -> list[dict]:
    """The pixels of ``batches`` cut into batches of ``size`` (a partial last one dropped: fixed shapes)."""
    pixels = torch.cat([b["pixels"] for b in batches])
    return [{"pixels": pixels[s : s + size]} for s in range(0, len(pixels) - size + 1, size)]


def _online_setup(teacher: Any, compile: bool) -> str:
    """The online teacher switched to its fast kernels, and a line saying how it runs."""
    fused = teacher.use_fast_kernels()
    return (
        f"{teacher.precision}, fused attention in {fused} blocks"
        + (", channels_last" if teacher.device.type == "cuda" else "")
        + (", compiled student" if compile else "")
    )


def _online_rates(
    clock: _StudentClock, teacher: Any, batches: list[dict], sizes: tuple[int, ...], locations: int, setup: str
) -> dict[int, float]:
    """Online distillation's trained samples/s at each batch size that fits the cached samples: the teacher's
    forward on every batch gives the targets."""
    samples = sum(len(b["labels"]) for b in batches)
    online_sps = {}
    for size in sizes:
        epoch = rebatched(batches, size)
        if not epoch:
            bench_progress(f"online distillation at batch {size}: skipped, more than the {samples} cached samples")
            continue
        bench_progress(f"online distillation at batch {size} (teacher forward every batch; {setup})")
        online_sps[size] = clock.rate(
            epoch, lambda b: [t.clone() for t in teacher.forward(b["pixels"])[0]], locations
        )  # clone: leave inference mode
    if not online_sps:
        raise ConfigError(f"--online-batch-sizes are all above the {samples} cached samples; give smaller ones")
    return online_sps


def _cached_epoch(config: TrainConfig, workdir: Path, warm_up: bool) -> Any:
    """One epoch of ``apmpipe train`` (its summary), after a 2-step run when ``warm_up`` (compilation, kernels)."""
    from apmpipe.stages.train import train

    if warm_up:
        bench_progress("cached warm-up (apmpipe train, 2 steps: compilation and kernel selection)")
        train(replace(config, out=str(workdir / "warm-up"), max_steps=2))
    bench_progress("cached epoch (apmpipe train)")
    return train(config)


def _peak_rss(config: TrainConfig, workdir: Path, factor: int) -> float:
    """Peak RSS (MiB) of an ``apmpipe train`` process on the cache grown ``factor`` times (from 1x: call in order)."""
    if factor > 1:
        grow_cache(config.caches[0], factor)
    bench_progress(f"peak RSS of a training process on {factor}x the cache")
    options = {
        "--out": workdir / f"rss-{factor}",
        "--preset": config.preset,
        "--epochs": 1,
        "--batch-size": config.batch_size,
        "--loader-workers": config.loader_workers,
        "--device": config.device,
        "--window-samples": config.window_samples,
        "--locations": config.locations,
        "--echo": config.echo,
    }
    command = [sys.executable, "-m", "apmpipe.pipeline", "train", config.caches[0]]
    return _peak_tree_rss(command + [str(part) for pair in options.items() for part in pair])


def _tree_rss(root: psutil.Process) -> int:
    """Summed RSS of ``root`` and its children now; processes that end or deny access meanwhile count as 0."""
    import psutil

    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


def _peak_tree_rss(command: list[str]) -> float:
    """Run ``command`` and return the peak summed RSS (MiB) of it and its children, sampled every 50 ms.

    The child's stderr goes to a temporary file (a pipe nobody reads would block it past 64 KiB) and its tail
    is quoted if the command fails.
    """
    import subprocess

    import psutil

    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss(root))
            time.sleep(0.05)
        if proc.returncode:
            errors.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed: {errors.read().decode(errors='replace')[-500:]}")
    return peak / 2**20
