"""The ``apmpipe`` command line: parse options, build a stage config, call the stage, print a summary.

User errors (``apmpipe.storage.errors.ApmError``) print one line on stderr and exit 2; ``--debug`` shows their
traceback. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand

from apmpipe.storage.errors import ApmError, ConfigError, check_ranges

from . import render
from .console import ShardProgress, err_console, out_console


class ApmCommand(TyperCommand):
    """A command whose usage line and argument list name its arguments as ``SOURCES...`` (``[SOURCES]...`` when
    optional), not typer's ``{sources}...`` with a ``<list[str]>`` type."""

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        arguments = [p for p in self.get_params(ctx) if p.param_type_name == "argument"]
        return [
            self.options_metavar or "",
            *(_argument_name(p) if p.required else f"[{_argument_name(p)}]" for p in arguments),
        ]

    def format_options(self, ctx: typer.Context, formatter: Any) -> None:
        records = {"argument": [], "option": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None and param.param_type_name in records:
                name = _argument_name(param) if param.param_type_name == "argument" else record[0]
                records[param.param_type_name].append((name, record[1]))
        for title, kind in (("Arguments", "argument"), ("Options", "option")):
            if records[kind]:
                with formatter.section(title):
                    formatter.write_dl(records[kind])


def _argument_name(param: Any) -> str:
    """``SOURCES...`` (several values) or ``CACHE``."""
    name = (param.metavar or param.name or "").upper()
    return f"{name}..." if param.nargs != 1 else name


app = typer.Typer(
    name="apmpipe",
    help="Feature-cache distillation for the Asynchronous Perception Machine: extract a timm teacher's tokens "
    "once, train the APM student from the cache, evaluate it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: whole option names and a wide description column at 80 columns
)
bench_app = typer.Typer(
    help="Measure throughput side by side in one run and print ratios.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(bench_app, name="bench")

F = TypeVar("F", bound=Callable[..., Any])
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")]
StorageOptions = Annotated[
    list[str] | None,
    typer.Option(
        "--storage-option",
        metavar="KEY=VALUE",
        help="fsspec option KEY=VALUE for remote inputs, caches or runs (repeatable), e.g. "
        "endpoint_url=http://127.0.0.1:9000.",
    ),
]
ModelArgs = Annotated[
    list[str] | None,
    typer.Option(
        "--model-arg",
        metavar="KEY=VALUE",
        help="Extra timm.create_model argument (repeatable), e.g. img_size=448.",
    ),
]
BenchLayers = Annotated[
    str, typer.Option(help="Teacher blocks to cache, 1-based (e.g. 6,12,18,24 for a 24-block ViT-L).")
]


class TokenDtype(StrEnum):
    float32 = "float32"
    float16 = "float16"
    int8 = "int8"


class Codec(StrEnum):
    blosc_lz4 = "blosc-lz4"
    zstd = "zstd"
    none = "none"


ISLANDS_PNG = "islands.png"  # what apmpipe islands writes into its --out folder
DEFAULT_CODEC_CHOICE = Codec.blosc_lz4  # storage.format.DEFAULT_CODEC, without importing zarr here (a test checks)


class PixelCodec(StrEnum):
    raw = "raw"
    png = "png"
    webp = "webp"
    jpeg = "jpeg"


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out_console.print(f"apmpipe {version('apmpipe')}", highlight=False)
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for user errors too.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details (INFO level).")] = False,
    threads: Annotated[
        int, typer.Option("--threads", help="CPU threads for torch (0: the cores not busy with other work).")
    ] = 0,
) -> None:
    ctx.obj = {"debug": debug}
    set_cpu_threads(threads)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not verbose:  # the hub's retry chatter drowns the one-line error that follows it
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def free_cores() -> int:
    """Cores this process may use minus the load other work puts on them (at least 1): on a shared machine,
    torch's default of one thread per core oversubscribes them (small per-sample work slows down many-fold)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


def set_cpu_threads(requested: int) -> None:
    """Set torch's intra-op threads (before torch is imported, through OMP_NUM_THREADS, so startup stays light).
    With ``0``, an OMP_NUM_THREADS already in the environment wins; else the free cores."""
    if requested < 0:
        raise typer.BadParameter(f"--threads must be >= 0, got {requested}")
    if not requested and os.environ.get("OMP_NUM_THREADS"):
        return
    count = requested or free_cores()
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(count)
    else:
        os.environ["OMP_NUM_THREADS"] = str(count)


def reports_user_errors(command: F) -> F:
    """Turn an ApmError into one line on stderr and exit code 2 (unless --debug; commands take ``ctx``)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ApmError as exc:
            ctx = kwargs.get("ctx")
            if ctx is not None and (ctx.find_root().obj or {}).get("debug"):
                raise
            err_console.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    return parse_number_list(text, option, int, "4,8,12")


def parse_number_list(text: str, option: str, kind: type, example: str) -> tuple[Any, ...]:
    try:
        return tuple(kind(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ConfigError(
            f"{option} {text!r} is not a comma-separated list of {what}, e.g. {option} {example}"
        ) from None


def parse_key_values(items: list[str] | None, option: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are Python literals when they parse as one (``32``, ``True``, ``(1, 2)``),
    else strings."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} {item!r} is not KEY=VALUE, e.g. {option} img_size=224")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def stage_options(ctx: typer.Context, *drop: str) -> dict[str, Any]:
    """The command's options as a stage config takes them: all but ``drop``, enum choices as their values, paths
    as strings."""
    values = {k: v for k, v in ctx.params.items() if k not in drop}
    return {k: v.value if isinstance(v, Enum) else str(v) if isinstance(v, Path) else v for k, v in values.items()}


@app.command(cls=ApmCommand)
@reports_user_errors
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
        int,
        typer.Option(
            help="Store each image as this many views, each with the teacher's own tokens and logits: view 0 the "
            "image, the others drawn by --view-augment from the image's key (train draws one view per image "
            "per epoch)."
        ),
    ] = 1,
    view_augment: Annotated[
        str, typer.Option(help="With --views N > 1, the views' augmentations, comma-separated: flip, crop.")
    ] = "",
    view_crop_scale: Annotated[
        str, typer.Option(help="With --view-augment crop: MIN,MAX share of the image's area a view's crop covers.")
    ] = "0.08,1",
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
    from apmpipe.stages.extract_config import ExtractConfig, preflight  # no torch yet: bad options fail fast

    options = stage_options(
        ctx,
        "sources",
        "out",
        "teacher",
        "layers",
        "model_arg",
        "class_names",
        "storage_option",
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
        view_crop_scale=parse_number_list(view_crop_scale, "--view-crop-scale", float, "0.08,1"),
        **options,
    )
    inputs = preflight(config)
    from apmpipe.stages.extract import extract as run_extract

    runner = _shard_runner(workers, scheduler, scheduler_file, resources)
    with ShardProgress() as progress:  # beside remote workers the driver's teacher (spec, head check) stays on the CPU
        driver = "cpu" if runner else None
        summary = run_extract(
            config, progress=progress, runner=runner, on_plan=progress.plan, driver_device=driver, inputs=inputs
        )
    render.extract_summary(summary)
    if summary.count("failed") or summary.nothing_stored:
        raise typer.Exit(1)


RUN_ON = ("workers", "scheduler", "scheduler_file", "resources")  # where extract runs, not what it makes


def _shard_runner(workers: int, scheduler: str | None, scheduler_file: Path | None, resources: list[str] | None) -> Any:
    """A dask runner when any of --workers/--scheduler/--scheduler-file is given, else None (this process)."""
    if not (workers or scheduler or scheduler_file):
        return None
    from .cluster import dask_runner

    needs = parse_key_values(resources, "--resources") or None
    return dask_runner(workers, scheduler, str(scheduler_file) if scheduler_file else None, needs)


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """``--storage-option`` pairs; ``endpoint_url`` goes where s3fs expects it (``client_kwargs``)."""
    from apmpipe.storage.remote import route_storage_options

    return route_storage_options(parse_key_values(items, "--storage-option"))


@app.command(cls=ApmCommand)
@reports_user_errors
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


@app.command(cls=ApmCommand)
@reports_user_errors
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


class Preset(StrEnum):
    paper = "paper"
    base = "base"
    small = "small"
    tiny = "tiny"


class LevelMode(StrEnum):
    heads = "heads"
    query = "query"


class Query(StrEnum):
    paper = "paper"
    local = "local"


@app.command(cls=ApmCommand)
@reports_user_errors
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
    trigger_channels: Annotated[
        int | None, typer.Option(help="Conv filter output channels (T = channels x grid).")
    ] = None,
    pos_dim: Annotated[int | None, typer.Option(help="Location code width (0: as wide as T).")] = None,
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
        int,
        typer.Option(
            help="Random locations per image per step on each level's grid, besides the prefix tokens (0: all)."
        ),
    ] = 16,
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
        int, typer.Option(help="With --epochs 0: train at least this many steps (whole epochs).")
    ] = 4000,
    max_epochs: Annotated[
        int, typer.Option(help="With --epochs 0: at most this many epochs, whatever --min-steps asks (0: no cap).")
    ] = 0,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (0: run all epochs).")] = 0,
    batch_size: Annotated[
        int | None, typer.Option(help="Images per step per rank (default: 32 on a CPU, 1024 on CUDA).")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Peak AdamW learning rate (default: 2e-3; with the CUDA default batch 2e-3 x sqrt(1024 / 32)).",
        ),
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (weights only).")] = 0.05,
    ema_decay: Annotated[
        float,
        typer.Option(help="Decay of an exponential moving average of the weights, which is exported (0: off)."),
    ] = 0.0,
    warmup_steps: Annotated[
        int, typer.Option(help="Linear warmup steps (at most 5% of the run) before cosine decay.")
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

    from .console import TrainProgress, stop_requests
    from .report import plot_losses

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


class TTTStart(StrEnum):
    trained = "trained"
    scratch = "scratch"


class IslandsMode(StrEnum):
    pca = "pca"
    kmeans = "kmeans"


@app.command("eval", cls=ApmCommand)
@reports_user_errors
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

    from .report import eval_folder, write_eval_report

    options = stage_options(ctx, "out", "storage_option")
    config = EvalConfig(**options, storage_options=parse_storage_options(storage_option))
    folder = out or eval_folder(student, cache, config.storage_options)
    check_writable(folder)
    report = evaluate(config)
    with staged_folder(folder, config.storage_options) as staged:
        json_name = write_eval_report(report, staged).name
    render.eval_report(report, f"{folder.rstrip('/')}/{json_name}")


@app.command(cls=ApmCommand)
@reports_user_errors
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


class GlobalFeature(StrEnum):
    pooled = "pooled"
    cls = "cls"
    mean_patch = "mean-patch"


class EmbedDtype(StrEnum):
    float16 = "float16"
    float32 = "float32"


@app.command(cls=ApmCommand)
@reports_user_errors
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


class TeacherKind(StrEnum):  # the keys of stages.reference_teacher.RECIPES (a test checks)
    vit = "vit"
    cnn = "cnn"


@app.command(cls=ApmCommand)
@reports_user_errors
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for data, caches, student and the report.")] = Path(
        "demo-out"
    ),
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="The small teacher on scikit-learn digits (shorter recipe) and a 150-step student (for tests).",
        ),
    ] = False,
    seed: Annotated[
        int, typer.Option(help="Seed of the train/val split, the teacher, the student and data order.")
    ] = 0,
    teacher_kind: Annotated[
        TeacherKind,
        typer.Option(
            help="The trained teacher: a ViT (blocks 2, 4 on one 8x8 grid; 1, 2 with --quick) or a ConvNeXt "
            "(levels 2, 3, 4 on grids 16x16, 8x8, 4x4; on scikit-learn digits)."
        ),
    ] = TeacherKind.vit,
) -> None:
    """Run the whole pipeline offline on bundled digits.

    Real images (scikit-learn digits), a small trained teacher, and a report folder."""
    from .demo import run_demo
    from .report import EVAL_JSON

    summary = run_demo(out, quick=quick, seed=seed, teacher_kind=teacher_kind.value)
    render.eval_report(summary["eval"], out / EVAL_JSON)
    report = out / "report.md"
    out_console.print(f"report: {report} (loss.png, fidelity.png, per-class plots, islands.png)", highlight=False)


