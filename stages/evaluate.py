"""``apmpipe eval``: how well a trained student reproduces its teacher and decides like it, always beside a baseline.

Everything comes from caches and the student checkpoint; the teacher is never built. The report composes:

* fidelity per level (``fidelity``): cosine, MSE and R^2 against the constant baseline (the training cache's
  mean token per location, carried by the student), prefix and grid tokens apart;
* classification beside the teacher on the same samples (``classify``): through the teacher's stored head,
  CLIP-style class embeddings, and weighted k-NN / a linear probe on global features of a training cache;
* episodic test-time training (``ttt``) on a seeded random subset, before and after on the same samples.

Sample subsets (``max_samples``, ``ttt_samples``) are seeded random draws across all shards, never the first N.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch

from apmpipe.storage.cache import FeatureCache
from apmpipe.storage.errors import (
    ANY_NUMBER,
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    ModelError,
    Range,
    check_choice,
    check_ranges,
)
from apmpipe.storage.redact import redact_fields, redact_url
from apmpipe.storage.remote import absolute_url
from apmpipe.storage.stream import iter_subset, sample_subset

from .apm import APM
from .classify import (
    FEATURES,
    accuracy,
    agreement,
    cosine_scores,
    global_feature,
    head_side_by_side,
    knn_scores,
    load_class_embeddings,
    probe_scores,
    resolve_feature,
    side_by_side,
    unrelated_labels,
)
from .fidelity import TokenFidelity
from .head import TeacherHead
from .inputs import PixelNormalizer
from .runtime import resolve_device
from .student import cache_for_student, load_model, loss_config_of
from .ttt import TTT_START, EpisodicTTT, TTTConfig


@dataclass(frozen=True)
class EvalConfig:
    """Options of one ``apmpipe eval`` run."""

    cache: str
    student: str
    train_cache: str | None = None
    class_embeddings: str | None = None
    feature: str = "pooled"
    level: int = -1
    batch_size: int = 64
    max_samples: int = 0
    chunk: int = 256
    knn_k: int = 20
    knn_temperature: float = 0.07
    ttt_steps: int = 0
    ttt_lr: float = 1e-4
    ttt_locations: int = 0
    ttt_from: str = "trained"
    ttt_samples: int = 0
    seed: int = 0
    device: str = "auto"
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    RANGES: ClassVar[dict[str, Range]] = {
        "level": ANY_NUMBER,  # checked against the cache's levels before the pass (resolve_feature)
        "batch_size": AT_LEAST_ONE,
        "max_samples": NON_NEGATIVE,
        "chunk": AT_LEAST_ONE,
        "knn_k": AT_LEAST_ONE,
        "knn_temperature": POSITIVE,
        "ttt_steps": NON_NEGATIVE,
        "ttt_lr": POSITIVE,
        "ttt_locations": NON_NEGATIVE,
        "ttt_samples": NON_NEGATIVE,
        "seed": NON_NEGATIVE,
    }

    def __post_init__(self) -> None:
        check_choice("--ttt-from", self.ttt_from, TTT_START)
        check_choice("--feature", self.feature, FEATURES)
        check_ranges(vars(self), self.RANGES)

    def to_dict(self) -> dict[str, Any]:
        """The options as ``eval.json`` records them (URLs redacted)."""
        options = redact_fields(asdict(self), ("cache", "student", "train_cache", "class_embeddings"))
        return {k: v for k, v in options.items() if k != "storage_options"}

    def ttt(self) -> TTTConfig:
        return TTTConfig(
            steps=self.ttt_steps, lr=self.ttt_lr, locations=self.ttt_locations, start=self.ttt_from, seed=self.seed
        )


@dataclass
class _Context:
    """What every pass needs: the student, the teacher head, the feature choice, the device."""

    model: APM
    head: TeacherHead | None
    feature: str
    level: int
    device: torch.device
    normalize: PixelNormalizer

    def features(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        return global_feature(tokens[self.level], self.feature, self.model.config.prefixes[self.level], self.head)


@dataclass
class _Outputs:
    """What one pass over a cache yields for classification."""

    labels: list[torch.Tensor] = field(default_factory=list)
    student_features: list[torch.Tensor] = field(default_factory=list)
    teacher_features: list[torch.Tensor] = field(default_factory=list)
    student_logits: list[torch.Tensor] = field(default_factory=list)
    teacher_logits: list[torch.Tensor] = field(default_factory=list)

    def cat(self, name: str) -> torch.Tensor | None:
        parts = getattr(self, name)
        return torch.cat(parts) if parts else None

    def labelled(self) -> _Outputs:
        """The rows of samples with a label (not -1), as one part per output."""
        keep = self.cat("labels") >= 0
        return _Outputs(**{f.name: [self.cat(f.name)[keep]] if getattr(self, f.name) else [] for f in fields(self)})


def _baselines(model: APM) -> list[torch.Tensor]:
    """The constant predictor per level: the training cache's mean token per location (held by the student)."""
    return [scale.baseline.detach().cpu() for scale in model.scales]


