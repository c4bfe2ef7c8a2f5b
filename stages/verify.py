"""``apmpipe verify``: recompute cached samples with the teacher, in the precision each shard was made with
(float32, or bfloat16 autocast), and compare them with the cache."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from storage.cache import FeatureCache
from storage.errors import CacheError, ModelError

from .extract import min_token_cosine
from .teacher import Teacher, TeacherConfig


@dataclass
class VerifyReport:
    """Worst differences between cached and recomputed outputs over the checked samples."""

    samples: int
    levels: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> max_abs, min_cosine
    logits_max_abs: float | None = None
    precision: str = ""  # the precisions recomputed in, comma-separated


def _pick(cache: FeatureCache, count: int) -> list[tuple[str, int]]:
    """``count`` (shard, index) pairs spread evenly over all complete shards."""
    positions = [(name, i) for name, count in cache.sample_counts().items() for i in range(count)]
    if not positions:
        raise CacheError(f"cache {cache.url!r} has no complete shard to verify; run apmpipe extract first")
    picks = np.linspace(0, len(positions) - 1, num=min(count, len(positions))).round().astype(int)
    return [positions[i] for i in sorted(set(picks.tolist()))]


def verify_cache(url: str, samples: int = 8, device: str = "auto", checkpoint: str | None = None, storage_options: dict | None = None) -> VerifyReport:
    """Rebuild the cache's teacher (same weights, checked by hash) and recompute ``samples`` cached samples."""
    cache = FeatureCache.open(url, storage_options=storage_options)
    build = cache.attrs.get("teacher_build")
    if not build:
        raise CacheError(f"cache {url!r} does not record how its teacher was built; it cannot be verified")
    config = TeacherConfig.from_dict({**build, "checkpoint": checkpoint or build.get("checkpoint")})
    spec = cache.spec
    teacher = Teacher(config, tuple(level.layer for level in spec.levels), final_norm=spec.final_norm, device=device, amp=False)
    if teacher.weights_sha256 != spec.teacher["weights_sha256"]:
        raise ModelError(f"the rebuilt teacher's weights differ from those that made {url!r}; pass the original weights with --checkpoint")
    report = VerifyReport(samples=0)
    precision = {name: attrs.get("precision", "float32") for name, attrs in cache.shard_attrs().items()}
    picks = _pick(cache, samples)
    for name, index in picks:
        cached = cache.read(name, index, index + 1)
        tokens, logits = teacher.forward(torch.from_numpy(cached.pixels), amp=precision[name] == "bfloat16-autocast")
        for level, ref, new in zip(spec.levels, cached.tokens, tokens):
            stats = report.levels.setdefault(str(level.layer), {"max_abs": 0.0, "min_cosine": 1.0})
            new = new.cpu().numpy()
            stats["max_abs"] = max(stats["max_abs"], float(np.abs(ref - new).max()))
            stats["min_cosine"] = min(stats["min_cosine"], min_token_cosine(ref, new))
        if logits is not None and cached.logits is not None:
            diff = float(np.abs(cached.logits - logits.cpu().numpy()).max())
            report.logits_max_abs = max(report.logits_max_abs or 0.0, diff)
        report.samples += 1
    report.precision = ", ".join(sorted({precision[name] for name, _ in picks}))
    return report