@bench_app.command("extract", cls=ApmCommand)
@reports_user_errors
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

    from .bench import bench_extract, default_bench_shards, scratch_dir

    options = stage_options(ctx, "sources", "teacher", "layers", "model_arg", "images")
    with scratch_dir() as tmp:
        config = ExtractConfig.from_options(
            sources or default_bench_shards(Path(tmp), images, 64),
            str(Path(tmp) / "bench.zarr"),
            teacher,
            layers=parse_int_list(layers, "--layers"),
            model_kwargs=parse_key_values(model_arg, "--model-arg"),
            **options,
        )
        result = bench_extract(config)
    render.bench_extract(result, config)


@bench_app.command("train", cls=ApmCommand)
@reports_user_errors
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
    from .bench import bench_train, scratch_dir

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
        from .report import report_json

        json_out.write_text(report_json(result.to_dict()))


@bench_app.command("pipeline", cls=ApmCommand)
@reports_user_errors
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
    from .bench import scratch_dir
    from .bench_pipeline import RANGES, bench_pipeline

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


@bench_app.command("ablation", cls=ApmCommand)
@reports_user_errors
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
    from .bench import bench_ablation

    teacher, rows = bench_ablation(workdir, steps, seed, only)
    render.bench_ablation(teacher, rows, steps)


