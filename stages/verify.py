"""``apmpipe verify``: recompute cached samples with the teacher, in the precision each shard was made with
(float32, or bfloat16 autocast), compare them with the cache and give a verdict.

A level passes when its worst token cosine is at least its tolerance: the fidelity extraction recorded for the
level's lossy storage (float16, int8, low rank; 1 for float32), less an allowance for recomputing (another
machine, thread count or kernel changes the last bits; bfloat16 autocast changes more). Logits pass within a
relative allowance of their largest magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from apmpipe.storage.cache import FeatureCache
from apmpipe.storage.describe import recorded_fidelity
from apmpipe.storage.errors import AT_LEAST_ONE, CacheError, ModelError, check_ranges
from apmpipe.storage.redact import redact_url

from .teacher import Teacher, TeacherConfig
from .token_metrics import min_token_cosine

RECOMPUTE_ALLOWANCE = {"float32": 1e-4, "bfloat16-autocast": 1e-2}  # cosine lost to recomputing, by precision
LOGITS_ALLOWANCE = {"float32": 1e-3, "bfloat16-autocast": 5e-2}  # max |diff| relative to the largest |logit|


@dataclass
class VerifyReport:
    """Worst differences between cached and recomputed outputs over the checked samples, with the verdict."""

    samples: int
    levels: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> max_abs, min_cosine, tolerance
    logits_max_abs: float | None = None
    logits_tolerance: float | None = None
    precision: str = ""  # the precisions recomputed in, comma-separated

    @property
    def failures(self) -> list[str]:
        """One phrase per check that failed (empty: the cache passes)."""
        out = [
            f"layer {layer} min cosine {s['min_cosine']:.6f} < {s['tolerance']:.6f}"
            for layer, s in self.levels.items()
            if s["min_cosine"] < s["tolerance"]
        ]
        if (
            self.logits_max_abs is not None
            and self.logits_tolerance is not None
            and self.logits_max_abs > self.logits_tolerance
        ):
            out.append(f"logits max |diff| {self.logits_max_abs:.3g} > {self.logits_tolerance:.3g}")
        return out


def _pick(cache: FeatureCache, count: int) -> list[tuple[str, int]]:
    """``count`` (shard, index) pairs spread evenly over all complete shards."""
    positions = [(name, i) for name, count in cache.sample_counts().items() for i in range(count)]
    if not positions:
        raise CacheError(f"cache {redact_url(cache.url)!r} has no complete shard to verify; run apmpipe extract first")
    picks = np.linspace(0, len(positions) - 1, num=min(count, len(positions))).round().astype(int)
    return [positions[i] for i in sorted(set(picks.tolist()))]


def rebuild_teacher(cache: FeatureCache, device: str = "auto", checkpoint: str | None = None) -> Teacher:
    """The teacher that made ``cache`` (float32), rebuilt from its recorded build; its weights checked by hash."""
    build = cache.attrs.get("teacher_build")
    if not build:
        raise CacheError(
            f"cache {redact_url(cache.url)!r} does not record how its teacher was built; it cannot be verified"
        )
    config = TeacherConfig.from_dict({**build, "checkpoint": checkpoint or build.get("checkpoint")})
    spec = cache.spec
    teacher = Teacher(
        config, tuple(level.layer for level in spec.levels), final_norm=spec.final_norm, device=device, amp=False
    )
    if teacher.weights_sha256 != spec.teacher["weights_sha256"]:
        raise ModelError(
            f"the rebuilt teacher's weights differ from those that made {redact_url(cache.url)!r}; pass the original "
            "weights with --checkpoint"
        )
    return teacher


def verify_cache(
    url: str, samples: int = 8, device: str = "auto", checkpoint: str | None = None, storage_options: dict | None = None
) -> VerifyReport:
    """Rebuild the cache's teacher (same weights, checked by hash) and recompute ``samples`` cached samples."""
    check_ranges({"samples": samples}, {"samples": AT_LEAST_ONE})
    cache = FeatureCache.open(url, storage_options=storage_options)
    teacher, spec = rebuild_teacher(cache, device, checkpoint), cache.spec
    report = VerifyReport(samples=0)
    shard_attrs = cache.shard_attrs()
    precision = {name: attrs.get("precision", "float32") for name, attrs in shard_attrs.items()}
    stored = {layer: s["cosine_min"] for layer, s in recorded_fidelity(cache, shard_attrs)["levels"].items()}
    picks = _pick(cache, samples)
    allowance = max(
        RECOMPUTE_ALLOWANCE.get(precision[name], RECOMPUTE_ALLOWANCE["bfloat16-autocast"]) for name, _ in picks
    )
    logits_allowance = max(
        LOGITS_ALLOWANCE.get(precision[name], LOGITS_ALLOWANCE["bfloat16-autocast"]) for name, _ in picks
    )
    logits_scale = 0.0
    for name, index in picks:
        cached = cache.read(name, index, index + 1)
        tokens, logits = teacher.forward(torch.from_numpy(cached.pixels), amp=precision[name] == "bfloat16-autocast")
        for level, ref, new in zip(spec.levels, cached.tokens, tokens, strict=True):
            stats = report.levels.setdefault(
                str(level.layer),
                {"max_abs": 0.0, "min_cosine": 1.0, "tolerance": stored.get(str(level.layer), 1.0) - allowance},
            )
            new = new.cpu().numpy()
            stats["max_abs"] = max(stats["max_abs"], float(np.abs(ref - new).max()))
            stats["min_cosine"] = min(stats["min_cosine"], min_token_cosine(ref, new))
        if logits is not None and cached.logits is not None:
            diff = float(np.abs(cached.logits - logits.cpu().numpy()).max())
            report.logits_max_abs = max(report.logits_max_abs or 0.0, diff)
            logits_scale = max(logits_scale, float(np.abs(cached.logits).max()))
            report.logits_tolerance = logits_allowance * max(logits_scale, 1.0)
        report.samples += 1
    report.precision = ", ".join(sorted({precision[name] for name, _ in picks}))
    return report