def _pass(
    ctx: _Context,
    cache: FeatureCache,
    subset: dict[str, np.ndarray],
    batch_size: int,
    chunk: int,
    fidelity: TokenFidelity | None,
) -> _Outputs:
    out = _Outputs()
    for data in iter_subset(cache, subset, batch_size):
        images = ctx.normalize(torch.from_numpy(data.pixels).to(ctx.device))
        predicted = ctx.model.predict_tokens(images, chunk)
        targets = [torch.from_numpy(t).to(ctx.device) for t in data.tokens]
        if fidelity is not None:
            for index, (level, p, t) in enumerate(zip(cache.spec.levels, predicted, targets, strict=True)):
                fidelity.add(index, level.layer, p, t)
        out.labels.append(torch.from_numpy(data.labels))
        out.student_features.append(ctx.features(predicted))
        out.teacher_features.append(ctx.features(targets))
        if ctx.head is not None:
            with torch.no_grad():
                out.student_logits.append(ctx.head(predicted[-1]).cpu())
            out.teacher_logits.append(
                torch.from_numpy(data.logits) if data.logits is not None else ctx.head(targets[-1]).cpu()
            )
    return out


def _head_rows(
    outputs: _Outputs, labels: torch.Tensor, config: EvalConfig, cache: FeatureCache, head: TeacherHead | None
) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    if head is None:
        rows["teacher_head_skipped"] = cache.attrs.get("head", {}).get("reason", "the cache stores no teacher head")
        return rows
    student, teacher = outputs.cat("student_logits"), outputs.cat("teacher_logits")
    if config.class_embeddings:
        classes = load_class_embeddings(config.class_embeddings, teacher.shape[1])
        rows["zero_shot"] = head_side_by_side(
            "class embeddings", cosine_scores(student, classes), cosine_scores(teacher, classes), labels
        )
    else:
        rows["teacher_head"] = head_side_by_side("teacher head", student, teacher, labels)
    return rows


@dataclass
class _TrainFeatures:
    """Global features of a training cache, fitted on by k-NN and the probe."""

    student: torch.Tensor
    teacher: torch.Tensor
    labels: torch.Tensor
    classes: int

    def knn(self, which: str, query: torch.Tensor, config: EvalConfig) -> torch.Tensor:
        return knn_scores(getattr(self, which), self.labels, query, self.classes, config.knn_k, config.knn_temperature)


def _fit_rows(
    ctx: _Context, config: EvalConfig, metadata: dict[str, Any], outputs: _Outputs, labels: torch.Tensor
) -> tuple[dict[str, Any], _TrainFeatures | None]:
    """k-NN and the probe, student beside teacher, on features of ``--train-cache``."""
    if not config.train_cache:
        return {
            "knn_skipped": "k-NN and the linear probe need --train-cache (a cache of labelled training images)"
        }, None
    train = FeatureCache.open(config.train_cache, storage_options=config.storage_options)
    train = cache_for_student(metadata, train, "train cache")
    every = sample_subset(train, 0, config.seed, every_view=True)  # a train cache's views are training samples
    fitted = _pass(ctx, train, every, config.batch_size, config.chunk, None)
    fitted = fitted.labelled()
    train_labels = fitted.cat("labels")
    if not len(train_labels):
        return {"knn_skipped": "the train cache has no labels (-1)"}, None
    feats = _TrainFeatures(
        fitted.cat("student_features"),
        fitted.cat("teacher_features"),
        train_labels,
        int(max(train_labels.max(), labels.max())) + 1,
    )
    s_query, t_query = outputs.cat("student_features"), outputs.cat("teacher_features")
    knn = side_by_side(
        f"weighted k-NN (k={config.knn_k}, T={config.knn_temperature}) on {ctx.feature} features",
        feats.knn("student", s_query, config),
        feats.knn("teacher", t_query, config),
        labels,
    )
    s_probe, s_c = probe_scores(feats.student, train_labels, s_query, config.seed)
    t_probe, t_c = probe_scores(feats.teacher, train_labels, t_query, config.seed)
    probe = side_by_side(
        f"linear probe on standardised {ctx.feature} features (C {s_c:g} / {t_c:g})", s_probe, t_probe, labels
    )
    return {"knn": knn, "probe": probe}, feats


