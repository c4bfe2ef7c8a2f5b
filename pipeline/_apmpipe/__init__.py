"""apmpipe: feature-cache distillation for the Asynchronous Perception Machine.

This file is installed as the top-level ``apmpipe`` package (pyproject.toml maps it from
``pipeline/_apmpipe/``; the repository's three folders install as ``apmpipe.pipeline``, ``apmpipe.stages`` and
``apmpipe.storage``). It holds the public Python API, loaded on first use so that ``import apmpipe`` (and the
command line, which lives inside it) stays light:

- :func:`extract`: run a timm teacher once over image shards into a feature cache (stage one);
- :func:`train`: train the APM student from feature caches, never loading the teacher (stage two);
- :func:`evaluate`: fidelity, classification beside the teacher and test-time training (stage three);
- :func:`embed`: a trained student's features (and teacher-head classes) for new images, for retrieval;
- :class:`FeatureCache`: the cache reader (``FeatureCache.open(url)``);
- :class:`CacheStream`: the streaming dataset of cached pixels, tokens and labels (batches for apmpipe's loop);
- :class:`CacheIterableDataset`, :class:`CacheMapDataset`: cached samples for your own PyTorch loop (streaming
  and resumable with torchdata's ``StatefulDataLoader``, or by index).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "CacheIterableDataset",
    "CacheMapDataset",
    "CacheStream",
    "FeatureCache",
    "embed",
    "evaluate",
    "extract",
    "train",
]

_HOMES = {
    "extract": "apmpipe.pipeline.api",
    "train": "apmpipe.pipeline.api",
    "evaluate": "apmpipe.pipeline.api",
    "embed": "apmpipe.pipeline.api",
    "FeatureCache": "apmpipe.storage.cache",
    "CacheStream": "apmpipe.storage.stream",
    "CacheIterableDataset": "apmpipe.storage.dataset",
    "CacheMapDataset": "apmpipe.storage.dataset",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'apmpipe' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
