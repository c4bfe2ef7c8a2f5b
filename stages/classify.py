"""Classification from tokens, student beside teacher: global features, weighted k-NN, linear probe, accuracy.

Global features (``--feature``): ``pooled`` is what the teacher's head reads (its pooled, normed pre-logits:
CLS or average, as the head says; final level only); ``cls`` the first prefix token; ``mean-patch`` the mean
of the grid tokens. The probe standardises features and picks its regularisation on a split of the training
features, so a trained teacher's probe lands near its own head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from apmpipe.storage.errors import ConfigError, check_choice

FEATURES = ("pooled", "cls", "mean-patch")
PROBE_C = (0.01, 0.1, 1.0, 10.0)


def global_feature(tokens: torch.Tensor, kind: str, prefix: int, head: torch.nn.Module | None) -> torch.Tensor:
    """One level's tokens ``[B, T, D]`` -> global features ``[B, F]`` (float32, on the CPU)."""
    if kind == "pooled":
        assert head is not None, "pooled features need the teacher head (checked by resolve_feature)"
        with torch.no_grad():
            return head(tokens, pre_logits=True).float().cpu()
    if kind == "cls":
        return tokens[:, 0].float().cpu()
    return tokens[:, prefix:].float().mean(1).cpu()


def resolve_feature(kind: str, level: int, prefixes: Sequence[int], has_head: bool) -> tuple[str, int]:
    """Check ``--feature``/``--level`` against the cache's levels (their prefix token counts); returns (feature
    actually used, 0-based level index)."""
    check_feature(kind)
    levels = len(prefixes)
    index = level - 1 if level > 0 else levels + level
    if not 0 <= index < levels:
        raise ConfigError(f"--level {level}: the cache holds {levels} levels; pick 1..{levels} or -1..-{levels}")
    check_feature(kind, prefixes[index])
    return pooled_or_fallback(kind, has_head and index == levels - 1, prefixes[index]), index


def pooled_or_fallback(kind: str, head_reads_level: bool, prefix: int) -> str:
    """``pooled`` where the teacher head reads the level, else ``cls`` (``mean-patch`` without prefix tokens), as
    ``apmpipe eval`` and ``apmpipe embed`` both report; other kinds as they are."""
    if kind != "pooled" or head_reads_level:
        return kind
    return "cls" if prefix else "mean-patch"