def _ttt_report(
    ctx: _Context, cache: FeatureCache, config: EvalConfig, metadata: dict[str, Any], train_feats: _TrainFeatures | None
) -> dict[str, Any]:
    """Episodic TTT on a seeded random subset; before/after fidelity, head and k-NN on the same samples."""
    ttt = EpisodicTTT(ctx.model, loss_config_of(metadata), config.ttt(), ctx.head, config.chunk)
    baselines = _baselines(ctx.model)
    fid_before, fid_after = (
        TokenFidelity(ctx.model.config.prefixes, baselines),
        TokenFidelity(ctx.model.config.prefixes, baselines),
    )
    seconds, labels, before, after, per_sample = [], [], _Outputs(), _Outputs(), []
    subset = sample_subset(cache, config.ttt_samples or config.max_samples, config.seed + 1)
    for data in iter_subset(cache, subset, 1):
        images = ctx.normalize(torch.from_numpy(data.pixels).to(ctx.device))
        targets = [torch.from_numpy(t).to(ctx.device) for t in data.tokens]
        logits = (
            torch.from_numpy(data.logits).to(ctx.device) if data.logits is not None and ctx.head is not None else None
        )
        episode = ttt.adapt(
            zlib.crc32(data.keys[0].encode()), images, targets, logits
        )  # seeds follow the sample, not its position
        seconds.append(episode.seconds)
        per_sample.append({"key": data.keys[0], "loss_before": episode.loss_before, "loss_after": episode.loss_after})
        labels.append(torch.from_numpy(data.labels))
        for index, (level, t) in enumerate(zip(cache.spec.levels, targets, strict=True)):
            fid_before.add(index, level.layer, episode.before[index], t)
            fid_after.add(index, level.layer, episode.after[index], t)
        if ctx.head is not None:  # the teacher's logits for this sample, once (read beside both passes)
            with torch.no_grad():
                before.teacher_logits.append(ctx.head(targets[-1]).cpu() if logits is None else logits.cpu())
        for outputs, tokens in ((before, episode.before), (after, episode.after)):
            outputs.student_features.append(ctx.features(tokens))
            if ctx.head is not None:
                with torch.no_grad():
                    outputs.student_logits.append(ctx.head(tokens[-1]).cpu())
    ttt.restore()
    steps = max(config.ttt_steps, 1)
    result: dict[str, Any] = {
        "samples": len(seconds),
        "steps": config.ttt_steps,
        "lr": config.ttt_lr,
        "start": config.ttt_from,
        "locations": config.ttt_locations or "all",
        "ms_per_step": 1000 * float(np.mean(seconds)) / steps,
        "ms_per_sample": 1000 * float(np.mean(seconds)),
        "loss_before": float(np.mean([p["loss_before"] for p in per_sample])),
        "loss_after": float(np.mean([p["loss_after"] for p in per_sample])),
        "per_sample": per_sample,
        "fidelity_before": fid_before.report(),
        "fidelity_after": fid_after.report(),
        "threads": torch.get_num_threads(),
    }
    label_t = torch.cat(labels)
    result.update({"left_out": left_out} if (left_out := _left_out(label_t)) else {})
    if ctx.head is not None:
        teacher = before.cat("teacher_logits")
        known = label_t >= 0
        scored = bool(known.any()) and not unrelated_labels(teacher[known], label_t[known])  # else agreement alone
        result["teacher_head"] = _labelled_accuracy(teacher, label_t) if scored else {}
        for name, outputs in (("before", before), ("after", after)):
            student = outputs.cat("student_logits")
            result[f"head_{name}"] = {
                **(_labelled_accuracy(student, label_t) if scored else {}),
                "agreement": agreement(student, teacher),
            }
    if train_feats is not None and (label_t >= 0).any():
        for name, outputs in (("before", before), ("after", after)):
            result[f"knn_{name}"] = _labelled_accuracy(
                train_feats.knn("student", outputs.cat("student_features"), config), label_t
            )
    return result


