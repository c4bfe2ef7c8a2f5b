"""``apmpipe bench``: throughput measured side by side in one process, reported as ratios.

Timings on shared machines are noisy, so every benchmark measures its baseline in the same run, on the same
device, with the same model and batch, and prints the ratio (the number to compare against a target).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from apmpipe.stages.extract import ExtractConfig, extract, extract_shards, loader_workers, teacher_for
from apmpipe.stages.teacher import TeacherConfig, TeacherPool
from apmpipe.storage.batches import ShardBatches
from apmpipe.storage.errors import ConfigError
from apmpipe.storage.redact import redact_url
from apmpipe.storage.sources import resolve_inputs

from .datasets import write_digit_shards

if TYPE_CHECKING:
    import psutil

    from apmpipe.storage.stream import CacheStream


def machine_line(device: torch.device) -> str:
    """One line naming the hardware a number was measured on."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class ExtractBench:
    images: int
    forward_ips: float
    extract_ips: float
    stored_bytes_per_image: float
    raw_fp32_bytes_per_image: float
    machine: str
    loader_workers: int

    @property
    def ratio(self) -> float:
        return self.extract_ips / self.forward_ips

    @property
    def compression(self) -> float:
        return self.raw_fp32_bytes_per_image / self.stored_bytes_per_image


