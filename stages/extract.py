"""Stage one: run the frozen teacher once over input shards and write the feature cache.

``extract(config)`` resolves the inputs, builds the teacher, creates (or checks and reopens) the cache and
runs every incomplete shard through :func:`extract_shards`: DataLoader workers decode and preprocess whole
shards, the main thread runs the teacher, and one background thread encodes, compresses and writes, so
writing never stalls the forward. With ``--rank`` the driver first fits one token basis per level and stores it
in the cache, before any shard, so every shard of the cache (any worker, any later run) uses the same one.
:func:`extract_shards` is also the unit a dask worker runs for one shard:
it is idempotent (an incomplete shard group is rewritten whole) and its output does not depend on where it
ran, because batches never cross shard boundaries.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from apmpipe.storage.batches import ShardBatches, batch_loader
from apmpipe.storage.cache import FeatureCache, stored_spec
from apmpipe.storage.describe import level_fidelity
from apmpipe.storage.errors import CacheError, InputError, ModelError, failure_line
from apmpipe.storage.format import DEFAULT_CODEC, STATUS_COMPLETE, CacheSpec
from apmpipe.storage.locks import writer_lock
from apmpipe.storage.lowrank import BasisFit, TokenBasis
from apmpipe.storage.pixel_codecs import LOSSY_CODECS, decode_pixels, encode_pixels, psnr
from apmpipe.storage.redact import redact_url
from apmpipe.storage.sources import ResolvedInputs, ShardSource, count_images, done_shards
from apmpipe.storage.token_codecs import EncodedTokens, decode_tokens, encode_tokens
from apmpipe.storage.writer import ShardWriter, create_or_open, record_sources

from .augment import Views, key_views, view_parameters, view_pixels
from .extract_config import (
    AUTO_RENDERS,
    ExtractConfig,
    auto_views,
    few_images_note,
    preflight,
)  # ExtractConfig is public here too (cluster, bench, demo import it)
from .runtime import loader_workers
from .shard_results import Progress, ShardResult, ShardTotals
from .teacher import AUTOCAST, Teacher, TeacherPool
from .token_metrics import min_token_cosine

MAX_PENDING_WRITES = 4
FIDELITY_EVERY = 4
BASIS_SAMPLES = 256  # images whose tokens fit the --rank bases ...
BASIS_INPUTS = 8  # ... taken from the first images of up to this many inputs spread over the input list


@dataclass
class ExtractResult(ShardResult):
    """What happened to one input shard, with the fidelity its lossy storage cost."""

    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)
    pixel_fidelity: dict[str, float] = field(default_factory=dict)  # psnr_db, for lossy --pixel-codec


@dataclass
class ExtractSummary(ShardTotals):
    """Totals of one run, for the CLI's summary table."""

    cache: str
    results: list[ExtractResult]
    seconds: float
    stored_bytes: int
    cache_samples: int
    head: str
    views: int = 1
    views_auto: bool = False  # views chosen by --views auto

    @property
    def few_images(self) -> str:
        """When every input shard is in the cache and it holds too few images and views to train a student on
        (:func:`few_images_note`): what follows, in one clause; empty otherwise."""
        if self.count("failed") or not self.cache_samples:
            return ""
        return few_images_note(self.cache_samples // self.views, self.views)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    @property
    def fidelity(self) -> dict[str, dict[str, float]]:
        """Worst-case cosine and sample-weighted relative MSE per level over the shards written in this run (as
        ``apmpipe info`` combines shards)."""
        return level_fidelity((r.images, r.fidelity) for r in self.results if r.status == "done")

    @property
    def nothing_stored(self) -> str:
        """Why a run that had inputs to extract stored no sample, in one line; empty when it stored some or every
        input was complete already."""
        worked = [r for r in self.results if r.status != "skipped"]
        if not worked or self.images:
            return ""
        skipped, failed = len(self.skipped_samples), self.count("failed")
        if skipped:
            shard, key, reason = self.skipped_samples[0]
            why = f"all {skipped} samples were skipped (first, {shard}/{key}: {reason})"
        elif failed:
            why = f"{failed} shard(s) failed (see above)"
        else:
            why = f"the {len(worked)} input(s) hold no samples"
        return f"extract stored no sample: {why}; fix that and rerun apmpipe extract"

    @property
    def pixel_psnr(self) -> float | None:
        """Worst PSNR (dB) of lossy pixel storage over the shards written in this run; None when lossless."""
        found = [r.pixel_fidelity["psnr_db"] for r in self.results if "psnr_db" in r.pixel_fidelity]
        return min(found) if found else None


class _Silent:
    def images(self, count: int) -> None:
        pass

    def shard(self, result: ExtractResult) -> None:
        pass


def _nothing_kept(skipped: Sequence[tuple[str, str]]) -> str:
    """Why a shard whose every sample was skipped is not complete (a rerun with the fix then extracts it, where a
    complete empty group would be passed over as done)."""
    return f"stored nothing: all {len(skipped)} samples were skipped (see their reasons); fix that and rerun"


class _ShardJob:
    """Encodes and writes one shard's batches; runs on the background writer thread only.

    Any failure of this shard's storage (opening its group, appending, finishing, recording the failure) fails
    this shard alone; the run goes on with the others and a rerun rewrites the group.
    """

    def __init__(self, cache: FeatureCache, source: ShardSource, precision: str) -> None:
        self.spec = cache.spec
        self.layers = [str(level.layer) for level in cache.spec.levels]
        self.urls = (cache.url, source.url)
        self.result = ExtractResult(name=source.name, status="done")
        self._stats: dict[str, list[float]] = {}
        self._pixel_error = [0.0, 0]  # summed squared error, values compared
        self._batches = 0
        try:
            self.writer = ShardWriter(cache, source.name, source.url, source.fingerprint, precision)
        except Exception as exc:  # e.g. the store refuses the group: this shard fails, the others go on
            self.writer = None
            self.result.error = failure_line(exc, self.urls)

    def _measure(
        self, tokens: list[np.ndarray], encoded: list[EncodedTokens], pixels: np.ndarray, stored: np.ndarray
    ) -> None:
        """Fidelity of lossy storage (tokens: int8, float16, --rank; pixels: JPEG) on every ``FIDELITY_EVERY``-th
        batch, the first included (the check costs CPU beside the teacher); with ``--rank`` on every batch, since
        a low-rank basis fits some images much worse than others and the recorded minimum must see them all."""
        self._batches += 1
        if not self.spec.rank and (self._batches - 1) % FIDELITY_EVERY:
            return
        if self.spec.dtype != "float32" or self.spec.rank:
            for layer, ref, enc, basis in zip(self.layers, tokens, encoded, self.writer.bases, strict=True):
                approx = decode_tokens(enc.values, enc.scale, basis=basis)
                stats = self._stats.setdefault(layer, [1.0, 0.0, 0.0])
                stats[0] = min(stats[0], min_token_cosine(ref, approx))
                stats[1] += float(((ref - approx) ** 2).sum())
                stats[2] += float((ref**2).sum())
        if self.spec.pixel_codec in LOSSY_CODECS:
            error = decode_pixels(stored, self.spec.pixel_codec, self.spec.pixel_shape).astype(np.float64) - pixels
            self._pixel_error[0] += float(np.square(error).sum())
            self._pixel_error[1] += error.size

    def append(
        self,
        pixels: np.ndarray,
        labels: np.ndarray,
        keys: list[str],
        tokens: list[np.ndarray],
        logits: np.ndarray | None,
        skipped: list,
        views: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        """Encode and write one batch: ``views`` V > 1 samples per image (see :func:`_views_of`)."""
        self.result.skipped_samples += [tuple(s) for s in skipped]
        if self.result.error or not len(labels):
            return
        try:
            bases = self.writer.bases
            encoded = [encode_tokens(t, self.spec.dtype, basis) for t, basis in zip(tokens, bases, strict=True)]
            stored = encode_pixels(pixels, self.spec.pixel_codec)
            self._measure(tokens, encoded, pixels, stored)
            self.writer.append(stored, labels, keys, encoded, logits, views)
        except (
            Exception
        ) as exc:  # bad tokens or a failed write (full disk, lost connection) fail this shard; a rerun rewrites it
            self.result.error = failure_line(exc, self.urls)
            return
        self.result.images += len(labels) // self.spec.views

    def fail(self, reason: str, skipped: list) -> None:
        self.result.skipped_samples += [tuple(s) for s in skipped]
        self.result.error = self.result.error or reason

    def close(self) -> ExtractResult:
        if not self.result.error and not self.result.images and self.result.skipped_samples:
            self.result.error = _nothing_kept(self.result.skipped_samples)
        if not self.result.error:
            self.result.fidelity = {
                layer: {"cosine_min": s[0], "relative_mse": s[1] / s[2] if s[2] else 0.0}
                for layer, s in self._stats.items()
            }
            stats: dict[str, Any] = {"fidelity": self.result.fidelity}
            if self._pixel_error[1]:
                stats["pixel_fidelity"] = self.result.pixel_fidelity = {"psnr_db": psnr(*self._pixel_error)}
            try:
                self.writer.finish(self.result.skipped_samples, stats)
                return self.result
            except Exception as exc:  # the final write or the status attribute failed
                self.result.error = failure_line(exc, self.urls)
        self.result.status, self.result.images = "failed", 0
        if self.writer is not None:
            with contextlib.suppress(
                Exception
            ):  # the store may be failing still; an unmarked group is rewritten all the same
                self.writer.fail(self.result.error, self.result.skipped_samples)
        return self.result


def _views_of(
    spec: CacheSpec, pixels: torch.Tensor, keys: list[str]
) -> tuple[torch.Tensor, tuple[np.ndarray, np.ndarray] | None]:
    """With ``spec.views`` V > 1: uint8 images ``[B, C, H, W]`` -> ``[B * V, C, H, W]``, each image's V views in
    turn (view 0 the image itself, view v drawn from its key, see :func:`key_views`), with their view numbers
    ``[B * V]`` and parameters ``[B * V, 5]`` (see :func:`view_parameters`); V = 1: the images as they are."""
    if spec.views == 1 or not len(pixels):
        return pixels, None
    size = spec.pixel_shape[1:]
    grid = min((level.grid for level in spec.levels), key=lambda g: g[0] * g[1])  # a crop spans its coarsest cells
    drawn = [Views(None, None, size)]
    drawn += [key_views(spec.view_augment, keys, v, size, grid, spec.view_crop_scale) for v in range(1, spec.views)]
    images = torch.stack([view_pixels(pixels, views) for views in drawn], dim=1).flatten(0, 1)
    parameters = torch.stack([view_parameters(views, len(pixels)) for views in drawn], dim=1).flatten(0, 1)
    return images, (np.tile(np.arange(spec.views), len(pixels)), parameters.numpy())


def teacher_for(config: ExtractConfig, teachers: TeacherPool | None = None) -> Teacher:
    """The run's teacher, from ``teachers`` (built there once per configuration), else built now. With
    ``config.precision`` (decided by a driver) it autocasts only when that precision asks for it."""
    amp = config.amp if config.precision is None else config.precision == AUTOCAST
    return (teachers or TeacherPool()).get(config.teacher, tuple(config.layers), config.final_norm, config.device, amp)


def _shard_batches(config: ExtractConfig, teacher: Teacher, shards: Sequence[ShardSource]) -> ShardBatches:
    """Batches of ``shards`` decoded to the teacher's input as ``config`` asks (labels, limits, storage options)."""
    return ShardBatches.of(config, shards, teacher.pixel_transform(), teacher.pixel_shape)


def _loader(config: ExtractConfig, teacher: Teacher, shards: Sequence[ShardSource]) -> DataLoader:
    workers = loader_workers(config.loader_workers, teacher.device.type)
    return batch_loader(_shard_batches(config, teacher, shards), workers, teacher.device.type == "cuda")


def _check_precision(cache: FeatureCache, teacher: Teacher, decided: str | None) -> None:
    """Refuse to add shards computed in another precision than the run's (``decided`` by its driver) or the
    cache's complete ones (CPU float32 vs CUDA bfloat16 autocast): readers would mix numerics silently."""
    existing = cache.precision()
    if decided and decided != teacher.precision:
        raise CacheError(
            f"this worker computes in {teacher.precision} (device {teacher.device.type}), the extraction into "
            f"{redact_url(cache.url)!r} in {decided}; give every worker a GPU or extract with --no-amp"
        )
    if existing and existing != teacher.precision:
        raise CacheError(
            f"cache {redact_url(cache.url)!r} holds shards computed in {existing}, this run computes in "
            f"{teacher.precision} "
            f"(--device {teacher.device.type}, --amp {teacher.amp}); extract with the same --device/--amp "
            "or into another --out"
        )


def extract_shards(
    config: ExtractConfig,
    shards: Sequence[ShardSource],
    progress: Progress | None = None,
    teachers: TeacherPool | None = None,
) -> list[ExtractResult]:
    """Extract ``shards`` into the (existing) cache at ``config.out``: the unit of work, local or on a dask worker.

    ``teachers``: where the teacher is kept between calls (a run's, a dask worker's); None builds one for this call.
    """
    progress = progress or _Silent()
    teacher = teacher_for(config, teachers)
    cache = FeatureCache.open(config.out, mode="r+", storage_options=config.storage_options)
    if cache.spec.teacher["weights_sha256"] != teacher.weights_sha256:
        raise ModelError(
            f"teacher weights on this worker differ from cache {redact_url(config.out)!r}; give every "
            "worker the same --checkpoint / pretrained weights"
        )
    _check_precision(cache, teacher, config.precision)
    sources = {s.name: s for s in shards}
    jobs: dict[str, _ShardJob] = {}
    finished: list[Future] = []
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="apmpipe-writer") as writer:

        def submit(fn: Callable, *args: Any) -> Future:
            pending.append(writer.submit(fn, *args))
            while len(pending) > MAX_PENDING_WRITES:
                pending.pop(0).result()
            return pending[-1]

        for record in _loader(config, teacher, shards):
            name = record["shard"]
            if name not in jobs:
                jobs[name] = writer.submit(_ShardJob, cache, sources[name], teacher.precision).result()
            job = jobs[name]
            if record["error"]:
                submit(job.fail, record["error"], record["skipped"])
            else:
                pixels, views = _views_of(cache.spec, record["pixels"], record["keys"])
                tokens, logits = teacher.forward(pixels) if len(pixels) else ([], None)
                submit(
                    job.append,
                    pixels.numpy(),
                    np.repeat(record["labels"].numpy(), cache.spec.views),
                    [key for key in record["keys"] for _ in range(cache.spec.views)],
                    [t.cpu().numpy() for t in tokens],
                    None if logits is None else logits.cpu().numpy(),
                    record["skipped"],
                    views,
                )
                progress.images(len(record["pixels"]))
            if record["last"]:
                future = submit(job.close)
                future.add_done_callback(lambda f: progress.shard(f.result()) if not f.exception() else None)
                finished.append(future)
        for future in pending:
            future.result()
    return [future.result() for future in finished]


def _write_teacher_head(cache: FeatureCache, teacher: Teacher) -> str:
    """Store the rebuilt classifier once; return a one-line description for the summary."""
    head, reason = teacher.head()
    if head is None:
        cache.update_attrs(head={"available": False, "reason": reason})
        return f"not stored: {reason}"
    if cache.head() is None:
        cache.write_head(head.tensors(), head.attrs)
    cache.update_attrs(
        head={
            "available": True,
            "pool": head.pool,
            "num_classes": teacher.num_classes,
            "ops": [op["type"] for op in head.ops],
        }
    )
    return f"stored ({head.pool} pooling, {teacher.num_classes} classes)"


def _decided(
    config: ExtractConfig, inputs: ResolvedInputs, stored: CacheSpec | None, on_count: Callable[[], None]
) -> ExtractConfig:
    """``config`` with what it leaves open decided: a rerun without --codec or --views keeps the cache's (and its
    views' augmentations); a new cache gets DEFAULT_CODEC and, with --views auto, :func:`auto_views` of the
    images its inputs hold (counted up to AUTO_RENDERS, after ``on_count`` when tar shards are read for it)."""
    if stored is not None:
        config = replace(config, codec=config.codec or stored.codec)
        if config.views is None:
            config = replace(config, view_augment=stored.view_augment, view_crop_scale=stored.view_crop_scale)
            config = config.with_views(stored.views)
        return config
    config = replace(config, codec=config.codec or DEFAULT_CODEC)
    if config.views is None:
        if not inputs.all_folder_blocks:
            on_count()
        images = count_images(inputs.shards, AUTO_RENDERS, config.storage_options)
        config = config.with_views(auto_views(images))
    return config


def cache_spec(config: ExtractConfig, teacher: Teacher) -> CacheSpec:
    return CacheSpec(
        teacher=teacher.identity(),
        data_config=teacher.data_config,
        levels=teacher.levels,
        final_norm=config.final_norm,
        num_classes=teacher.num_classes,
        dtype=config.dtype,
        codec=config.codec,
        chunk_samples=config.chunk_samples,
        shard_samples=config.shard_samples,
        rank=config.rank,
        pixel_codec=config.pixel_codec,
        **(
            {"views": config.views, "view_augment": config.view_augment, "view_crop_scale": config.view_crop_scale}
            if config.views > 1
            else {}
        ),  # one view: the spec of a cache made before --views
    )


def basis_inputs(shards: Sequence[ShardSource]) -> list[tuple[ShardSource, int]]:
    """The inputs the ``--rank`` bases are fitted on, each with how many of its first images to take:
    ``m = min(BASIS_INPUTS, n)`` of the ``n`` inputs spread evenly over the list (input ``i·n // m`` for ``i < m``),
    ``BASIS_SAMPLES`` images split between them as evenly as can be (the first ``BASIS_SAMPLES % m`` take one more).
    """
    count = min(BASIS_INPUTS, len(shards))
    share, extra = divmod(BASIS_SAMPLES, count)
    return [(shards[i * len(shards) // count], share + (i < extra)) for i in range(count)]


def _fit_bases(
    config: ExtractConfig, teacher: Teacher, shards: Sequence[ShardSource]
) -> tuple[list[TokenBasis], dict[str, Any]]:
    """One PCA basis per level (``--rank`` components) of the teacher's tokens of the first images of the inputs
    :func:`basis_inputs` names: a function of the input list alone (deterministic), cheap to read (the start of a
    few tars or folder blocks, no full pass), and less biased than one input's images when inputs are sorted by
    class. An input holding fewer images than its share gives what it holds."""
    plan = basis_inputs(shards)
    chosen = [shard for shard, _ in plan]
    fits = [BasisFit(level.dim) for level in teacher.levels]
    used = 0
    for shard, wanted in plan:
        taken = 0
        for record in _shard_batches(config, teacher, [shard]):
            pixels = record["pixels"][: wanted - taken]
            if len(pixels):
                for fit, tokens in zip(fits, teacher.forward(pixels)[0], strict=True):
                    fit.add(tokens.float().cpu().numpy())
                taken += len(pixels)
            if taken >= wanted:
                break
        used += taken
    if not used:
        raise InputError(
            f"no image of {', '.join(redact_url(s.url) for s in chosen)} could be read to fit the --rank "
            "bases; check these inputs"
        )
    bases, explained = zip(*(fit.basis(config.rank) for fit in fits), strict=True)
    attrs = {
        "samples": used,
        "inputs": [s.name for s in chosen],
        "explained_variance": {str(lv.layer): e for lv, e in zip(teacher.levels, explained, strict=True)},
    }
    return list(bases), attrs


def _ensure_bases(cache: FeatureCache, config: ExtractConfig, teacher: Teacher, shards: Sequence[ShardSource]) -> None:
    """With ``--rank``: fit and store the cache's bases once, before its first shard is written; every later run,
    resumed run and dask worker reads these same bases from the cache."""
    if not cache.spec.rank or cache.has_bases():
        return
    if cache.complete_shards():
        raise CacheError(
            f"cache {redact_url(cache.url)!r} holds complete shards but no bases for its "
            f"rank-{cache.spec.rank} tokens; it is damaged: re-extract into a new --out"
        )
    cache.write_bases(*_fit_bases(config, teacher, shards))


def _complete_shards(cache: FeatureCache, shards: Sequence[ShardSource]) -> set[str]:
    """Names of the inputs already complete in the cache (see :func:`done_shards`)."""
    made_from = {
        name: attrs.get("fingerprint", "")
        for name, attrs in cache.shard_attrs().items()
        if attrs.get("status") == STATUS_COMPLETE
    }
    return done_shards(shards, made_from, f"cache {redact_url(cache.url)!r}")


ShardRunner = Callable[[ExtractConfig, list[ShardSource], Progress], list[ExtractResult]]


def extract(
    config: ExtractConfig,
    progress: Progress | None = None,
    runner: ShardRunner | None = None,
    on_plan: Callable[[int, int], None] | None = None,
    on_count: Callable[[], None] | None = None,
    driver_device: str | None = None,
    inputs: ResolvedInputs | None = None,
    teachers: TeacherPool | None = None,
) -> ExtractSummary:
    """Run stage one. ``runner`` executes the incomplete shards (default: in this process).

    ``on_count``: called before ``--views auto`` reads tar shards to count their images (for a new cache).
    ``driver_device``: where this process builds its own teacher (cache spec, head check); None shares
    ``config.device`` and the teacher with an in-process runner, ``"cpu"`` suits a driver of remote workers.
    ``inputs``: what :func:`preflight` returned for ``config``, when the caller checked it already.
    ``teachers``: the pool the run's teachers come from (a caller may share one with its own runner).
    """
    progress = progress or _Silent()
    start = time.perf_counter()
    inputs = inputs or preflight(config)
    teachers = teachers or TeacherPool()
    teacher = teacher_for(config if driver_device is None else replace(config, device=driver_device), teachers)
    with writer_lock(config.out, storage_options=config.storage_options):
        stored = stored_spec(config.out, config.storage_options)
        views_auto = config.views is None and stored is None  # counted now, not kept from the cache
        config = _decided(config, inputs, stored, on_count or (lambda: None))
        cache = create_or_open(config.out, cache_spec(config, teacher), storage_options=config.storage_options)
        record_sources(cache, [s.url for s in inputs.shards], inputs.classes or config.class_names)
        _ensure_bases(cache, config, teacher, inputs.shards)
        cache.update_attrs(teacher_build=config.teacher.to_dict(), extract_config=config.to_dict())
        head = _write_teacher_head(cache, teacher)
        done = _complete_shards(cache, inputs.shards)
        todo = [s for s in inputs.shards if s.name not in done]
        results = [ExtractResult(name=s.name, status="skipped") for s in inputs.shards if s.name in done]
        if on_plan:
            on_plan(len(inputs.shards), len(todo))
        if todo:
            results += (runner or functools.partial(extract_shards, teachers=teachers))(config, todo, progress)
    return ExtractSummary(
        cache=config.out,
        results=results,
        seconds=time.perf_counter() - start,
        stored_bytes=cache.stored_bytes(),
        cache_samples=sum(cache.sample_counts().values()),
        head=head,
        views=config.views,
        views_auto=views_auto,
    )
