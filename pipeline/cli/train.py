"""``apmpipe train``: stage two's options (a TOML file under them), and the command that resumes a stopped run."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import render
from .options import (
    ApmTyper,
    DeviceOption,
    Preset,
    StorageOptions,
    parse_int_list,
    parse_number_list,
    parse_storage_options,
    stage_options,
)

app = ApmTyper()


class LevelMode(StrEnum):
    heads = "heads"
    query = "query"


class Trunk(StrEnum):
    mlp = "mlp"
    residual = "residual"


class PosCode(StrEnum):
    fixed = "fixed"
    learned = "learned"


class Query(StrEnum):
    paper = "paper"
    local = "local"


@app.command()
def train(
    ctx: typer.Context,
    caches: Annotated[
        list[str], typer.Argument(help="Feature caches written by apmpipe extract (one teacher).", show_default=False)
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Run directory (local path or fsspec URL): checkpoints, metrics.jsonl, loss.png, student.safetensors.",
            show_default=False,
        ),
    ],
    config: Annotated[
        Path | None,
        typer.Option(help="TOML file of options (keys as below, e.g. lr = 3e-4); command-line options override it."),
    ] = None,
    preset: Annotated[
        Preset, typer.Option(help="Student size: paper (the authors' 4096-wide ReLU MLP), base, small, tiny.")
    ] = Preset.small,
    hidden: Annotated[
        str | None, typer.Option(help="MLP trunk widths, overriding the preset, e.g. 1024,1024,512.")
    ] = None,
    trigger_channels: Annotated[int | None, typer.Option(help="Filter output channels (T = channels x grid).")] = None,
    filter_layers: Annotated[
        int | None,
        typer.Option(
            help="Filter layers: 1 is the paper's one linear conv; n > 1 adds GELU and n-1 1x1 convs on each cell "
            "alone."
        ),
    ] = None,
    filter_width: Annotated[
        int | None,
        typer.Option(help="Width of the filter's inner layers when --filter-layers > 1 (0: as T's channels)."),
    ] = None,
    mixer_blocks: Annotated[
        int | None,
        typer.Option(
            help="Transformer blocks mixing the filter's cells; T becomes their mean and each query also reads its "
            "own mixed cell (0: none, the paper's T). Default: the preset's."
        ),
    ] = None,
    mixer_width: Annotated[
        int | None, typer.Option(help="The mixer's width, a multiple of 32. Default: the preset's.")
    ] = None,
    trigger_cells: Annotated[
        int | None,
        typer.Option(
            help="With a mixer: channels of every cell's filter output that T also carries, cells side by side, "
            "after the mixed cells' mean (patch tokens fit better, held-out CLS worse; 0: the mean alone). "
            "Default: the preset's."
        ),
    ] = None,
    mixer_dropout: Annotated[
        float | None,
        typer.Option(
            help="With a mixer: dropout inside its blocks while training, from the end of the warmup on, against "
            "learning few images' summaries by heart (0: none, every preset's)."
        ),
    ] = None,
    trunk: Annotated[
        Trunk | None,
        typer.Option(
            help="mlp: Linear + activation per width (the paper's); residual: pre-norm residual layers after the "
            "first (a narrowing layer without the skip). Default: the preset's."
        ),
    ] = None,
    pos_dim: Annotated[int | None, typer.Option(help="Location code width (0: as wide as T).")] = None,
    pos_code: Annotated[
        PosCode | None,
        typer.Option(
            help="fixed: the paper's 2-D sin/cos location code; learned: one code per location, starting from it. "
            "Default: the preset's."
        ),
    ] = None,
    level_mode: Annotated[
        LevelMode,
        typer.Option(help="heads: one output head per level on a shared trunk; query: level code in the query."),
    ] = LevelMode.heads,
    query: Annotated[
        Query,
        typer.Option(
            help="paper: each location's query is [T, p]; local: [T, p] and the queried cell's own pixels (prefix "
            "tokens read zeros)."
        ),
    ] = Query.local,
    levels: Annotated[
        str | None,
        typer.Option(
            help="Teacher layers to train on, e.g. 12 or 8,12 (default: every cached level); only their tokens are "
            "read from the cache."
        ),
    ] = None,
    locations: Annotated[
        int | None,
        typer.Option(
            help="Random locations per image per step on each level's grid, besides the prefix tokens (0: all; "
            "default: 4)."
        ),
    ] = None,
    echo: Annotated[
        int,
        typer.Option(
            help="Passes over each loaded window, each reshuffled, with fresh locations (echo x fewer bytes per step)."
        ),
    ] = 1,
    augment: Annotated[
        str,
        typer.Option(
            help="Train-time augmentations, comma-separated: flip (pixels and token grid mirrored), crop (random "
            "resized crop, tokens resampled to the box); none: off."
        ),
    ] = "none",
    crop_scale: Annotated[
        str, typer.Option(help="With --augment crop: MIN,MAX share of the image's area a crop covers.")
    ] = "0.08,1",
    epochs: Annotated[int, typer.Option(help="Passes over the caches (0: enough for --min-steps steps).")] = 0,
    min_steps: Annotated[
        int | None,
        typer.Option(
            help="With --epochs 0: train at least this many steps (whole epochs). Default: 4000; 2000 on CUDA at its "
            "default batch (1,024 images)."
        ),
    ] = None,
    max_epochs: Annotated[
        int, typer.Option(help="With --epochs 0: at most this many epochs, whatever --min-steps asks (0: no cap).")
    ] = 0,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (0: run all epochs).")] = 0,
    val: Annotated[
        str | None,
        typer.Option(
            help="Held-out feature cache of the same teacher (other images): the student's R2 on it is scored every "
            "--val-every steps and the best-scoring weights are exported."
        ),
    ] = None,
    val_every: Annotated[int, typer.Option(help="With --val: steps between held-out scores (and at the end).")] = 500,
    val_samples: Annotated[
        int, typer.Option(help="With --val: seeded random samples of it scored each time (0: all).")
    ] = 500,
    patience: Annotated[
        int,
        typer.Option(help="With --val: stop after this many scores in a row without a better one (0: never stop)."),
    ] = 0,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per step per rank (default: 64 on a CPU, 1024 on CUDA).")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Peak AdamW learning rate (default: 2e-3 x sqrt(batch size / 32): 2.8e-3 at 64, 1.1e-2 at 1024).",
        ),
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (weights only).")] = 0.05,
    ema_decay: Annotated[
        float,
        typer.Option(help="Decay of an exponential moving average of the weights, which is exported (0: off)."),
    ] = 0.0,
    warmup_steps: Annotated[
        int, typer.Option(help="Linear warmup steps (at most a quarter of the run) before cosine decay.")
    ] = 200,
    clip_grad: Annotated[float, typer.Option(help="Gradient norm clip (0: off).")] = 1.0,
    mse_weight: Annotated[float, typer.Option(help="Weight of MSE on standardised teacher tokens, per level.")] = 1.0,
    prefix_weight: Annotated[
        float, typer.Option(help="Extra weight of the prefix tokens' (CLS, registers) MSE.")
    ] = 1.0,
    cosine_weight: Annotated[float, typer.Option(help="Weight of (1 - cosine) on teacher tokens, per level.")] = 0.0,
    logit_weight: Annotated[
        float, typer.Option(help="Weight of KL to the teacher's cached logits through its stored head (0: off).")
    ] = 1.0,
    kd_temperature: Annotated[float, typer.Option(help="Temperature of that KL.")] = 2.0,
    rgb_weight: Annotated[
        float, typer.Option(help="Weight of the pixel reconstruction loss (0 disables the rgb head).")
    ] = 0.1,
    standardize: Annotated[
        bool, typer.Option("--standardize/--no-standardize", help="Standardise targets per level (cache moments).")
    ] = True,
    window_samples: Annotated[
        int,
        typer.Option(
            help="Shuffle window in samples; loader memory is about (2 x workers + 1) windows, 3 with 0 workers."
        ),
    ] = 512,
    loader_workers: Annotated[
        int,
        typer.Option(
            help="DataLoader processes reading the cache (0: this process reads, tensorstore with every block in "
            "flight, one window ahead on a thread: bench pipeline measured it 2.2x per core)."
        ),
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of weights, data order and location sampling.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    checkpoint_minutes: Annotated[
        float, typer.Option(help="Also checkpoint after this many minutes of work (0: off).")
    ] = 5.0,
    log_every: Annotated[int, typer.Option(help="Steps between metric records.")] = 10,
    device: DeviceOption = "auto",
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="bfloat16 autocast on CUDA.")] = True,
    compile: Annotated[
        bool,
        typer.Option("--compile/--no-compile", help="torch.compile the step's forward and loss (the fast path)."),
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoint.")
    ] = False,
    tensorboard: Annotated[
        bool, typer.Option("--tensorboard", help="Also log the metrics as TensorBoard scalars (needs tensorboard).")
    ] = False,
    tensorboard_dir: Annotated[
        str | None,
        typer.Option(
            help="Local folder for the TensorBoard events (default RUN/tensorboard; needed for remote --out)."
        ),
    ] = None,
    storage_option: StorageOptions = None,
) -> None:
    """Train the APM student from feature caches.

    Streams shards of cached teacher tokens; the teacher is never loaded. Ctrl-C or SIGTERM saves a
    checkpoint and prints the command that resumes the run."""
    from apmpipe.stages.train import TrainConfig
    from apmpipe.stages.train import train as run_train
    from apmpipe.storage.checkpoint import RunDir
    from apmpipe.storage.remote import staged_folder

    from ..console import TrainProgress, stop_requests
    from ..report import plot_losses

    given = {name for name in ctx.params if ctx.get_parameter_source(name).name != "DEFAULT"}
    options = stage_options(ctx, "config", "storage_option")
    options.update(
        caches=tuple(caches),
        hidden=parse_int_list(hidden, "--hidden") if hidden else None,
        levels=parse_int_list(levels, "--levels") if levels else None,
        augment=tuple(name for name in augment.replace(" ", "").split(",") if name),
        crop_scale=parse_number_list(crop_scale, "--crop-scale", float, "0.08,1"),
    )
    options["storage_options"] = parse_storage_options(storage_option)
    train_config = TrainConfig.from_file_and_options(options, config, given)
    with TrainProgress() as progress, stop_requests() as stop_requested:
        summary = run_train(
            train_config,
            on_step=progress.step,
            on_start=lambda model, total: (render.student_size(model), progress.start(total)),
            on_resume=lambda step, total: progress.resumed(step, total, train_config.out),
            stop_requested=stop_requested,
        )
    if summary.stopped_by:
        render.train_stopped(summary, train_config.out, resume_command(train_config))
        raise typer.Exit(128 + summary.stopped_by)
    if summary.student:
        records = RunDir(summary.run_dir, train_config.storage_options).read_metrics()
        with staged_folder(summary.run_dir, train_config.storage_options) as folder:
            plot_losses(records, folder / "loss.png")
        render.train_summary(summary, f"{summary.run_dir.rstrip('/')}/loss.png")


def resume_command(config: Any) -> str:
    """The command that continues ``config``'s run: its caches, --out, every option not at its default, --resume."""
    import shlex

    from apmpipe.stages.train import TrainConfig, flat_options

    default = flat_options(TrainConfig(caches=config.caches, out=config.out).to_dict())
    recorded = flat_options(config.to_dict())  # URLs redacted
    parts = ["apmpipe train", *map(shlex.quote, recorded["caches"]), "--out", shlex.quote(recorded["out"])]
    for key, value in recorded.items():
        flag = "--" + key.replace("_", "-")
        if key in ("caches", "out", "resume") or value == default.get(key):
            continue
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        else:
            parts += [flag, ",".join(map(str, value)) if isinstance(value, list) else shlex.quote(str(value))]
    secrets = " (and your --storage-option flags)" if config.storage_options else ""
    return " ".join([*parts, "--resume"]) + secrets
