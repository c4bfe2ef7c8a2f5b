"""A trained student on disk: loading it with its metadata and checking that it fits a cache."""

from __future__ import annotations

from typing import Any

import torch

from apmpipe.storage.cache import FeatureCache
from apmpipe.storage.checkpoint import load_student
from apmpipe.storage.errors import CacheError, ModelError
from apmpipe.storage.redact import redact_url

from .apm import APM, APMConfig
from .objectives import LossConfig


def load_model(
    path: str, device: torch.device, storage_options: dict[str, Any] | None = None
) -> tuple[APM, dict[str, Any]]:
    """The exported student (run directory or ``student.safetensors``, local or URL) in eval mode, and its metadata."""
    weights, metadata = load_student(path, storage_options)
    model = APM(APMConfig.from_dict(metadata["model_config"]))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise ModelError(
            f"student {redact_url(path)!r} was saved by another apmpipe version ({detail[:120]}); retrain it with "
            "apmpipe train"
        ) from None
    return model.to(device).eval(), metadata


def loss_config_of(metadata: dict[str, Any]) -> LossConfig:
    """The objective the student was trained with (test-time training reuses it)."""
    return LossConfig.from_dict(metadata.get("loss_config", {}))


def cache_for_student(metadata: dict[str, Any], cache: FeatureCache, what: str) -> FeatureCache:
    """The view of ``cache`` holding the levels the student was trained on (``train --levels``); refuses a student
    trained on another teacher, input or layers than ``cache`` holds."""
    layers = [level["layer"] for level in metadata["layout"]["levels"]]
    cached = [level.layer for level in cache.spec.levels]
    if not set(layers) <= set(cached):
        raise CacheError(
            f"the student was trained on teacher layers {','.join(map(str, layers))} but {what} "
            f"{redact_url(cache.url)!r} "
            f"holds layers {','.join(map(str, cached))}; use a cache extracted with those layers"
        )
    view = cache.select_levels(layers)
    view.spec.check_layout(metadata["layout"], f"the student's teacher layout and {what} {redact_url(cache.url)!r}")
    return view
