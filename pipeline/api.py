"""The public Python API (re-exported as ``apmpipe.extract``, ``apmpipe.train``, ``apmpipe.evaluate``,
``apmpipe.embed``): one call per stage, keyword options named as on the command line, each building the stage's
frozen config and running it.

Bad input raises :class:`apmpipe.storage.errors.ApmError` (a one-line message) as the CLI's would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from apmpipe.stages.extract_config import ExtractConfig

if TYPE_CHECKING:  # the stages themselves load torch: imported when called
    from apmpipe.stages.embed import EmbedSummary
    from apmpipe.stages.extract import ExtractSummary
    from apmpipe.stages.train import TrainSummary


def extract(
    inputs: Sequence[str] | str,
    out: str,
    teacher: str,
    **options: Any,
) -> ExtractSummary:
    """Run stage one: ``teacher`` (a timm name) over ``inputs`` (WebDataset shards or an image folder) into the
    feature cache ``out``; rerunning completes an interrupted cache.

    Args:
        inputs: shard paths/URLs/patterns, or one image-folder root.
        out: the cache to create or complete (local path or fsspec URL).
        teacher: a timm model name, ``hf-hub:org/repo`` or ``local-dir:/path``.
        options: the teacher's ``pretrained``, ``checkpoint``, ``model_kwargs`` (dict), ``seed``, and any
            :class:`ExtractConfig` field, e.g. ``layers=(4, 8, 12)``, ``dtype="int8"`` (see
            :meth:`ExtractConfig.from_options`).

    Returns:
        The :class:`apmpipe.stages.extract.ExtractSummary` (shards done, images, bytes, fidelity).
    """
    from apmpipe.stages.extract import extract as run_extract

    return run_extract(ExtractConfig.from_options(inputs, out, teacher, **options))


def train(caches: Sequence[str] | str, out: str, **options: Any) -> TrainSummary:
    """Run stage two: train the APM student on ``caches`` into the run directory ``out``.

    Args:
        caches: feature caches written by :func:`extract` (one teacher).
        out: run directory (checkpoints, metrics.jsonl, student.safetensors).
        options: any ``apmpipe train`` option by its Python name, loss weights included, e.g. ``preset="tiny"``,
            ``max_steps=200``, ``logit_weight=0.0`` (checked as :meth:`TrainConfig.from_options` does).

    Returns:
        The :class:`apmpipe.stages.train.TrainSummary` (student path, steps, losses, throughput).
    """
    from apmpipe.stages.train import TrainConfig
    from apmpipe.stages.train import train as run_train

    urls = (caches,) if isinstance(caches, str) else tuple(caches)
    return run_train(TrainConfig.from_options({"caches": urls, "out": out, **options}))


def evaluate(cache: str, student: str, **options: Any) -> dict[str, Any]:
    """Run stage three: the student in ``student`` (a run directory or student.safetensors) on ``cache``.

    Args:
        options: any other :class:`apmpipe.stages.evaluate.EvalConfig` field, e.g. ``train_cache=...``
            (k-NN and a linear probe), ``ttt_steps=20``, ``max_samples=500``.

    Returns:
        The report: fidelity per level beside the mean-token baseline, classification beside the teacher, TTT.
    """
    from apmpipe.stages.evaluate import EvalConfig
    from apmpipe.stages.evaluate import evaluate as run_evaluate

    return run_evaluate(EvalConfig(cache=cache, student=student, **options))


def embed(inputs: Sequence[str] | str, out: str, student: str, **options: Any) -> EmbedSummary:
    """Run the student in ``student`` (no teacher) over new images into the embedding folder ``out``; rerunning
    completes it.

    Args:
        inputs: as :func:`extract` reads them (shards, patterns, ``pipe:`` commands, an image-folder root).
        options: ``no_labels``, ``class_names_file``, and any :class:`apmpipe.stages.embed.EmbedConfig` field, e.g.
            ``feature="mean-patch"``, ``tokens=True``, ``head_cache=...``.

    Returns:
        The :class:`apmpipe.stages.embed.EmbedSummary` (parts, levels and their features, the head used).
    """
    from apmpipe.stages.embed import EmbedConfig
    from apmpipe.stages.embed import embed as run_embed

    sources = (inputs,) if isinstance(inputs, str) else tuple(inputs)
    return run_embed(EmbedConfig.from_options(sources, out, student, **options))