@bench_app.command("bytes", cls=ApmCommand)
@reports_user_errors
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
    from .bench import bench_bytes

    teacher, rows = bench_bytes(workdir, steps, seed, only)
    render.bench_bytes(teacher, rows, steps, workdir / "bench-bytes.json")


@bench_app.command("augment", cls=ApmCommand)
@reports_user_errors
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

    from .bench import bench_augment

    scale = parse_number_list(crop_scale, "--crop-scale", float, "0.08,1")
    check_crop_scale(scale)
    teacher, rows = bench_augment(workdir, seed, scale, cache)
    render.bench_augment(teacher, rows, scale)


@bench_app.command("codecs", cls=ApmCommand)
@reports_user_errors
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
    from .bench import bench_codecs

    render.bench_codecs(bench_codecs(cache, samples, parse_storage_options(storage_option)))


def misplaced_option(exc: Exception) -> str | None:
    """For an option the command lacks (a parser error): where it belongs instead, when anywhere; None otherwise.
    A global option given after the command goes before it; another command's option names that command."""
    name, ctx = getattr(exc, "option_name", None), getattr(exc, "ctx", None)
    if not name or ctx is None:
        return None
    root, here = ctx.find_root(), ctx.command_path
    for param in root.command.params:
        if name in (*param.opts, *param.secondary_opts):
            value = "" if getattr(param, "is_flag", False) else " N" if isinstance(param.default, int) else " VALUE"
            after = here.split(" ", 1)[1] if " " in here else "COMMAND"
            example = f"{root.info_name} {name}{value} {after} ..."
            return f"{name} is a global option: it goes before the command, e.g. {example}"
    owners = [path for path, command in _subcommands(root.command, root.info_name) if _has_option(command, name)]
    if owners:
        return f"{here} has no option {name}; it is an option of {', '.join(owners)}"
    return None


def _subcommands(group: Any, path: str) -> list[tuple[str, Any]]:
    """(command path, click command) of every command under ``group``, depth first."""
    out = []
    for name, command in getattr(group, "commands", {}).items():
        out += [(f"{path} {name}", command), *_subcommands(command, f"{path} {name}")]
    return out


def _has_option(command: Any, name: str) -> bool:
    return any(name in (*param.opts, *param.secondary_opts) for param in command.params)


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: usage errors are one line with exit code 2, like user errors."""
    try:
        code = app(args=args, standalone_mode=False, prog_name="apmpipe")
    except typer.Abort:
        err_console.print("aborted", highlight=False)
        raise SystemExit(130) from None
    except typer.TyperException as exc:  # the parser's usage errors (bad option value, missing argument)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = misplaced_option(exc) or (exc.format_message() if hasattr(exc, "format_message") else str(exc))
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare ``apmpipe`` or ``apmpipe bench``: the help, no error
            typer.echo(message)
        else:
            err_console.print(f"error: {message}{hint}", highlight=False, markup=False, soft_wrap=True)
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    raise SystemExit(code if isinstance(code, int) else 0)
