"""``apmpipe bench ...``: each benchmark's options (the measuring lives in ``pipeline/bench/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from apmpipe.storage.errors import check_ranges

from .. import render
from .options import (
    DEFAULT_CODEC_CHOICE,
    ApmTyper,
    BenchLayers,
    Codec,
    DeviceOption,
    ModelArgs,
    Preset,
    StorageOptions,
    TokenDtype,
    parse_int_list,
    parse_key_values,
    parse_number_list,
    parse_storage_options,
    stage_options,
)

app = ApmTyper(
    help="Measure throughput side by side in one run and print ratios.", no_args_is_help=True, rich_markup_mode=None
)


@app.command("extract")
def bench_extract_command(
    ctx: typer.Context,
    sources: Annotated[
        list[str] | None,
        typer.Argument(help="Shards to extract (default: bundled digits written as shards).", show_default=False),
    ] = None,
    teacher: Annotated[str, typer.Option(help="timm model name.")] = "vit_tiny_patch16_224",
    pretrained: Annotated[
        bool, typer.Option("--pretrained/--no-pretrained", help="Load pretrained weights (not needed for speed).")
    ] = False,
    model_arg: ModelArgs = None,
    layers: Annotated[str, typer.Option(help="Teacher blocks to cache, 1-based.")] = "4,8,12",
    images: Annotated[int, typer.Option(help="Images in the default dataset.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 32,
    loader_workers: Annotated[int, typer.Option(help="DataLoader processes (-1: auto, as in extract).")] = -1,
    dtype: Annotated[TokenDtype, typer.Option(help="Token storage dtype.")] = TokenDtype.float16,
    codec: Annotated[Codec, typer.Option(help="Compressors (as extract --codec).")] = DEFAULT_CODEC_CHOICE,
    device: DeviceOption = "auto",
) -> None:
    """Extraction speed beside the bare teacher forward.

    Extraction img/s vs bare forward_intermediates img/s (same teacher, batch, device); target ratio >= 0.95."""
    from apmpipe.stages.extract_config import ExtractConfig

    from ..bench.caches import default_bench_shards, scratch_dir
    from ..bench.extract import bench_extract

    options = stage_options(ctx, "sources", "teacher", "layers", "model_arg", "images")
    with scratch_dir() as tmp:
        config = ExtractConfig.from_options(
            sources or default_bench_shards(Path(tmp), images, 64),
            str(Path(tmp) / "bench.zarr"),
            teacher,
            layers=parse_int_list(layers, "--layers"),
            model_kwargs=parse_key_values(model_arg, "--model-arg"),
            views=1,  # the teacher's img/s over images as they are
            **options,
        )
        result = bench_extract(config)
    render.bench_extract(result, config)


@app.command("train")
def bench_train_command(
    ctx: typer.Context,
    teacher: Annotated[
        str, typer.Option(help="timm model for the cache and the online baseline (random init).")
    ] = "vit_small_patch16_224",
    model_arg: ModelArgs = None,
    layers: BenchLayers = "4,8,12",
    images: Annotated[int, typer.Option(help="Bundled digit images in the cache.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    preset: Annotated[Preset, typer.Option(help="Student size.")] = Preset.small,
    loader_workers: Annotated[
        int, typer.Option(help="DataLoader processes (0: read in the training process, as train's default).")
    ] = 0,
    growth: Annotated[int, typer.Option(help="Cache growth factor for the peak-RSS check (1: skip it).")] = 10,
    locations: Annotated[
        int, typer.Option(help="Random grid locations per image per step (K), beside the all-locations rate.")
    ] = 64,
    echo: Annotated[int, typer.Option(help="Steps per loaded sample (as apmpipe train --echo).")] = 1,
    student_rate: Annotated[
        float, typer.Option(help="A student rate (samples/s, e.g. measured on a GPU) to size the loader for.")
    ] = 0.0,
    dtype: Annotated[
        TokenDtype, typer.Option(help="Token storage of the bench cache (as extract --dtype).")
    ] = TokenDtype.float16,
    rank: Annotated[
        int, typer.Option(help="Low-rank token storage of the bench cache (as extract --rank; 0: whole tokens).")
    ] = 0,
    codec: Annotated[
        Codec, typer.Option(help="Compressors of the bench cache (as extract --codec).")
    ] = DEFAULT_CODEC_CHOICE,
    compile: Annotated[
        bool, typer.Option("--compile/--no-compile", help="Compile the student step (as train --compile) everywhere.")
    ] = False,
    online_batch_sizes: Annotated[
        str | None,
        typer.Option(
            help="Batch sizes to time online distillation at, its best counts (default: the batch; on CUDA "
            "also 2x and 4x)."
        ),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the measured figures to this JSON file.")
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """Training speed: loader, student, cached vs online.

    Bytes per trained sample, loader vs student samples/s, cached vs online trained samples/s (online: its teacher
    in autocast on CUDA, fused attention, channels_last, its best batch), peak RSS (one run)."""
    from ..bench.caches import scratch_dir
    from ..bench.train import bench_train

    resolved = device if device != "auto" else ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    options = stage_options(ctx)
    storage = {"dtype": dtype.value, "rank": rank, "codec": codec.value}
    with scratch_dir() as tmp:
        sizes = (images, batch_size, preset.value, loader_workers, resolved, growth, locations, echo)
        result = bench_train(
            Path(tmp),
            teacher,
            *sizes,
            storage,
            layers=parse_int_list(layers, "--layers"),
            model_kwargs=parse_key_values(model_arg, "--model-arg"),
            compile=compile,
            online_batches=parse_int_list(online_batch_sizes, "--online-batch-sizes") if online_batch_sizes else (),
        )
    render.bench_train(result, options)
    if json_out:
        from ..report import report_json

        json_out.write_text(report_json(result.to_dict()))


@app.command("pipeline")
def bench_pipeline_command(
    cache: Annotated[
        str | None, typer.Option(help="Cache URL to measure; default: build a ViT-B/16-shaped float16 one.")
    ] = None,
    teacher: Annotated[
        str, typer.Option(help="timm model for the built cache (random init, float16).")
    ] = "vit_base_patch16_224",
    model_arg: ModelArgs = None,
    layers: BenchLayers = "4,8,12",
    images: Annotated[int, typer.Option(help="Bundled digit images in the built cache.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    window_samples: Annotated[int, typer.Option(help="Samples per loaded window (as train --window-samples).")] = 128,
    echo: Annotated[int, typer.Option(help="Steps per loaded sample (as train --echo).")] = 1,
    locations: Annotated[int, typer.Option(help="Random grid locations per image per step (K).")] = 64,
    preset: Annotated[Preset, typer.Option(help="Student size.")] = Preset.small,
    old_workers: Annotated[int, typer.Option(help="DataLoader processes of the old path.")] = 2,
    student_rate: Annotated[
        float, typer.Option(help="A student rate (samples/s, e.g. measured on a GPU) to size the loader for.")
    ] = 0.0,
    storage_option: StorageOptions = None,
    device: DeviceOption = "auto",
) -> None:
    """The training data path stage by stage, old beside new.

    Storage read, read + decode, windows to the main process, pinning, host->device copy, gather / echo / rebuild
    on the device, student step, end to end (samples/s, GB/s, samples per CPU second); the limiting stage and the
    loader cores a student needs (one run)."""
    from ..bench.caches import scratch_dir
    from ..bench.pipeline import RANGES, bench_pipeline

    options = {"images": images, "batch_size": batch_size, "window_samples": window_samples, "echo": echo}
    check_ranges({**options, "locations": locations, "old_workers": old_workers, "student_rate": student_rate}, RANGES)
    resolved = device if device != "auto" else ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    with scratch_dir() as tmp:
        result = bench_pipeline(
            Path(tmp),
            cache,
            teacher,
            images,
            batch_size,
            window_samples,
            echo,
            locations,
            preset.value,
            resolved,
            old_workers,
            parse_storage_options(storage_option),
            model_kwargs=parse_key_values(model_arg, "--model-arg"),
            layers=parse_int_list(layers, "--layers"),
        )
    render.bench_pipeline(result, student_rate)


@app.command("ablation")
def bench_ablation_command(
    ctx: typer.Context,
    workdir: Annotated[
        Path, typer.Option(help="Folder for the trained teacher, caches and runs (reused on reruns).")
    ] = Path("bench-ablation"),
    steps: Annotated[int, typer.Option(help="Training steps of every run (--min-steps).")] = 1500,
    only: Annotated[
        list[str] | None, typer.Option(metavar="WORD", help="Run only the rows whose name contains WORD (repeatable).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split, teacher and every student.")] = 0,
) -> None:
    """Each training objective switched off in turn.

    On the demo's trained teacher: held-out R2 and teacher-head top-1."""
    from ..bench.ablation import bench_ablation

    teacher, rows = bench_ablation(workdir, steps, seed, only)
    render.bench_ablation(teacher, rows, steps)


