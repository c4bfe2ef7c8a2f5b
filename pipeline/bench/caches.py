"""The scratch caches benches measure on: bundled digits through a random-init teacher, in a temporary folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

from apmpipe.stages.extract import ExtractConfig
from apmpipe.stages.teacher import TeacherConfig

from ..datasets import write_digit_shards


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="apmpipe-bench-")


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
    (random init, ``model_kwargs``) at ``layers``; ``options``: other :class:`ExtractConfig` fields (one view
    unless ``views`` is given: a bench measures what it names)."""
    return ExtractConfig(
        inputs=tuple(default_bench_shards(workdir, images, 64)),
        out=str(workdir / "bench.zarr"),
        teacher=TeacherConfig(teacher, pretrained=False, model_kwargs=tuple(sorted((model_kwargs or {}).items()))),
        layers=layers,
        **{"views": 1, **options},
    )


def grow_cache(url: str, factor: int) -> None:
    """Make a cache ``factor`` times larger by copying its complete shard groups under new names (bench only)."""
    from apmpipe.storage.cache import FeatureCache

    cache = FeatureCache.open(url, mode="r+")
    originals = list(cache.shard_status())
    for k in range(1, factor):
        for name in originals:
            cache.copy_shard(name, f"{name}-copy{k}")