def check_feature(kind: str, prefix: int | None = None) -> None:
    """Refuse an unknown ``--feature``, or ``cls`` for a teacher without prefix tokens (when ``prefix`` is known)."""
    check_choice("--feature", kind, FEATURES)
    if kind == "cls" and prefix == 0:
        raise ConfigError("--feature cls: this teacher has no prefix tokens; use --feature mean-patch")


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean ``[B]``: label among the top ``k`` scores."""
    k = min(k, scores.shape[1])
    return (scores.topk(k, dim=1).indices == labels[:, None]).any(1)


def knn_scores(
    train: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, classes: int, k: int, temperature: float
) -> torch.Tensor:
    """Weighted k-NN class scores (DINO's evaluation): cosine top-k, weights exp(sim / T). ``-> [Q, classes]``."""
    train, query = F.normalize(train, dim=1), F.normalize(query, dim=1)
    scores = []
    for block in query.split(1024):
        sim, idx = (block @ train.T).topk(min(k, train.shape[0]), dim=1)
        votes = torch.zeros(block.shape[0], classes).scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def _standardise(train: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0) + 1e-6
    return (train - mean) / std, (query - mean) / std


def _pick_c(features: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """The probe's inverse regularisation with the best accuracy on a held-out fifth of the training features."""
    from sklearn.linear_model import LogisticRegression

    order = np.random.default_rng(seed).permutation(len(labels))
    cut = max(1, len(labels) // 5)
    held, fit = order[:cut], order[cut:]
    if len(np.unique(labels[fit])) < 2:
        return 1.0
    scores = [
        LogisticRegression(C=c, max_iter=1000).fit(features[fit], labels[fit]).score(features[held], labels[held])
        for c in PROBE_C
    ]
    return PROBE_C[int(np.argmax(scores))]


def probe_scores(
    train: torch.Tensor, train_labels: torch.Tensor, query: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, float]:
    """Linear probe (multinomial logistic regression on standardised features): class probabilities and the chosen C."""
    from sklearn.linear_model import LogisticRegression

    x, q = _standardise(train.numpy().astype(np.float64), query.numpy().astype(np.float64))
    y = train_labels.numpy()
    c = _pick_c(x, y, seed)
    clf = LogisticRegression(C=c, max_iter=2000).fit(x, y)
    probs = np.zeros((len(q), int(y.max()) + 1), dtype=np.float32)
    probs[:, clf.classes_] = clf.predict_proba(q)
    return torch.from_numpy(probs), c


def accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {
        "top1": float(topk_hits(scores, labels, 1).float().mean()),
        "top5": float(topk_hits(scores, labels, 5).float().mean()),
    }


def per_class(scores: torch.Tensor, labels: torch.Tensor) -> list[float | None]:
    """Top-1 accuracy per class ``0..max(labels)``; None for a class absent from ``labels``."""
    hits = topk_hits(scores, labels, 1).float()
    return [float(hits[labels == c].mean()) if (labels == c).any() else None for c in range(int(labels.max()) + 1)]


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Share of samples on which the student's top-1 class is the teacher's."""
    return float((student.argmax(1) == teacher.argmax(1)).float().mean())


def side_by_side(name: str, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Student and teacher scores on the same samples: accuracy, agreement of their top-1, per-class top-1."""
    return {
        "method": name,
        "student": accuracy(student, labels),
        "teacher": accuracy(teacher, labels),
        "agreement": agreement(student, teacher),
        "per_class": {"student": per_class(student, labels), "teacher": per_class(teacher, labels)},
    }


NEAR_CHANCE = 0.1  # a teacher within this share of the way from chance to perfect is "near chance"


def unrelated_labels(teacher: torch.Tensor, labels: torch.Tensor) -> str:
    """Why ``labels`` cannot be the classes of the head that gave the ``teacher`` scores ``[N, classes]``, or "":
    label ids outside the head, or the teacher's own top-1 near chance (the most frequent label's share)."""
    classes, top = teacher.shape[1], int(labels.max())
    if top >= classes:
        return f"label ids reach {top} but the head has {classes} classes"
    chance = float(torch.bincount(labels).max()) / len(labels)
    top1 = accuracy(teacher, labels)["top1"]
    if top1 <= chance + NEAR_CHANCE * (1 - chance):
        return f"the teacher's own top-1 on them is {top1:.3f}, near chance ({chance:.3f})"
    return ""


def head_side_by_side(name: str, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """:func:`side_by_side` for scores over a head's classes; when the labels cannot be those classes (see
    :func:`unrelated_labels`), the student's agreement with the teacher and why there are no accuracies."""
    reason = unrelated_labels(teacher, labels)
    if not reason:
        return side_by_side(name, student, teacher, labels)
    return {"method": name, "labels_unrelated": reason, "agreement": agreement(student, teacher)}


def cosine_scores(embeddings: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    return F.normalize(embeddings, dim=1) @ F.normalize(classes, dim=1).T


def load_class_embeddings(path: str, width: int) -> torch.Tensor:
    try:
        array = np.load(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--class-embeddings {path!r} is not a readable .npy array ({exc})") from None
    if array.ndim != 2 or array.shape[1] != width:
        raise ConfigError(
            f"--class-embeddings {path!r} has shape {array.shape}; expected (classes, {width}) to match "
            "the teacher's projected feature"
        )
    return torch.from_numpy(array.astype(np.float32))
