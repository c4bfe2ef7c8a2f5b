"""``apmpipe eval``: how well a trained student reproduces its teacher, and how well it classifies.

Everything comes from caches and the student checkpoint; the teacher is never built. Reports:

* fidelity per cached level: cosine and MSE between student and teacher tokens, prefix and patch tokens apart;
* classification beside the teacher on the same samples: through the teacher's own head stored in the cache
  (student tokens -> the teacher's norm, pooling and head), through CLIP-style class embeddings, and by
  weighted k-NN and a linear probe on global features fitted on a training cache;
* test-time training (TTT): per sample, adapt a copy of the student (trained, or fresh) on that sample's
  cached tokens for N steps, measure, then reset (episodic: weights and optimizer state never carry over).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from storage.cache import FeatureCache
from storage.checkpoint import load_student
from storage.errors import ConfigError, ModelError, require_at_least
from storage.stream import iter_cache

from .apm import APM, APMConfig
from .head import TeacherHead
from .runtime import resolve_device
from .train import Normalizer, TrainConfig, cache_layout, level_losses, sample_locations, train_step

TTT_START = ("trained", "scratch")


@dataclass(frozen=True)
class EvalConfig:
    """Options of one ``apmpipe eval`` run."""

    cache: str
    student: str
    train_cache: str | None = None
    class_embeddings: str | None = None
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
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ttt_from not in TTT_START:
            raise ConfigError(f"--ttt-from {self.ttt_from!r} is not one of {', '.join(TTT_START)}")
        require_at_least(self, ("batch_size", "chunk", "knn_k"), 1)
        require_at_least(self, ("max_samples", "ttt_steps", "ttt_locations", "ttt_samples"), 0)


def check_student_matches(metadata: dict[str, Any], cache: FeatureCache, what: str) -> None:
    """Refuse a student trained on another teacher, input or layers than ``cache``."""
    mine, theirs = metadata["layout"], cache_layout(cache.spec)
    for key in ("teacher", "levels", "data_config", "final_norm"):
        if mine[key] != theirs[key]:
            detail = f"{mine['teacher']['name']} layers {[lv['layer'] for lv in mine['levels']]}" if key in ("teacher", "levels") else key
            raise ModelError(f"the student was trained on {detail}, but {what} {cache.url!r} differs in {key}; evaluate it on a cache of its own teacher")


def load_model(path: str, device: torch.device) -> tuple[APM, dict[str, Any]]:
    weights, metadata = load_student(path)
    model = APM(APMConfig.from_dict(metadata["model_config"]))
    model.load_state_dict(weights)
    return model.to(device).eval(), metadata


def global_feature(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """A level's global feature: the mean of its grid-location outputs. ``[B, T, D] -> [B, D]``."""
    return tokens[:, prefix:].float().mean(1)


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``[B]``: label among the top ``k`` scores."""
    k = min(k, scores.shape[1])
    return (scores.topk(k, dim=1).indices == labels[:, None]).any(1)


def knn_scores(train: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, classes: int, k: int, temperature: float) -> torch.Tensor:
    """Weighted k-NN class scores (DINO's evaluation): cosine top-k, weights exp(sim / T). ``-> [Q, classes]``."""
    train, query = F.normalize(train, dim=1), F.normalize(query, dim=1)
    scores = []
    for block in query.split(1024):
        sim, idx = (block @ train.T).topk(min(k, train.shape[0]), dim=1)
        votes = torch.zeros(block.shape[0], classes).scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def probe_scores(train: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Linear probe (multinomial logistic regression on L2-normalised features) class probabilities."""
    from sklearn.linear_model import LogisticRegression

    classes = int(train_labels.max()) + 1
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(F.normalize(train, dim=1).numpy(), train_labels.numpy())
    probs = np.zeros((query.shape[0], classes), dtype=np.float32)
    probs[:, clf.classes_] = clf.predict_proba(F.normalize(query, dim=1).numpy())
    return torch.from_numpy(probs)


@dataclass
class _Fidelity:
    """Running sums of cosine and squared error per level, prefix and patch tokens apart."""

    prefix: int
    sums: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, layer: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        stats = self.sums.setdefault(layer, {})
        for part, sl in (("prefix", slice(0, self.prefix)), ("patch", slice(self.prefix, None))):
            p, t = pred[:, sl].float(), target[:, sl].float()
            if p.shape[1] == 0:
                continue
            stats[f"{part}_cosine"] = stats.get(f"{part}_cosine", 0.0) + float(F.cosine_similarity(p, t, dim=-1).sum())
            stats[f"{part}_sq"] = stats.get(f"{part}_sq", 0.0) + float(((p - t) ** 2).sum())
            stats[f"{part}_tokens"] = stats.get(f"{part}_tokens", 0.0) + p.shape[0] * p.shape[1]
            stats[f"{part}_dim"] = p.shape[2]

    def report(self) -> dict[str, dict[str, float]]:
        out = {}
        for layer, s in self.sums.items():
            out[layer] = {}
            for part in ("patch", "prefix"):
                if f"{part}_tokens" in s:
                    out[layer][f"{part}_cosine"] = s[f"{part}_cosine"] / s[f"{part}_tokens"]
                    out[layer][f"{part}_mse"] = s[f"{part}_sq"] / (s[f"{part}_tokens"] * s[f"{part}_dim"])
        return out


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


def _pass(model: APM, cache: FeatureCache, config: EvalConfig, device: torch.device, head: TeacherHead | None, fidelity: _Fidelity | None, limit: int) -> _Outputs:
    normalize = Normalizer(cache.spec.data_config).to(device)
    prefix = model.config.prefix_tokens
    out = _Outputs()
    for _, _, data in iter_cache(cache, config.batch_size, limit):
        images = normalize(torch.from_numpy(data.pixels).to(device))
        predicted = model.forward_intermediates(images, config.chunk)
        targets = [torch.from_numpy(t).to(device) for t in data.tokens]
        if fidelity is not None:
            for level, p, t in zip(cache.spec.levels, predicted, targets):
                fidelity.add(str(level.layer), p, t)
        out.labels.append(torch.from_numpy(data.labels))
        out.student_features.append(global_feature(predicted[-1], prefix).cpu())
        out.teacher_features.append(global_feature(targets[-1], prefix).cpu())
        if head is not None:
            with torch.no_grad():
                out.student_logits.append(head(predicted[-1]).cpu())
            out.teacher_logits.append(torch.from_numpy(data.logits) if data.logits is not None else head(targets[-1]).cpu())
    return out


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"top1": float(topk_hits(scores, labels, 1).float().mean()), "top5": float(topk_hits(scores, labels, 5).float().mean())}


def _per_class(scores: torch.Tensor, labels: torch.Tensor) -> list[float]:
    hits = topk_hits(scores, labels, 1).float()
    return [float(hits[labels == c].mean()) if (labels == c).any() else float("nan") for c in range(int(labels.max()) + 1)]


def _side_by_side(name: str, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    return {
        "method": name, "student": _accuracy(student, labels), "teacher": _accuracy(teacher, labels),
        "agreement": float((student.argmax(1) == teacher.argmax(1)).float().mean()),
        "per_class": {"student": _per_class(student, labels), "teacher": _per_class(teacher, labels)},
    }


def _cosine_scores(embeddings: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeddings, dim=1) @ F.normalize(classes, dim=1).T


def _load_class_embeddings(path: str, width: int) -> torch.Tensor:
    try:
        array = np.load(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--class-embeddings {path!r} is not a readable .npy array ({exc})") from None
    if array.ndim != 2 or array.shape[1] != width:
        raise ConfigError(f"--class-embeddings {path!r} has shape {array.shape}; expected (classes, {width}) to match the teacher's projected feature")
    return torch.from_numpy(array.astype(np.float32))


def _ttt(model: APM, cache: FeatureCache, config: EvalConfig, device: torch.device, metadata: dict[str, Any], head: TeacherHead | None, train_feats: tuple | None) -> dict[str, Any]:
    """Episodic test-time training, one sample at a time; reports before/after and ms per sample."""
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {k: v for k, v in metadata["train_config"].items() if k in ("mse_weight", "cosine_weight", "rgb_weight")}
    loss_config = TrainConfig(caches=(config.cache,), out="", clip_grad=1.0, **weights)
    normalize = Normalizer(cache.spec.data_config).to(device)
    prefix = model.config.prefix_tokens
    before, after, times, labels = [], [], [], []
    scores_before, scores_after, feats_after = [], [], []
    fidelity, fidelity_before = _Fidelity(prefix), _Fidelity(prefix)
    limit = config.ttt_samples or config.max_samples
    for _, _, block in iter_cache(cache, config.batch_size, limit):
        for i in range(len(block.labels)):
            one = slice(i, i + 1)
            images = normalize(torch.from_numpy(block.pixels[one]).to(device))
            targets = [torch.from_numpy(t[one]).to(device) for t in block.tokens]
            start = time.perf_counter()
            if config.ttt_from == "scratch":
                torch.manual_seed(config.seed)
                model.load_state_dict(APM(model.config).to(device).state_dict())
            else:
                model.load_state_dict(trained)
            optimizer = torch.optim.AdamW(model.parameters(), lr=config.ttt_lr, weight_decay=0.0)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
            with torch.no_grad():
                first_pred = model.forward_intermediates(images, config.chunk)
                before.append(float(sum(level_losses(first_pred, targets, loss_config))))
            model.train()
            for step in range(config.ttt_steps):
                where = sample_locations(1, model.config.num_tokens, config.ttt_locations, config.seed, step)
                train_step(model, model, optimizer, scheduler, images, targets, None if where is None else where.to(device), loss_config, False)
            model.eval()
            with torch.no_grad():
                pred = model.forward_intermediates(images, config.chunk)
                after.append(float(sum(level_losses(pred, targets, loss_config))))
            times.append(time.perf_counter() - start)
            for level, p0, p, t in zip(cache.spec.levels, first_pred, pred, targets):
                fidelity_before.add(str(level.layer), p0, t)
                fidelity.add(str(level.layer), p, t)
            labels.append(torch.from_numpy(block.labels[one]))
            feats_after.append(global_feature(pred[-1], prefix).cpu())
            if head is not None:
                with torch.no_grad():
                    scores_before.append(head(first_pred[-1]).cpu())
                    scores_after.append(head(pred[-1]).cpu())
    model.load_state_dict(trained)
    result: dict[str, Any] = {
        "samples": len(before), "steps": config.ttt_steps, "lr": config.ttt_lr, "start": config.ttt_from, "locations": config.ttt_locations or "all",
        "loss_before": float(np.mean(before)), "loss_after": float(np.mean(after)), "ms_per_sample": 1000 * float(np.mean(times)),
        "per_sample": [{"loss_before": b, "loss_after": a} for b, a in zip(before, after)],
        "fidelity_before": fidelity_before.report(), "fidelity_after": fidelity.report(),
    }
    label_t = torch.cat(labels)
    if (label_t >= 0).all():
        if scores_after:
            result["head_before"] = _accuracy(torch.cat(scores_before), label_t)
            result["head_after"] = _accuracy(torch.cat(scores_after), label_t)
        if train_feats is not None:
            feats, train_labels, classes = train_feats
            result["knn_after"] = _accuracy(knn_scores(feats, train_labels, torch.cat(feats_after), classes, config.knn_k, config.knn_temperature), label_t)
    return result


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Run every evaluation the inputs allow; returns the report (JSON-ready)."""
    device = resolve_device(config.device)
    cache = FeatureCache.open(config.cache, storage_options=config.storage_options)
    if not cache.complete_shards():
        raise ModelError(f"cache {config.cache!r} has no complete shard to evaluate; finish it with apmpipe extract")
    model, metadata = load_model(config.student, device)
    check_student_matches(metadata, cache, "eval cache")
    stored = cache.head()
    head = TeacherHead(*stored).to(device) if stored else None
    fidelity = _Fidelity(model.config.prefix_tokens)
    outputs = _pass(model, cache, config, device, head, fidelity, config.max_samples)
    labels = outputs.cat("labels")
    report: dict[str, Any] = {"cache": config.cache, "student": config.student, "samples": int(labels.shape[0]), "fidelity": fidelity.report(), "classification": {}}
    classification = report["classification"]
    has_labels = bool((labels >= 0).all())
    if not has_labels:
        classification["skipped"] = "the eval cache has no labels (-1): fidelity only"
    if has_labels and head is not None and not config.class_embeddings:
        classification["teacher_head"] = _side_by_side("teacher head", outputs.cat("student_logits"), outputs.cat("teacher_logits"), labels)
    elif head is None:
        classification["teacher_head_skipped"] = cache.attrs.get("head", {}).get("reason", "the cache stores no teacher head")
    if has_labels and config.class_embeddings:
        if head is None:
            raise ConfigError("--class-embeddings needs the teacher's projection head in the cache (extract with the final layer, -1, of a CLIP image tower)")
        classes = _load_class_embeddings(config.class_embeddings, outputs.cat("teacher_logits").shape[1])
        classification["zero_shot"] = _side_by_side("class embeddings", _cosine_scores(outputs.cat("student_logits"), classes), _cosine_scores(outputs.cat("teacher_logits"), classes), labels)
    train_feats = None
    if config.train_cache:
        train = FeatureCache.open(config.train_cache, storage_options=config.storage_options)
        check_student_matches(metadata, train, "train cache")
        fitted = _pass(model, train, config, device, None, None, 0)
        train_labels = fitted.cat("labels")
        if has_labels and (train_labels >= 0).all():
            classes = int(max(train_labels.max(), labels.max())) + 1
            s_feats, t_feats = fitted.cat("student_features"), fitted.cat("teacher_features")
            classification["knn"] = _side_by_side(
                f"weighted k-NN (k={config.knn_k}, T={config.knn_temperature})",
                knn_scores(s_feats, train_labels, outputs.cat("student_features"), classes, config.knn_k, config.knn_temperature),
                knn_scores(t_feats, train_labels, outputs.cat("teacher_features"), classes, config.knn_k, config.knn_temperature), labels)
            classification["probe"] = _side_by_side("linear probe", probe_scores(s_feats, train_labels, outputs.cat("student_features")),
                                                    probe_scores(t_feats, train_labels, outputs.cat("teacher_features")), labels)
            train_feats = (s_feats, train_labels, classes)
        else:
            classification["knn_skipped"] = "the train or eval cache has no labels"
    elif has_labels and head is None:
        classification["knn_skipped"] = "pass --train-cache to fit k-NN and a linear probe"
    if config.ttt_steps:
        report["ttt"] = _ttt(model, cache, config, device, metadata, head, train_feats)
    return report