def _labelled_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1/top-5 over the samples with a label (empty when none has one)."""
    known = labels >= 0
    return accuracy(scores[known], labels[known]) if known.any() else {}


def _identity(config: EvalConfig, cache: FeatureCache, metadata: dict[str, Any]) -> dict[str, Any]:
    """What a report needs to be reproduced: options, versions, the cache and the student."""
    teacher = cache.spec.teacher
    return {
        "options": config.to_dict(),
        "versions": _versions(("apmpipe", "torch", "timm", "zarr")),
        "cache": {
            "url": redact_url(cache.url),
            "teacher": teacher.get("name"),
            "weights_sha256": teacher.get("weights_sha256"),
        },
        "student": {
            "path": redact_url(config.student),
            "step": metadata.get("step"),
            "model_config": metadata.get("model_config"),
            "train_config": metadata.get("train_config"),
            **({"held_out": metadata["held_out"]} if "held_out" in metadata else {}),
        },
        "selected_on_this_cache": selected_on(metadata, config.cache),
    }


def selected_on(metadata: dict[str, Any], cache: str) -> bool:
    """Whether ``train --val`` chose the student's weights among several by their score on ``cache`` (an earlier
    step's weights than the run's last): figures on that cache then lean optimistic."""
    held_out = metadata.get("held_out") or {}
    chosen = held_out.get("best_step", metadata.get("step")) != metadata.get("step")
    return chosen and held_out.get("cache") == redact_url(absolute_url(cache))


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of ``names`` (packages that are not installed are left out)."""
    import importlib.metadata as md

    versions = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


def _left_out(labels: torch.Tensor) -> str | None:
    """What classification leaves out of ``labels``: the samples without a label (-1), if any."""
    missing = int((labels < 0).sum())
    return f"{missing} of {len(labels)} samples have no label (-1): classified without them" if missing else None


def _check_train_classes(config: EvalConfig) -> None:
    """Refuse a ``--train-cache`` whose labelled samples hold one class, before any pass: the probe cannot be fitted
    on it (and k-NN would vote for that class alone). Reads only the labels."""
    if not config.train_cache:
        return
    train = FeatureCache.open(config.train_cache, storage_options=config.storage_options)
    labels = np.concatenate(
        [np.zeros(0, np.int64)]
        + [
            train.read(name, 0, count, tokens=False, pixels=False, extras=False).labels
            for name, count in train.sample_counts().items()
        ]
    )
    classes = np.unique(labels[labels >= 0])
    if len(classes) == 1:
        raise ConfigError(
            f"--train-cache {redact_url(config.train_cache)} holds one class (label {classes[0]}): k-NN and the "
            "linear probe need two or more; pass a cache of several classes or drop --train-cache"
        )


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Run every evaluation the inputs allow; returns the report (JSON-ready)."""
    _check_train_classes(config)
    device = resolve_device(config.device)
    cache = FeatureCache.open(config.cache, storage_options=config.storage_options)
    if not cache.complete_shards():
        raise ModelError(
            f"cache {redact_url(config.cache)!r} has no complete shard to evaluate; finish it with apmpipe extract"
        )
    model, metadata = load_model(config.student, device, config.storage_options)
    cache = cache_for_student(metadata, cache, "eval cache")
    stored = cache.head()
    head = TeacherHead(*stored).to(device) if stored else None
    feature, level = resolve_feature(config.feature, config.level, model.config.prefixes, head is not None)
    ctx = _Context(model, head, feature, level, device, PixelNormalizer(cache.spec.data_config).to(device))
    fidelity = TokenFidelity(model.config.prefixes, _baselines(model))
    outputs = _pass(
        ctx, cache, sample_subset(cache, config.max_samples, config.seed), config.batch_size, config.chunk, fidelity
    )
    labels = outputs.cat("labels")
    report: dict[str, Any] = {
        **_identity(config, cache, metadata),
        "samples": int(labels.shape[0]),
        "fidelity": fidelity.report(),
        "classification": {},
    }
    classification, train_feats = report["classification"], None
    left_out = _left_out(labels)
    outputs = outputs.labelled()
    labels = outputs.cat("labels")
    if not len(labels):
        classification["skipped"] = "the eval cache has no labels (-1): fidelity only"
    else:
        classification.update({"left_out": left_out} if left_out else {})
        classification.update(_head_rows(outputs, labels, config, cache, head))
        rows, train_feats = _fit_rows(ctx, config, metadata, outputs, labels)
        classification.update(rows)
    if config.ttt_steps:
        report["ttt"] = _ttt_report(ctx, cache, config, metadata, train_feats)
    return report
