"""``apmpipe embed``: run a trained student (no teacher) over new image shards and write what retrieval needs.

Inputs are read exactly as ``apmpipe extract`` reads them (same sources, decoding, bad-sample handling, one part
per input shard) and preprocessed as the student's training cache stored them (the teacher's data config kept in
the student's layout), so the student sees the pixels it was trained on. Per image and level it writes the global
feature ``apmpipe eval`` uses (``--feature``, see :mod:`.classify`), optionally the predicted token grid, and,
where a teacher head opens (``--head-cache``, else the student's training caches), the head's logits and top-k
classes. ``pooled`` is what the head reads, so it applies to the last level alone and only with a head; every
other level then gets ``cls`` (``mean-patch`` when the teacher has no prefix token); the manifest and the summary
name each level's feature. Files are written per part by :mod:`apmpipe.storage.embeddings`; a rerun skips the
complete parts and refuses other options.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from apmpipe.storage.batches import ShardBatches, batch_loader
from apmpipe.storage.cache import FeatureCache
from apmpipe.storage.checkpoint import student_digest
from apmpipe.storage.embeddings import (
    DTYPES,
    LOGITS,
    TOKENS_PREFIX,
    EmbeddingStore,
    Part,
    RowFile,
    feature_folder,
    tokens_folder,
)
from apmpipe.storage.errors import (
    AT_LEAST_ONE,
    WORKERS,
    ApmError,
    ConfigError,
    ModelError,
    Range,
    check_choice,
    check_ranges,
)
from apmpipe.storage.files import check_writable
from apmpipe.storage.locks import writer_lock
from apmpipe.storage.redact import HIDDEN, redact_fields, redact_url
from apmpipe.storage.remote import absolute_url
from apmpipe.storage.sources import DEFAULT_MAX_PIXELS, ShardSource, done_shards

from .apm import APM
from .classify import check_feature, global_feature, pooled_or_fallback
from .head import TeacherHead
from .input_options import label_options, resolve_config_inputs
from .inputs import PixelNormalizer
from .preprocess import pixel_transform
from .runtime import loader_workers, resolve_device
from .shard_results import Progress, ShardResult, ShardTotals
from .student import load_model

RUNTIME_OPTIONS = ("inputs", "out", "student", "batch_size", "chunk", "loader_workers", "device", "storage_options")


@dataclass(frozen=True)
class EmbedConfig:
    """Options of one ``apmpipe embed`` run; all but ``RUNTIME_OPTIONS`` are recorded in the manifest and must
    not change when a run is completed."""

    inputs: tuple[str, ...]
    out: str
    student: str
    feature: str = "pooled"
    dtype: str = "float16"
    tokens: bool = False
    topk: int = 5
    head_cache: str | None = None
    batch_size: int = 64
    chunk: int = 256
    loader_workers: int = -1
    label_key: str | None = "cls"
    class_names: tuple[str, ...] = ()
    max_pixels: int = DEFAULT_MAX_PIXELS
    folder_block: int = 1000
    device: str = "auto"
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    RANGES: ClassVar[dict[str, Range]] = {
        "topk": AT_LEAST_ONE,
        "batch_size": AT_LEAST_ONE,
        "chunk": AT_LEAST_ONE,
        "loader_workers": WORKERS,
        "max_pixels": AT_LEAST_ONE,
        "folder_block": AT_LEAST_ONE,
    }

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ConfigError(
                "no SOURCE given; pass WebDataset shards (.tar/.tgz, brace patterns, a directory) or an image folder"
            )
        check_feature(self.feature)
        check_choice("--dtype", self.dtype, DTYPES)
        check_ranges(vars(self), self.RANGES)
        EmbeddingStore.check_out(self.out)
        if self.head_cache is not None:  # one record of one cache from any working directory
            object.__setattr__(self, "head_cache", absolute_url(self.head_cache))

    @classmethod
    def from_options(
        cls,
        inputs: Sequence[str],
        out: str,
        student: str,
        *,
        no_labels: bool = False,
        class_names_file: str | None = None,
        max_pixels: int | None = None,
        **options: Any,
    ) -> EmbedConfig:
        """Build from flat options as the command line gives them (labels as ``apmpipe extract`` takes them)."""
        options.update(label_options(no_labels, class_names_file, options.get("storage_options") or {}))
        return cls(
            inputs=tuple(inputs),
            out=out,
            student=student,
            max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
            **options,
        )

    def recorded_options(self) -> dict[str, Any]:
        """The options that decide what is written (the manifest's ``options``; URLs redacted)."""
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {k: v for k, v in redact_fields(options, ("head_cache",)).items() if k not in RUNTIME_OPTIONS}


@dataclass
class EmbedSummary(ShardTotals):
    """Totals of one run, for the CLI's summary table."""

    out: str
    results: list[ShardResult]
    levels: list[dict[str, Any]]
    head: dict[str, Any]
    seconds: float
    student_seconds: float  # in the student's forward (and the head) alone


class EmbedProgress(Progress, Protocol):
    def plan(self, total: int, todo: int) -> None: ...


@dataclass
class _Head:
    """The teacher head the run uses (or None), the cache it came from, and why there is none."""

    module: TeacherHead | None
    cache: str | None = None
    reason: str = ""

    def record(self) -> dict[str, Any]:
        if self.module is None:
            return {"cache": None, "reason": self.reason}
        return {"cache": redact_url(self.cache or ""), "pool": self.module.pool}


def _head_problem(cache: FeatureCache, layout: dict[str, Any]) -> str | None:
    """Why ``cache``'s head cannot classify the student's last level, or None."""
    theirs = cache.spec.layout()
    url = redact_url(cache.url)
    if theirs["teacher"] != layout["teacher"] or theirs["final_norm"] != layout["final_norm"]:
        return f"cache {url!r} holds another teacher's tokens than the student's"
    if theirs["levels"][-1] != layout["levels"][-1]:
        return (
            f"the head of cache {url!r} reads teacher layer {theirs['levels'][-1]['layer']}; the student's last "
            f"level is layer {layout['levels'][-1]['layer']}"
        )
    if cache.head() is None:
        return f"cache {url!r} stores no teacher head ({cache.attrs.get('head', {}).get('reason', 'none written')})"
    return None


def _find_head(config: EmbedConfig, metadata: dict[str, Any], device: torch.device) -> _Head:
    """The head of ``--head-cache`` (refused in one line when it cannot serve), else of the first training cache of
    the student that opens and fits; none, with the reasons, when no cache does."""
    candidates = [config.head_cache] if config.head_cache else list(metadata.get("train_config", {}).get("caches", []))
    reasons = []
    for url in candidates:
        if HIDDEN in url:  # recorded redacted: the run cannot name it
            reasons.append(f"training cache {url!r} is recorded without its credentials; pass --head-cache")
            continue
        try:
            cache = FeatureCache.open(url, storage_options=config.storage_options)
            problem = _head_problem(cache, metadata["layout"])
        except ApmError as exc:
            problem = str(exc)
        if problem is None:
            return _Head(TeacherHead(*cache.head()).to(device).eval(), url)
        if config.head_cache:
            raise ModelError(f"--head-cache: {problem}; name a cache of the student's teacher with a stored head")
        reasons.append(problem)
    return _Head(None, reason="; ".join(reasons) or "the student records no training cache")


def _levels(model: APM, layout: dict[str, Any], feature: str, has_head: bool) -> list[dict[str, Any]]:
    """Each student level: the teacher layer it predicts and the global feature written for it."""
    layers = [int(level["layer"]) for level in layout["levels"]]
    if len(layers) != len(model.config.level_dims):
        raise ModelError(
            f"the student predicts {len(model.config.level_dims)} levels but its layout names {len(layers)}; "
            "retrain it with this apmpipe"
        )
    check_feature(feature, min(model.config.prefixes))
    out = []
    for index, (layer, prefix) in enumerate(zip(layers, model.config.prefixes, strict=True)):
        kind = pooled_or_fallback(feature, has_head and index == len(layers) - 1, prefix)
        out.append({"layer": layer, "feature": kind, "file": feature_folder(layer)})
    return out


class _Embedder:
    """The student, its input normaliser, the head and the levels: uint8 pixels -> one part's arrays."""

    def __init__(
        self, config: EmbedConfig, model: APM, layout: dict[str, Any], head: _Head, device: torch.device
    ) -> None:
        self.config, self.model, self.head, self.device = config, model, head.module, device
        self.normalize = PixelNormalizer(layout["data_config"]).to(device)
        self.levels = _levels(model, layout, config.feature, head.module is not None)
        self.dtype = np.dtype(config.dtype)
        self.seconds = 0.0

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        """Arrays by output folder for one batch (``[B, ...]`` each)."""
        start = time.perf_counter()
        predicted = self.model.predict_tokens(self.normalize(pixels.to(self.device)), self.config.chunk)
        out: dict[str, np.ndarray] = {}
        for level, tokens, prefix in zip(self.levels, predicted, self.model.config.prefixes, strict=True):
            feature = global_feature(tokens, level["feature"], prefix, self.head)
            out[level["file"]] = feature.numpy().astype(self.dtype)
            if self.config.tokens:
                out[tokens_folder(level["layer"])] = tokens.float().cpu().numpy().astype(self.dtype)
        if self.head is not None:
            out[LOGITS] = self.head(predicted[-1]).float().cpu().numpy()
        self.seconds += time.perf_counter() - start
        return out


@dataclass
class _PartBuffer:
    """One part's batches until its last record: token grids (``--tokens``) go to the part's files batch by batch,
    the rest (global features, logits, keys, labels: a few numbers per sample) is held until the part is written."""

    source: ShardSource
    store: EmbeddingStore
    keys: list[str] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)
    streamed: dict[str, RowFile] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    error: str = ""

    def add(self, keys: list[str], labels: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        self.keys += keys
        self.labels.append(labels)
        for name, array in arrays.items():
            if name.startswith(TOKENS_PREFIX):
                if name not in self.streamed:
                    self.streamed[name] = self.store.row_file(name, self.source.name, array.dtype, array.shape[1:])
                self.streamed[name].append(array)
            else:
                self.arrays.setdefault(name, []).append(array)

    def part(self, topk: int) -> Part:
        arrays = {name: np.concatenate(parts) for name, parts in self.arrays.items()}
        top = None
        if LOGITS in arrays:
            probs = torch.from_numpy(arrays[LOGITS]).softmax(1)
            values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
            top = (indices.numpy(), values.numpy())
        return Part(self.keys, np.concatenate(self.labels), arrays, top, self.streamed)


def _write(store: EmbeddingStore, buffer: _PartBuffer, topk: int) -> ShardResult:
    source = buffer.source
    result = ShardResult(source.name, "done", len(buffer.keys), list(buffer.skipped))
    if buffer.error:
        for streamed in buffer.streamed.values():
            streamed.discard()
        store.fail_part(source.name, source.url, buffer.error, buffer.skipped)
        result.status, result.images, result.error = "failed", 0, buffer.error
    else:
        store.write_part(source.name, source.url, source.fingerprint, buffer.part(topk), buffer.skipped)
    return result


def embed(config: EmbedConfig, progress: EmbedProgress | None = None) -> EmbedSummary:
    """Embed every input shard not yet complete in ``config.out`` (``progress``: e.g. the CLI's
    :class:`apmpipe.pipeline.console.ShardProgress`)."""
    start = time.perf_counter()
    check_writable(config.out)
    inputs = resolve_config_inputs(config)
    device = resolve_device(config.device)
    model, metadata = load_model(config.student, device, config.storage_options)
    layout = metadata["layout"]
    head = _find_head(config, metadata, device)
    embedder = _Embedder(config, model, layout, head, device)
    header = {
        "student": {
            "path": redact_url(absolute_url(config.student)),
            "sha256": student_digest(config.student, config.storage_options),
            "step": metadata.get("step"),
            "teacher": layout["teacher"].get("name"),
        },
        "options": config.recorded_options(),
        "head": head.record(),
        "levels": embedder.levels,
        "classes": list(inputs.classes or config.class_names),
    }
    with writer_lock(config.out, "embed", config.storage_options):
        store = EmbeddingStore.create_or_open(config.out, header)
        done = done_shards(inputs.shards, store.done(), f"--out {redact_url(config.out)!r}")
        todo = [s for s in inputs.shards if s.name not in done]
        results = [ShardResult(s.name, "skipped") for s in inputs.shards if s.name in done]
        if progress is not None:
            progress.plan(len(inputs.shards), len(todo))
        if todo:
            results += _embed_parts(config, store, embedder, todo, layout, progress)
    return EmbedSummary(
        config.out, results, embedder.levels, head.record(), time.perf_counter() - start, embedder.seconds
    )


def _embed_parts(
    config: EmbedConfig,
    store: EmbeddingStore,
    embedder: _Embedder,
    todo: Sequence[ShardSource],
    layout: dict[str, Any],
    progress: EmbedProgress | None,
) -> list[ShardResult]:
    """Decode ``todo`` in loader workers as extract does, run the student, write each part when its last batch
    is in."""
    c, h, w = (int(v) for v in layout["data_config"]["input_size"])
    batches = ShardBatches.of(config, todo, pixel_transform(layout["data_config"]), (c, h, w))
    workers = loader_workers(config.loader_workers, embedder.device.type)
    sources = {s.name: s for s in todo}
    buffers: dict[str, _PartBuffer] = {}
    results = []
    for record in batch_loader(batches, workers, embedder.device.type == "cuda"):
        buffer = buffers.setdefault(record["shard"], _PartBuffer(sources[record["shard"]], store))
        buffer.skipped += [tuple(s) for s in record["skipped"]]
        if record["error"]:
            buffer.error = record["error"]
        else:
            buffer.add(record["keys"], record["labels"].numpy(), embedder(record["pixels"]))
            if progress is not None:
                progress.images(len(record["keys"]))
        if record["last"]:
            results.append(_write(store, buffers.pop(record["shard"]), config.topk))
            if progress is not None:
                progress.shard(results[-1])
    return results
