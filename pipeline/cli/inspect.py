"""``apmpipe info`` and ``apmpipe verify``: describing a cache, and checking it against its teacher or its bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from apmpipe.storage.errors import ConfigError

from .. import render
from ..console import out_console
from .options import ApmTyper, DeviceOption, StorageOptions, parse_storage_options

app = ApmTyper()


@app.command()
def info(
    ctx: typer.Context,
    cache: Annotated[str, typer.Argument(help="Feature cache path or URL.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
    sizes: Annotated[
        bool,
        typer.Option(
            "--sizes", help="Also measure bytes on disk and compression (lists every file: slow on object stores)."
        ),
    ] = False,
    storage_option: StorageOptions = None,
) -> None:
    """Describe a feature cache.

    Teacher, layers, shapes, shards, samples, precision, bad samples (sizes with --sizes)."""
    from apmpipe.storage.cache import FeatureCache
    from apmpipe.storage.describe import describe

    cache_options = parse_storage_options(storage_option)
    desc = describe(FeatureCache.open(cache, storage_options=cache_options), sizes=sizes)
    if as_json:
        out_console.print_json(json.dumps(desc))
    else:
        render.cache_description(desc, sizes)


@app.command()
def verify(
    ctx: typer.Context,
    cache: Annotated[str, typer.Argument(help="Feature cache path or URL.", show_default=False)],
    samples: Annotated[int, typer.Option(help="Number of cached samples to recompute.")] = 8,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Teacher weights, if not where extraction found them.")
    ] = None,
    device: DeviceOption = "auto",
    integrity: Annotated[
        bool,
        typer.Option(
            "--integrity",
            help="Instead, read every stored chunk of every array (checksums verified; no teacher) and list the "
            "damaged ones.",
        ),
    ] = False,
    shard: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME", help="With --integrity: the shard group to check (repeatable; default: every complete one)."
        ),
    ] = None,
    storage_option: StorageOptions = None,
) -> None:
    """Recompute cached samples with the teacher: pass or fail.

    Each sample is recomputed in the precision its shard was made with; the verdict compares the worst
    difference with a tolerance for that precision and storage dtype (exit 1 on fail). --integrity checks
    the stored bytes instead (exit 1 when a chunk is damaged)."""
    cache_options = parse_storage_options(storage_option)
    if integrity:
        from apmpipe.storage.integrity import check_integrity

        checked = check_integrity(cache, shard or (), storage_options=cache_options)
        render.integrity_report(checked)
        if checked.damaged:
            raise typer.Exit(1)
        return
    if shard:
        raise ConfigError("--shard chooses the shard groups of --integrity; add --integrity or leave it out")
    from apmpipe.stages.verify import verify_cache

    weights = str(checkpoint) if checkpoint else None
    report = verify_cache(cache, samples=samples, device=device, checkpoint=weights, storage_options=cache_options)
    render.verify_report(report)
    if report.failures:
        raise typer.Exit(1)
