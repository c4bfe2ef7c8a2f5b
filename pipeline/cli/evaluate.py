"""``apmpipe eval`` and ``apmpipe islands``: stage three's options, a student judged on a cache and drawn."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from .. import render
from .options import ApmTyper, DeviceOption, StorageOptions, parse_storage_options, stage_options

app = ApmTyper()


ISLANDS_PNG = "islands.png"  # what apmpipe islands writes into its --out folder


class TTTStart(StrEnum):
    trained = "trained"
    scratch = "scratch"


class IslandsMode(StrEnum):
    pca = "pca"
    kmeans = "kmeans"


@app.command("eval")
def eval_command(
    ctx: typer.Context,
    cache: Annotated[str, typer.Argument(help="Evaluation feature cache.", show_default=False)],
    student: Annotated[
        str, typer.Option(help="Run directory (or student.safetensors) from apmpipe train.", show_default=False)
    ],
    train_cache: Annotated[
        str | None, typer.Option(help="Training cache: fits weighted k-NN and a linear probe on global features.")
    ] = None,
    class_embeddings: Annotated[
        Path | None,
        typer.Option(help="classes x dim .npy of text embeddings (CLIP zero-shot through the cached projection head)."),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="Report folder, local or URL (default: RUN_DIR/eval-<cache name>-<hash of its resolved URL>).",
        ),
    ] = None,
    feature: Annotated[
        str,
        typer.Option(help="Global feature for k-NN/probe: pooled (what the teacher's head reads), cls, mean-patch."),
    ] = "pooled",
    level: Annotated[int, typer.Option(help="Level (1-based, -1 = last) whose tokens give the global feature.")] = -1,
    batch_size: Annotated[int, typer.Option(help="Images per student forward.")] = 64,
    max_samples: Annotated[
        int, typer.Option(help="Evaluate a seeded random subset of N samples across all shards (0: all).")
    ] = 0,
    knn_k: Annotated[int, typer.Option(help="Neighbours for weighted k-NN.")] = 20,
    knn_temperature: Annotated[float, typer.Option(help="Temperature of k-NN vote weights exp(sim/T).")] = 0.07,
    ttt_steps: Annotated[int, typer.Option(help="Test-time training steps per sample (0: no TTT).")] = 0,
    ttt_lr: Annotated[float, typer.Option(help="TTT learning rate (AdamW, reset per sample).")] = 1e-4,
    ttt_locations: Annotated[int, typer.Option(help="Random locations per TTT step (0: all).")] = 0,
    ttt_from: Annotated[
        TTTStart, typer.Option(help="Start each sample's TTT from the trained student or from fresh weights.")
    ] = TTTStart.trained,
    ttt_samples: Annotated[
        int, typer.Option(help="Run TTT on a seeded random subset of N samples (0: as --max-samples).")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the sample subsets, the probe's split and TTT.")] = 0,
    device: DeviceOption = "auto",
    storage_option: StorageOptions = None,
) -> None:
    """Evaluate a student on a feature cache.

    Fidelity per level, classification beside the teacher, test-time training; terminal table, JSON, PNGs."""
    from apmpipe.stages.evaluate import EvalConfig, evaluate
    from apmpipe.storage.files import check_writable
    from apmpipe.storage.remote import staged_folder

    from ..report import eval_folder, write_eval_report

    options = stage_options(ctx, "out", "storage_option")
    config = EvalConfig(**options, storage_options=parse_storage_options(storage_option))
    folder = out or eval_folder(student, cache, config.storage_options)
    check_writable(folder)
    report = evaluate(config)
    with staged_folder(folder, config.storage_options) as staged:
        json_name = write_eval_report(report, staged).name
    render.eval_report(report, f"{folder.rstrip('/')}/{json_name}")


@app.command()
def islands(
    ctx: typer.Context,
    sources: Annotated[
        list[str], typer.Argument(help="A feature cache (student beside teacher) or image files.", show_default=False)
    ],
    student: Annotated[
        str, typer.Option(help="Run directory (or student.safetensors) from apmpipe train.", show_default=False)
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help=f"Folder for {ISLANDS_PNG} (created), as every --out; a path ending in .png names the file itself.",
        ),
    ] = Path("."),
    images: Annotated[int, typer.Option(help="Images to draw (rows).")] = 4,
    mode: Annotated[
        IslandsMode, typer.Option(help="pca: 3 principal components as RGB; kmeans: clusters as colours.")
    ] = IslandsMode.pca,
    clusters: Annotated[int, typer.Option(help="k-means clusters.")] = 6,
    panel: Annotated[int, typer.Option(help="Panel size in pixels.")] = 160,
    device: DeviceOption = "auto",
    storage_option: StorageOptions = None,
) -> None:
    """Draw islands of agreement in a student's outputs.

    Per-level student outputs (and the teacher's) as PCA colours or k-means clusters."""
    from apmpipe.stages.islands import islands as draw

    cache_options = parse_storage_options(storage_option)
    options = {"images": images, "mode": mode.value, "clusters": clusters, "panel": panel, "device": device}
    png = out if out.suffix.lower() == ".png" else out / ISLANDS_PNG
    result = draw(student, sources, str(png), **options, storage_options=cache_options)
    render.islands_result(result)