def default_bench_shards(workdir: Path, images: int, size: int) -> list[str]:
    return write_digit_shards(workdir / "shards", count=images, per_shard=max(1, images // 4), size=size, mode="RGB")


def bench_cache_config(
    workdir: Path,
    teacher: str,
    images: int,
    layers: tuple[int, ...],
    model_kwargs: dict[str, object] | None = None,
    **options: object,
) -> ExtractConfig:
    """The extraction of a bench's cache, ``workdir/bench.zarr``: ``images`` bundled digits through ``teacher``
    (random init, ``model_kwargs``) at ``layers``; ``options``: other :class:`ExtractConfig` fields."""
    return ExtractConfig(
        inputs=tuple(default_bench_shards(workdir, images, 64)),
        out=str(workdir / "bench.zarr"),
        teacher=TeacherConfig(teacher, pretrained=False, model_kwargs=tuple(sorted((model_kwargs or {}).items()))),
        layers=layers,
        **options,
    )


def bench_extract(config: ExtractConfig) -> ExtractBench:
    """Extraction images/s vs bare ``forward_intermediates`` images/s of the same teacher, batch and device."""
    shards = list(resolve_inputs(config.inputs, folder_block=config.folder_block).shards)
    bench_progress(f"building {config.teacher.name} and decoding {len(shards)} shards")
    teachers = TeacherPool()
    teacher = teacher_for(config, teachers)  # the same instance extract() uses below: built once
    batches = [
        b["pixels"]
        for b in ShardBatches(
            shards, teacher.pixel_transform(), teacher.pixel_shape, config.batch_size, config.label_key
        )
        if len(b["pixels"])
    ]
    images = sum(len(b) for b in batches)
    indices = [layer - 1 for layer in teacher.layers]

    def bare_forward() -> None:
        with torch.inference_mode(), torch.autocast(teacher.device.type, dtype=torch.bfloat16, enabled=teacher.amp):
            for pixels in batches:
                teacher.model.forward_intermediates(teacher.normalize(pixels), indices=indices, intermediates_only=True)
        if teacher.device.type == "cuda":
            torch.cuda.synchronize()

    bench_progress(f"bare forward_intermediates over {images} images (warm-up, then timed)")
    bare_forward()  # warm-up (allocator, kernels)
    before = timed(bare_forward)
    run_seconds: list[float] = []

    def timed_runner(cfg, todo, progress):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        results = extract_shards(cfg, todo, progress, teachers)
        run_seconds.append(time.perf_counter() - start)
        return results

    bench_progress("apmpipe extract of the same images")
    summary = extract(config, runner=timed_runner, teachers=teachers)
    bench_progress("bare forward_intermediates again (drift check)")
    forward_seconds = (before + timed(bare_forward)) / 2  # baseline before and after: machine drift cancels
    raw = sum(level.num_tokens * level.dim * 4 for level in teacher.levels) + 4 * teacher.num_classes
    raw += teacher.pixel_shape[0] * teacher.pixel_shape[1] * teacher.pixel_shape[2] + 8  # uint8 pixels, int64 label
    return ExtractBench(
        images=images,
        forward_ips=images / forward_seconds,
        extract_ips=summary.images / run_seconds[0],
        stored_bytes_per_image=summary.stored_bytes / max(1, summary.cache_samples),
        raw_fp32_bytes_per_image=raw,
        machine=machine_line(teacher.device),
        loader_workers=loader_workers(config.loader_workers, teacher.device.type),
    )


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="apmpipe-bench-")


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


LOADER_PASSES = 3  # epochs timed back to back (each starts its workers, as training does)


def grow_cache(url: str, factor: int) -> None:
    """Make a cache ``factor`` times larger by copying its complete shard groups under new names (bench only)."""
    from apmpipe.storage.cache import FeatureCache

    cache = FeatureCache.open(url, mode="r+")
    originals = list(cache.shard_status())
    for k in range(1, factor):
        for name in originals:
            cache.copy_shard(name, f"{name}-copy{k}")


def _read_bytes_per_sample(
    cache: str, levels: tuple[int, ...] | None = None, logits: bool = False
) -> tuple[float, float]:
    """(stored, decoded) bytes per sample of what training reads: pixels, labels, the tokens (and int8 scales) of
    the trained ``levels`` (None: all), and the cached logits when the decision loss reads them. Stored bytes are
    those fetched: whole chunks, however few of their samples a block wants."""
    from apmpipe.storage.cache import FeatureCache
    from apmpipe.storage.describe import describe

    arrays = describe(FeatureCache.open(cache), sizes=True)["arrays"]
    read = {
        name: sizes
        for name, sizes in arrays.items()
        if name in ("pixels", "labels")
        or (name == "logits" and logits)
        or (name.startswith(("tokens/", "scales/")) and (levels is None or int(name.split("/")[1]) in levels))
    }
    return (
        sum(v.get("read_bytes_per_sample", 0.0) for v in read.values()),
        sum(v.get("raw_bytes_per_sample", 0.0) for v in read.values()),
    )


def _loader_rate(stream: CacheStream, workers: int) -> tuple[float, list[dict]]:
    """Samples/s of ``LOADER_PASSES`` passes over ``stream`` as ``apmpipe train`` loads it (``workers`` DataLoader
    processes, or in-process read-ahead with 0), and the batches of the first pass."""
    from apmpipe.storage.stream import loader_items, window_batches

    start = time.perf_counter()
    passes = [[b for item in loader_items(stream, workers) for b in window_batches(item)] for _ in range(LOADER_PASSES)]
    samples = sum(len(b["labels"]) for b in passes[0])
    return LOADER_PASSES * samples / (time.perf_counter() - start), passes[0]


def online_batch_sizes(batch_size: int, device: torch.device) -> tuple[int, ...]:
    """The batch sizes the online baseline is timed at (its best one counts): the training batch, and on CUDA also
    2x and 4x (a teacher fills a GPU at larger batches than a small student's step needs)."""
    return (batch_size, 2 * batch_size, 4 * batch_size) if device.type == "cuda" else (batch_size,)


def rebatched(batches: list[dict], size: int) -> list[dict]:
    """The pixels of ``batches`` cut into batches of ``size`` (a partial last one dropped: fixed shapes)."""
    pixels = torch.cat([b["pixels"] for b in batches])
    return [{"pixels": pixels[s : s + size]} for s in range(0, len(pixels) - size + 1, size)]


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
    import sys

    from apmpipe.stages.apm import APM, config_for_cache
    from apmpipe.stages.inputs import PixelNormalizer
    from apmpipe.stages.objectives import LossConfig, location_generator, locations_to, sample_level_locations
    from apmpipe.stages.train import (
        TrainConfig,
        compiled_objective,
        fit_target_scales,
        make_optimizer,
        rebuilds_on_device,
        step_losses,
        train,
        train_step,
    )
    from apmpipe.storage.stream import CacheStream, TokenDecoder

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
    window = (
        batch_size  # several windows even in the 1x cache: every loader worker has work, RSS compares like with like
    )
    on_device = rebuilds_on_device(torch.device(device))  # as apmpipe train reads low-rank caches on this device
    stream = CacheStream([cache], batch_size, window_samples=window, coefficients=on_device)
    bench_progress(f"loader: {LOADER_PASSES} passes with {loader_workers} workers")
    loader_sps, batches = _loader_rate(stream, loader_workers)
    samples = sum(len(b["labels"]) for b in batches)
    other_sps = None
    if stream.spec.rank:  # the other placement of the rebuild, side by side
        bench_progress("loader with the low-rank rebuild placed the other way (loader CPU vs training device)")
        other = CacheStream([cache], batch_size, window_samples=window, coefficients=not on_device)
        other_sps, _ = _loader_rate(other, loader_workers)

    train_config = TrainConfig(
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
    teacher = teacher_for(extract_config)
    dev = teacher.device
    normalize = PixelNormalizer(stream.spec.data_config).to(dev)
    objective = compiled_objective() if compile else step_losses

    def student_epoch(epoch: list[dict], targets_of: Callable[[dict], list[torch.Tensor]], count: int) -> float:
        """Trained samples/s over ``epoch`` (``echo`` steps per batch) at ``count`` locations (0: all), after one
        untimed step (CUDA context, cuBLAS handles, kernel selection and compilation stay out of the figure)."""
        model = APM(config_for_cache(stream.spec, preset))
        fit_target_scales(model, stream)
        model = model.to(dev)
        optimizer, scheduler = make_optimizer(model, train_config, len(epoch) * echo, dev)
        cfg = model.config
        amp = dev.type == "cuda"

        def step(images: torch.Tensor, targets: list[torch.Tensor], index: int) -> None:
            where = locations_to(sample_level_locations(cfg, len(images), count, location_generator(0, 0, index)), dev)
            loss = train_config.loss
            train_step(model, model, optimizer, scheduler, images, targets, where, loss, amp, objective=objective)

        warm = epoch[0]
        step(normalize(warm["pixels"].to(dev)), targets_of(warm), 0)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        for index, batch in enumerate(epoch):
            images, targets = normalize(batch["pixels"].to(dev)), targets_of(batch)
            for repeat in range(echo):
                step(images, targets, index * echo + repeat)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return sum(len(b["pixels"]) for b in epoch) * echo / (time.perf_counter() - begin)

    decoder = TokenDecoder(stream.coefficient_bases).to(dev) if stream.coefficient_bases else (lambda tokens: tokens)

    def from_memory(batch: dict) -> list[torch.Tensor]:
        """The batch's teacher tokens on the device (low-rank ones rebuilt there, once per loaded batch)."""
        return [t.float() for t in decoder([t.to(dev) for t in batch["tokens"]])]

    student_sps = {}
    for label, count in (("all", 0), (f"K={locations}", locations)):
        bench_progress(f"student steps from memory, {label} locations")
        student_sps[label] = student_epoch(batches, from_memory, count)
    fused = teacher.use_fast_kernels()
    online_setup = (
        f"{teacher.precision}, fused attention in {fused} blocks"
        + (", channels_last" if dev.type == "cuda" else "")
        + (", compiled student" if compile else "")
    )
    online_sps = {}
    for size in online_batches or online_batch_sizes(batch_size, dev):
        epoch = rebatched(batches, size)
        if not epoch:
            bench_progress(f"online distillation at batch {size}: skipped, more than the {samples} cached samples")
            continue
        bench_progress(f"online distillation at batch {size} (teacher forward every batch; {online_setup})")
        online_sps[size] = student_epoch(
            epoch, lambda b: [t.clone() for t in teacher.forward(b["pixels"])[0]], locations
        )  # clone: leave inference mode
    if not online_sps:
        raise ConfigError(f"--online-batch-sizes are all above the {samples} cached samples; give smaller ones")
    if compile or dev.type == "cuda":
        bench_progress("cached warm-up (apmpipe train, 2 steps: compilation and kernel selection)")
        train(replace(train_config, out=str(workdir / "warm-up"), max_steps=2))
    bench_progress("cached epoch (apmpipe train)")
    cached = train(train_config)
    stored, raw = _read_bytes_per_sample(cache)

    rss = []
    for factor in (1, growth) if growth > 1 else ():
        if factor > 1:
            grow_cache(cache, factor)
        bench_progress(f"peak RSS of a training process on {factor}x the cache")
        command = [
            sys.executable,
            "-m",
            "apmpipe.pipeline",
            "train",
            cache,
            "--out",
            str(workdir / f"rss-{factor}"),
            "--preset",
            preset,
            "--epochs",
            "1",
            "--batch-size",
            str(batch_size),
            "--loader-workers",
            str(loader_workers),
            "--device",
            device,
            "--window-samples",
            str(window),
            "--locations",
            str(locations),
            "--echo",
            str(echo),
        ]
        rss.append((factor * samples, _peak_tree_rss(command)))
    return TrainBench(
        machine=machine_line(dev),
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


def bench_progress(message: str) -> None:
    """One line on stderr while a benchmark measures (stdout keeps the result table)."""
    import sys

    print(f"bench: {message}", file=sys.stderr, flush=True)


ABLATIONS: dict[str, dict[str, object]] = {
    "defaults": {},
    "paper query (--query paper)": {"query": "paper"},
    "no KL through the head (--logit-weight 0)": {"logit_weight": 0.0},
    "no target standardisation (--no-standardize)": {"standardize": False},
    "no extra prefix weight (--prefix-weight 0)": {"prefix_weight": 0.0},
    "no pixel loss (--rgb-weight 0)": {"rgb_weight": 0.0},
    "data echoing (--echo 8: 8x fewer bytes read per step)": {"echo": 8},
    "augment: flip (--augment flip)": {"augment": ("flip",)},
    "augment: crop (--augment crop)": {"augment": ("crop",)},
    "augment: flip and crop (--augment flip,crop)": {"augment": ("flip", "crop")},
    "augment: milder crop (--augment crop --crop-scale 0.5,1)": {"augment": ("crop",), "crop_scale": (0.5, 1.0)},
    "augment: the teacher's own crops (extract --views 4 --view-augment crop --view-crop-scale 0.5,1)": {},
    "old defaults (MSE only, all locations, lr 5e-4, batch 64, rgb 1)": {
        "logit_weight": 0.0,
        "standardize": False,
        "prefix_weight": 0.0,
        "rgb_weight": 1.0,
        "locations": 0,
        "lr": 5e-4,
        "batch_size": 64,
    },
}


_CROP_VIEWS = {"views": 4, "view_augment": ("crop",), "view_crop_scale": (0.5, 1.0)}
ABLATION_STORAGE = {  # rows that train on the train split extracted another way (ExtractConfig options)
    "augment: the teacher's own crops (extract --views 4 --view-augment crop --view-crop-scale 0.5,1)": _CROP_VIEWS
}


@dataclass
class AblationRow:
    name: str
    options: dict[str, object]
    fidelity: dict[str, dict[str, float]]
    head: dict[str, object]
    seconds: float


def _train_and_evaluate(
    name: str, cache: str, val: str, out: Path, steps: int, seed: int, options: dict[str, object]
) -> AblationRow:
    """Train ``steps`` steps on ``cache`` with ``options`` (fresh run in ``out``), evaluate on ``val``."""
    from apmpipe.stages.evaluate import EvalConfig, evaluate
    from apmpipe.stages.train import CPU_BATCH_SIZE, TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    defaults = {"caches": (cache,), "out": str(out), "min_steps": steps, "loader_workers": 1, "seed": seed}
    # the batch the defaults were chosen at, on any device (CUDA's default would give a digits cache 1 step an epoch)
    config = TrainConfig.from_options({**defaults, "batch_size": CPU_BATCH_SIZE, **options})
    start = time.perf_counter()
    train(config)
    seconds = time.perf_counter() - start
    report = evaluate(EvalConfig(cache=val, student=str(out), seed=seed))
    return AblationRow(name, options, report["fidelity"], report["classification"].get("teacher_head", {}), seconds)


def _selected(names: list[str], only: list[str] | None) -> list[str]:
    return [name for name in names if not only or any(word in name for word in only)]


def bench_ablation(
    workdir: Path, steps: int, seed: int = 0, only: list[str] | None = None
) -> tuple[dict[str, object], list[AblationRow]]:
    """Each objective switched off in turn on the demo's trained teacher: held-out R^2 and teacher-head top-1.

    Every run trains ``steps`` steps (``--min-steps``) from the same seed on the same cache; returns the teacher
    record and one row per run.
    """
    from .demo import DemoPlan, prepare_digit_caches

    data = prepare_digit_caches(workdir, DemoPlan.of(False, seed), seed)
    rows = []
    for name in _selected(list(ABLATIONS), only):
        out = workdir / "runs" / f"ablation-{len(rows)}"
        cache = data.train_variant(**ABLATION_STORAGE[name]) if name in ABLATION_STORAGE else data.train
        rows.append(_train_and_evaluate(name, cache, data.val, out, steps, seed, ABLATIONS[name]))
    return data.teacher, rows


@dataclass
class CodecRow:
    """One array of a cache under one ``--codec``: bytes per sample and rates (raw MB/s)."""

    array: str  # "pixels", "labels", "logits", "tokens/<layer>" (as stored), "scales/<layer>"
    codec: str
    stored_bytes_per_sample: float
    raw_bytes_per_sample: float
    encode_mb_s: float
    decode_mb_s: float

    @property
    def ratio(self) -> float:
        return self.raw_bytes_per_sample / self.stored_bytes_per_sample


@dataclass
class CodecBench:
    url: str
    machine: str
    samples: int
    default: str
    rows: list[CodecRow]

    def totals(self) -> dict[str, tuple[float, float]]:
        """Per codec, over every measured array: stored bytes per sample and samples/s decoding them all."""
        out = {}
        for codec in dict.fromkeys(row.codec for row in self.rows):
            rows = [row for row in self.rows if row.codec == codec]
            seconds = sum(row.raw_bytes_per_sample / (row.decode_mb_s * 1e6) for row in rows)
            out[codec] = (sum(row.stored_bytes_per_sample for row in rows), 1 / seconds)
        return out


CODEC_READS = 3  # decode time: best of this many passes over the blocks


def bench_codecs(url: str, samples: int, storage_options: dict | None = None) -> CodecBench:
    """Every ``--codec`` on the arrays a training step reads, from the first complete shard group of a cache (its
    first ``samples``, in whole blocks): each written to a local scratch folder exactly as extract writes it and
    read back one block at a time as a loader thread reads it, side by side."""
    from apmpipe.storage.cache import FeatureCache
    from apmpipe.storage.codec_trial import CodecTrial, trial_arrays, trial_samples
    from apmpipe.storage.format import CODECS, DEFAULT_CODEC

    cache = FeatureCache.open(url, storage_options=storage_options)
    shard, count = trial_samples(cache, samples)
    rows = []
    with scratch_dir() as tmp:
        for name in trial_arrays(cache):
            for codec in CODECS:
                trial = CodecTrial.of(Path(tmp), cache, shard, name, count, codec)
                encode = timed(trial.write)
                decode = min(timed(trial.read_blocks) for _ in range(CODEC_READS))
                raw = trial.data.nbytes
                rows.append(
                    CodecRow(
                        name, codec, trial.stored_bytes() / count, raw / count, raw / encode / 1e6, raw / decode / 1e6
                    )
                )
    return CodecBench(redact_url(url), machine_line(torch.device("cpu")), count, DEFAULT_CODEC, rows)


@dataclass(frozen=True)
class BytePlan:
    """How one run reads less: the train cache's storage (ExtractConfig ``dtype``, ``rank``), ``--echo``,
    ``--levels``."""

    storage: dict[str, object] = field(default_factory=dict)
    echo: int = 1
    levels: tuple[int, ...] | None = None
    train: dict[str, object] = field(default_factory=dict)  # other train options (--augment)

    def options(self) -> dict[str, object]:
        return {"echo": self.echo} | ({"levels": self.levels} if self.levels else {}) | self.train


# the first plan is the baseline every row is compared to
BYTE_PLANS: dict[str, BytePlan] = {
    "float16 cache, all levels (default)": BytePlan(),
    "float16, --codec zstd (the earlier default)": BytePlan({"codec": "zstd"}),
    "int8 cache": BytePlan({"dtype": "int8"}),
    "float16, --echo 8": BytePlan(echo=8),
    "int8, --echo 8": BytePlan({"dtype": "int8"}, echo=8),
    "int8, --echo 16": BytePlan({"dtype": "int8"}, echo=16),
    "int8 rank 32, --echo 8": BytePlan({"dtype": "int8", "rank": 32}, echo=8),
    "int8, --levels 4, --echo 4": BytePlan({"dtype": "int8"}, echo=4, levels=(4,)),  # the demo teacher's last
    "int8, --augment crop --crop-scale 0.5,1 (resampled targets)": BytePlan(
        {"dtype": "int8"}, train={"augment": ("crop",), "crop_scale": (0.5, 1.0)}
    ),
    "int8, --views 4 --view-augment crop --view-crop-scale 0.5,1 (the teacher's own views)": BytePlan(
        {"dtype": "int8", **_CROP_VIEWS}
    ),
    "int8 rank 32, --views 4 --view-augment crop --view-crop-scale 0.5,1": BytePlan(
        {"dtype": "int8", "rank": 32, **_CROP_VIEWS}
    ),
}
BYTES_TARGET = 1 / 8  # of the default's bytes read per trained sample
COSINE_TOLERANCE = 0.005  # patch cosine, every trained level, vs the default
TOP1_TOLERANCE = 0.005  # teacher-head top-1 vs the default


@dataclass
class BytesRow:
    run: AblationRow
    bytes_per_trained_sample: float

    def patch_cosines(self) -> dict[str, float]:
        return {layer: f["patch_cosine"] for layer, f in self.run.fidelity.items()}

    def top1(self) -> float:
        return float(self.run.head.get("student", {}).get("top1", float("nan")))

    def meets_bar(self, baseline: BytesRow) -> bool:
        """At most 1/8 of the baseline's bytes, patch cosine within 0.005 on every level it trains, top-1 +-0.5 pt."""
        base = baseline.patch_cosines()
        return (
            self.bytes_per_trained_sample <= BYTES_TARGET * baseline.bytes_per_trained_sample
            and all(abs(cos - base[layer]) <= COSINE_TOLERANCE for layer, cos in self.patch_cosines().items())
            and abs(self.top1() - baseline.top1()) <= TOP1_TOLERANCE
        )


def bench_bytes(
    workdir: Path, steps: int, seed: int = 0, only: list[str] | None = None
) -> tuple[dict[str, object], list[BytesRow]]:
    """Bytes read per trained sample against held-out fidelity, on the demo's trained teacher.

    Each plan stores the train split its way (float16, int8, low rank) and trains ``steps`` steps from the same seed
    (echo and ``--levels`` as given); each student is evaluated on the same float16 val cache. The baseline (first
    plan) always runs.
    """
    from .demo import DemoPlan, prepare_digit_caches

    data = prepare_digit_caches(workdir, DemoPlan.of(False, seed), seed)
    names = list(BYTE_PLANS)
    rows = []
    for index, name in enumerate([names[0], *_selected(names[1:], only)]):
        plan = BYTE_PLANS[name]
        cache = data.train_variant(**plan.storage) if plan.storage else data.train
        bench_progress(f"{name}: training {steps} steps")
        out = workdir / "runs" / f"bytes-{index}"
        run = _train_and_evaluate(name, cache, data.val, out, steps, seed, plan.options())
        stored, _ = _read_bytes_per_sample(cache, plan.levels, logits=True)
        rows.append(BytesRow(run, stored / plan.echo))
    _write_bytes_record(workdir / "bench-bytes.json", data.teacher, steps, rows)
    return data.teacher, rows


def _write_bytes_record(path: Path, teacher: dict[str, object], steps: int, rows: list[BytesRow]) -> None:
    """What ``bench bytes`` measured, as JSON beside its runs (for tables and regression checks)."""

    base = rows[0]
    record = {
        "teacher": teacher,
        "steps": steps,
        "rows": [
            {
                "name": row.run.name,
                "options": {k: list(v) if isinstance(v, tuple) else v for k, v in row.run.options.items()},
                "bytes_per_trained_sample": row.bytes_per_trained_sample,
                "bytes_ratio": row.bytes_per_trained_sample / base.bytes_per_trained_sample,
                "patch_cosine": row.patch_cosines(),
                "head_top1": row.top1(),
                "meets_bar": row is not base and row.meets_bar(base),
                "fidelity": row.run.fidelity,
                "seconds": row.run.seconds,
            }
            for row in rows
        ],
    }
    from .report import report_json

    path.write_text(report_json(record))


@dataclass
class AugmentRow:
    """How well ``--augment``'s resampled targets stand for the teacher's tokens on the really augmented images.

    ``cosine[layer][part]``: mean cosine of target and real tokens (``part``: ``patch`` or ``prefix``);
    ``baseline[layer][part]``: the same for the un-augmented cached tokens. ``top1``: the teacher's own top-1 on the
    ``augmented`` and ``original`` images; ``agreement``: how often the argmax of a KL target (``head``: the stored
    head on the augmented tokens; ``cached``: the cached logits) is the teacher's on the augmented image.
    """

    augment: str
    cosine: dict[int, dict[str, float]]
    baseline: dict[int, dict[str, float]]
    top1: dict[str, float]
    agreement: dict[str, float]


def _token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[B, T, D]`` x 2 -> per-sample mean cosine ``[B]``."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean(1)


def bench_augment(
    workdir: Path, seed: int = 0, crop_scale: tuple[float, float] = (0.08, 1.0), cache: str | None = None
) -> tuple[str, list[AugmentRow]]:
    """:func:`augment_fidelity` on ``cache`` or else on the demo's trained teacher and its held-out (val) cache;
    returns a line naming the teacher, and the rows."""
    from .demo import DemoPlan, prepare_digit_caches

    if cache:
        made = f"the teacher that made {redact_url(cache)} (rebuilt from the cache)"
        return made, augment_fidelity(cache, seed, crop_scale)
    data = prepare_digit_caches(workdir, DemoPlan.of(False, seed), seed)
    teacher = f"{data.teacher['folder']}: val top-1 {data.teacher['val_top1']:.3f} ({data.teacher['data']})"
    return teacher, augment_fidelity(data.val, seed, crop_scale)


def augment_fidelity(url: str, seed: int = 0, crop_scale: tuple[float, float] = (0.08, 1.0)) -> list[AugmentRow]:
    """The targets ``--augment`` builds from a cache's tokens (every sample flipped; every sample cropped with
    ``crop_scale``) beside the cache's teacher (rebuilt) run on the augmented pixels, per level, patch and prefix
    tokens apart; baseline: the un-augmented cached tokens. The cache needs a stored head."""
    from collections import defaultdict

    from apmpipe.stages.augment import Views, augment_generator, crop_boxes
    from apmpipe.stages.head import TeacherHead
    from apmpipe.stages.verify import rebuild_teacher
    from apmpipe.storage.cache import FeatureCache
    from apmpipe.storage.errors import CacheError
    from apmpipe.storage.stream import iter_cache

    cache = FeatureCache.open(url)
    spec, layout = cache.spec, cache.spec.levels[-1]
    layers = tuple(level.layer for level in spec.levels)
    stored = cache.head()
    if stored is None:
        raise CacheError(
            f"cache {redact_url(url)!r} stores no teacher head; bench augment needs a teacher with a classifier"
        )
    teacher, head, prefix = rebuild_teacher(cache, device="cpu"), TeacherHead(*stored), layout.prefix_tokens
    parts = {"patch": slice(prefix, None)} | ({"prefix": slice(0, prefix)} if prefix else {})
    values: dict[str, dict[str, list[torch.Tensor]]] = {"flip": defaultdict(list), "crop": defaultdict(list)}
    bench_progress("the teacher on every held-out image flipped, and cropped")
    with torch.inference_mode():
        for index, (_, _, batch) in enumerate(iter_cache(cache, 64)):
            pixels, labels = torch.from_numpy(batch.pixels).float(), torch.from_numpy(batch.labels)
            cached = [torch.from_numpy(t) for t in batch.tokens]
            size, count = (pixels.shape[-2], pixels.shape[-1]), len(pixels)
            boxes = crop_boxes(count, size, layout.grid, crop_scale, augment_generator(seed, 0, index))
            views = {
                "flip": Views(torch.ones(count, dtype=torch.bool), None, size),
                "crop": Views(None, boxes, size),
            }
            original = teacher.forward(pixels)[1].argmax(1)
            for name, view in views.items():
                real, logits = teacher.forward(view.images(pixels))
                targets = [view.tokens(t, lv.grid, lv.prefix_tokens) for t, lv in zip(cached, spec.levels, strict=True)]
                out = values[name]
                for layer, target, unaugmented, truth in zip(layers, targets, cached, real, strict=True):
                    for part, cut in parts.items():
                        out[f"{layer}/{part}/target"].append(_token_cosine(target[:, cut], truth[:, cut]))
                        out[f"{layer}/{part}/baseline"].append(_token_cosine(unaugmented[:, cut], truth[:, cut]))
                decided = logits.argmax(1)
                out["top1/augmented"].append((decided == labels).float())
                out["top1/original"].append((original == labels).float())
                out["agree/head"].append((head(targets[-1]).argmax(1) == decided).float())
                out["agree/cached"].append((torch.from_numpy(batch.logits).argmax(1) == decided).float())
    rows = []
    for name, out in values.items():
        mean = {key: float(torch.cat(v).mean()) for key, v in out.items()}
        cosine, baseline = (
            {layer: {part: mean[f"{layer}/{part}/{kind}"] for part in parts} for layer in layers}
            for kind in ("target", "baseline")
        )
        top1, agreement = (
            {k.split("/")[1]: v for k, v in mean.items() if k.startswith(kind)} for kind in ("top1/", "agree/")
        )
        rows.append(AugmentRow(name, cosine, baseline, top1, agreement))
    return rows
