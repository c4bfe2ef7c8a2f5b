"""``apmpipe extract``: stage one's options, and where its shards run (this process or a dask cluster)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import render
from ..console import ShardProgress
from .options import (
    ApmTyper,
    Codec,
    DeviceOption,
    ModelArgs,
    StorageOptions,
    TokenDtype,
    parse_int_list,
    parse_key_values,
    parse_number_list,
    parse_storage_options,
    parse_views,
    stage_options,
)

app = ApmTyper()


class PixelCodec(StrEnum):
    raw = "raw"
    png = "png"
    webp = "webp"
    jpeg = "jpeg"


@app.command()
def extract(
    ctx: typer.Context,
    sources: Annotated[
        list[str],
        typer.Argument(
            help="WebDataset shards (.tar/.tar.gz/.tgz, brace patterns, globs, a directory; local or fsspec "
            "URLs) or an image folder root/<class>/<file>.",
            show_default=False,
        ),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="Feature cache to create or complete (local path or fsspec URL).", show_default=False
        ),
    ],
    teacher: Annotated[
        str,
        typer.Option(
            "--teacher", "-t", help="timm model name, hf-hub:org/repo or local-dir:/path.", show_default=False
        ),
    ],
    layers: Annotated[
        str, typer.Option(help="Teacher blocks to cache, 1-based; negative counts from the end (-1 = last).")
    ] = "-1",
    pretrained: Annotated[
        bool, typer.Option("--pretrained/--no-pretrained", help="Load the teacher's pretrained weights.")
    ] = True,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Teacher state dict (.safetensors, or .pth loaded with weights_only).")
    ] = None,
    model_arg: ModelArgs = None,
    seed: Annotated[int, typer.Option(help="Seed for a random-init teacher.")] = 0,
    final_norm: Annotated[
        bool, typer.Option("--final-norm/--no-final-norm", help="Apply the teacher's final norm to every cached level.")
    ] = False,
    dtype: Annotated[
        TokenDtype, typer.Option(help="Token storage dtype; int8 is per-token scaled and its fidelity is reported.")
    ] = TokenDtype.float16,
    codec: Annotated[
        Codec | None,
        typer.Option(
            help="Compressors: blosc-lz4 (float tokens bit-shuffled LZ4, other arrays zstd), zstd, or none "
            "(keys, moments, bases and head arrays: zstd whatever the codec). Default: the existing cache's, else "
            "blosc-lz4.",
            show_default=False,
        ),
    ] = None,
    rank: Annotated[
        int,
        typer.Option(
            help="Store tokens as this many coefficients of one PCA basis per level, fitted at extraction (0: "
            "whole tokens); fidelity is reported."
        ),
    ] = 0,
    pixel_codec: Annotated[
        PixelCodec,
        typer.Option(
            help="Pixels as uint8 arrays (raw) or one PNG / lossless WebP / JPEG (lossy, PSNR reported) per sample."
        ),
    ] = PixelCodec.raw,
    views: Annotated[
        str,
        typer.Option(
            help="Store each image as this many views, each with the teacher's own tokens and logits: view 0 the "
            "image, the others drawn by --view-augment from the image's key (train draws one view per image per "
            "epoch; eval scores view 0). auto: enough for 32,768 samples, at most 32 views, when the inputs hold "
            "fewer images (counted first), else 1; a cache you only evaluate on wants 1."
        ),
    ] = "auto",
    view_augment: Annotated[
        str, typer.Option(help="The views' augmentations, comma-separated: flip, crop [default: crop].")
    ] = "",
    view_crop_scale: Annotated[
        str, typer.Option(help="With --view-augment crop: MIN,MAX share of the image's area a view's crop covers.")
    ] = "0.35,1",
    batch_size: Annotated[int, typer.Option(help="Images per teacher forward (times --views).")] = 32,
    loader_workers: Annotated[
        int,
        typer.Option(
            help="DataLoader processes decoding images (0: in the main process; -1: 1 beside a CPU teacher, "
            "up to 8 for a GPU)."
        ),
    ] = -1,
    chunk_samples: Annotated[int, typer.Option(help="Samples per zarr chunk (unit of a read).")] = 16,
    shard_samples: Annotated[
        int, typer.Option(help="Samples per zarr shard file (unit of a write); a multiple of --chunk-samples.")
    ] = 256,
    label_key: Annotated[
        str,
        typer.Option(
            help="WebDataset field with the label, or FIELD:PATH into a JSON field, e.g. json:label or json:meta.class."
        ),
    ] = "cls",
    class_names: Annotated[
        str | None,
        typer.Option(
            help="Text file of class names, one per line (label = line number), for tar shards whose labels are names."
        ),
    ] = None,
    no_labels: Annotated[bool, typer.Option("--no-labels", help="Ignore labels (all stored as -1).")] = False,
    max_pixels: Annotated[
        int | None,
        typer.Option(
            help="Skip images with more pixels than this, checked before decoding [default: 64,000,000].",
            show_default=False,
        ),
    ] = None,
    folder_block: Annotated[int, typer.Option(help="Images per shard group when reading an image folder.")] = 1000,
    device: DeviceOption = "auto",
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="bfloat16 autocast on CUDA.")] = True,
    workers: Annotated[
        int, typer.Option(help="Run shards on a local dask cluster of N worker processes (0: in this process).")
    ] = 0,
    scheduler: Annotated[
        str | None, typer.Option(help="Run shards on an existing dask scheduler, e.g. tcp://10.0.0.5:8786.")
    ] = None,
    scheduler_file: Annotated[
        Path | None, typer.Option(help="Dask scheduler file (dask scheduler --scheduler-file).")
    ] = None,
    resources: Annotated[
        list[str] | None,
        typer.Option(
            "--resources",
            metavar="KEY=VALUE",
            help="Dask resources each task needs (repeatable), e.g. GPU=1.",
        ),
    ] = None,
    storage_option: StorageOptions = None,
) -> None:
    """Run a timm teacher once over image shards into a feature cache.

    The cache is a resumable Zarr v3 group: rerunning the command completes it."""
    from apmpipe.stages.extract_config import AUTO_RENDERS, ExtractConfig, preflight  # no torch yet: fail fast

    options = stage_options(
        ctx,
        "sources",
        "out",
        "teacher",
        "layers",
        "model_arg",
        "class_names",
        "storage_option",
        "views",
        "view_augment",
        "view_crop_scale",
        *RUN_ON,
    )
    config = ExtractConfig.from_options(
        sources,
        out,
        teacher,
        layers=parse_int_list(layers, "--layers"),
        model_kwargs=parse_key_values(model_arg, "--model-arg"),
        class_names_file=class_names,
        storage_options=parse_storage_options(storage_option),
        view_augment=tuple(name for name in view_augment.replace(" ", "").split(",") if name),
        views=parse_views(views),
        view_crop_scale=parse_number_list(view_crop_scale, "--view-crop-scale", float, "0.35,1"),
        **options,
    )
    inputs = preflight(config)
    from apmpipe.stages.extract import extract as run_extract

    runner = _shard_runner(workers, scheduler, scheduler_file, resources)
    with ShardProgress() as progress:  # beside remote workers the driver's teacher (spec, head check) stays on the CPU
        driver = "cpu" if runner else None
        summary = run_extract(
            config,
            progress=progress,
            runner=runner,
            on_plan=progress.plan,
            on_count=lambda: render.counting_images(AUTO_RENDERS),
            driver_device=driver,
            inputs=inputs,
        )
    render.extract_summary(summary)
    if summary.count("failed") or summary.nothing_stored:
        raise typer.Exit(1)


RUN_ON = ("workers", "scheduler", "scheduler_file", "resources")  # where extract runs, not what it makes


def _shard_runner(workers: int, scheduler: str | None, scheduler_file: Path | None, resources: list[str] | None) -> Any:
    """A dask runner when any of --workers/--scheduler/--scheduler-file is given, else None (this process)."""
    if not (workers or scheduler or scheduler_file):
        return None
    from ..cluster import dask_runner

    needs = parse_key_values(resources, "--resources") or None
    return dask_runner(workers, scheduler, str(scheduler_file) if scheduler_file else None, needs)
