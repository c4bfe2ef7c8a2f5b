"""``apmpipe embed``: a trained student's features of new images."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from .. import render
from ..console import ShardProgress
from .options import ApmTyper, DeviceOption, StorageOptions, parse_storage_options, stage_options

app = ApmTyper()


class GlobalFeature(StrEnum):
    pooled = "pooled"
    cls = "cls"
    mean_patch = "mean-patch"


class EmbedDtype(StrEnum):
    float16 = "float16"
    float32 = "float32"


@app.command()
def embed(
    ctx: typer.Context,
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Images to embed, as apmpipe extract reads them: WebDataset shards (.tar/.tar.gz/.tgz, brace "
            "patterns, globs, a directory, pipe:COMMAND; local or fsspec URLs) or an image folder root/<class>/<file>.",
            show_default=False,
        ),
    ],
    student: Annotated[
        str, typer.Option(help="Run directory (or student.safetensors) from apmpipe train.", show_default=False)
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", help="Local folder to create or complete (a part per input shard).", show_default=False
        ),
    ],
    feature: Annotated[
        GlobalFeature,
        typer.Option(
            help="Global feature per level: pooled (the teacher head's pre-logits; last level, with a head; other "
            "levels get cls, or mean-patch without prefix tokens), cls, mean-patch."
        ),
    ] = GlobalFeature.pooled,
    dtype: Annotated[EmbedDtype, typer.Option(help="Storage dtype of features and token grids.")] = EmbedDtype.float16,
    tokens: Annotated[
        bool, typer.Option("--tokens", help="Also write each level's full predicted token grid.")
    ] = False,
    topk: Annotated[int, typer.Option(help="Teacher-head classes kept per image (with a head).")] = 5,
    head_cache: Annotated[
        str | None,
        typer.Option(help="Cache whose stored teacher head gives logits (default: the student's training caches)."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per student forward.")] = 64,
    chunk: Annotated[int, typer.Option(help="Locations queried at once (bounds memory).")] = 256,
    loader_workers: Annotated[
        int, typer.Option(help="DataLoader processes decoding images (0: in the main process; -1: auto).")
    ] = -1,
    label_key: Annotated[
        str, typer.Option(help="WebDataset field with the label, or FIELD:PATH into a JSON field (as extract).")
    ] = "cls",
    class_names: Annotated[
        str | None, typer.Option(help="Text file of class names, one per line, for tar shards whose labels are names.")
    ] = None,
    no_labels: Annotated[bool, typer.Option("--no-labels", help="Ignore labels (all written as -1).")] = False,
    max_pixels: Annotated[
        int | None,
        typer.Option(help="Skip images with more pixels than this [default: 64,000,000].", show_default=False),
    ] = None,
    folder_block: Annotated[int, typer.Option(help="Images per part when reading an image folder.")] = 1000,
    device: DeviceOption = "auto",
    storage_option: StorageOptions = None,
) -> None:
    """Embed images with a trained student (no teacher).

    Per input shard: a global feature per level as .npy, optionally the token grids, teacher-head logits and
    top-k classes, and a parquet of keys and labels; a rerun completes the folder."""
    from apmpipe.stages.embed import EmbedConfig
    from apmpipe.stages.embed import embed as run_embed

    options = stage_options(ctx, "sources", "student", "out", "class_names", "storage_option")
    config = EmbedConfig.from_options(
        sources,
        out,
        student,
        class_names_file=class_names,
        storage_options=parse_storage_options(storage_option),
        **options,
    )
    with ShardProgress("embed", "embedded") as progress:
        summary = run_embed(config, progress)
    render.embed_summary(summary)
    if summary.count("failed"):
        raise typer.Exit(1)