@app.command("bytes")
def bench_bytes_command(
    workdir: Annotated[
        Path, typer.Option(help="Folder for the trained teacher, caches and runs (reused on reruns).")
    ] = Path("bench-bytes"),
    steps: Annotated[int, typer.Option(help="Training steps of every run (--min-steps).")] = 4000,
    only: Annotated[
        list[str] | None,
        typer.Option(
            metavar="WORD", help="Run only the plans whose name contains WORD (repeatable); the default always runs."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split, teacher and every student.")] = 0,
) -> None:
    """Bytes read per trained sample vs held-out fidelity.

    On the demo's trained teacher, each plan (int8, low rank, echo, --levels) beside the float16 default: patch
    cosine per level, head top-1."""
    from ..bench.bytes import bench_bytes

    teacher, rows = bench_bytes(workdir, steps, seed, only)
    render.bench_bytes(teacher, rows, steps, workdir / "bench-bytes.json")


@app.command("augment")
def bench_augment_command(
    workdir: Annotated[
        Path, typer.Option(help="Folder for the trained teacher and caches (shared with bench ablation).")
    ] = Path("bench-ablation"),
    crop_scale: Annotated[
        str, typer.Option(help="MIN,MAX area share of the crops (as train --crop-scale).")
    ] = "0.08,1",
    seed: Annotated[int, typer.Option(help="Seed of the split, teacher and crops.")] = 0,
    cache: Annotated[
        str | None,
        typer.Option(help="Measure on this (held-out) cache with a stored head instead; its teacher is rebuilt."),
    ] = None,
) -> None:
    """Augmented targets vs the teacher on augmented images.

    On the demo's trained teacher and held-out digits (or --cache): cosine of the flipped / cropped cached tokens
    to the teacher's tokens on the flipped / cropped images, per level, beside the un-augmented tokens."""
    from apmpipe.stages.augment import check_crop_scale

    from ..bench.augment import bench_augment

    scale = parse_number_list(crop_scale, "--crop-scale", float, "0.08,1")
    check_crop_scale(scale)
    teacher, rows = bench_augment(workdir, seed, scale, cache)
    render.bench_augment(teacher, rows, scale)


@app.command("codecs")
def bench_codecs_command(
    cache: Annotated[str, typer.Argument(help="A cache (local or URL); its first complete shard is measured.")],
    samples: Annotated[
        int, typer.Option(help="Samples of that shard to compress, in whole chunks (at least one).")
    ] = 256,
    storage_option: StorageOptions = None,
) -> None:
    """Every --codec on a cache's tokens and pixels, side by side.

    Stored bytes per sample, encode and decode MB/s per array as extract writes and the loader reads them, and
    per sample over all arrays: choose extract --codec for your teacher's tokens."""
    from ..bench.codecs import bench_codecs

    render.bench_codecs(bench_codecs(cache, samples, parse_storage_options(storage_option)))
