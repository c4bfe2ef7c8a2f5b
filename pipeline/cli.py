"""The ``apmpipe`` command line: parse options, build a stage config, call the stage, print a summary.

User errors (``storage.errors.ApmError``) print one line on stderr and exit 2; ``--debug`` shows their
traceback. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import ast
import functools
import json
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.table import Table

from apmpipe.storage.errors import ApmError, ConfigError

from .console import ExtractProgress, err_console, human_bytes, out_console

app = typer.Typer(
    name="apmpipe",
    help="Feature-cache distillation for the Asynchronous Perception Machine: extract a timm teacher's tokens once, train the APM student from the cache, evaluate it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: whole option names and a wide description column at 80 columns
)
bench_app = typer.Typer(help="Measure throughput side by side in one run and print ratios.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(bench_app, name="bench")

F = TypeVar("F", bound=Callable[..., Any])
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA when available), cpu, cuda or cuda:N.")]
StorageOptions = Annotated[list[str], typer.Option("--storage-option", help="fsspec option KEY=VALUE for remote inputs or caches (repeatable), e.g. endpoint_url=http://127.0.0.1:9000.")]
ModelArgs = Annotated[list[str], typer.Option("--model-arg", help="Extra timm.create_model argument KEY=VALUE (repeatable), e.g. img_size=448.")]


class TokenDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"
    int8 = "int8"


class Codec(str, Enum):
    zstd = "zstd"
    blosc_lz4 = "blosc-lz4"
    none = "none"


class PixelCodec(str, Enum):
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
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True)] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for user errors too.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log details (INFO level).")] = False,
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for torch (0: the cores not busy with other work).")] = 0,
) -> None:
    ctx.obj = {"debug": debug}
    set_cpu_threads(threads)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
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
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a comma-separated list of integers, e.g. {option} 4,8,12") from None


def parse_key_values(items: list[str], option: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are Python literals when they parse as one (``32``, ``True``, ``(1, 2)``), else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} {item!r} is not KEY=VALUE, e.g. {option} img_size=224")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


@app.command()
@reports_user_errors
def extract(
    ctx: typer.Context,
    sources: Annotated[list[str], typer.Argument(help="WebDataset shards (.tar/.tar.gz/.tgz, brace patterns, globs, a directory; local or fsspec URLs) or an image folder root/<class>/<file>.", show_default=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Feature cache to create or complete (local path or fsspec URL).", show_default=False)],
    teacher: Annotated[str, typer.Option("--teacher", "-t", help="timm model name, hf-hub:org/repo or local-dir:/path.", show_default=False)],
    layers: Annotated[str, typer.Option(help="Teacher blocks to cache, 1-based; negative counts from the end (-1 = last).")] = "-1",
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Load the teacher's pretrained weights.")] = True,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Teacher state dict (.safetensors, or .pth loaded with weights_only).")] = None,
    model_arg: ModelArgs = [],
    seed: Annotated[int, typer.Option(help="Seed for a random-init teacher.")] = 0,
    final_norm: Annotated[bool, typer.Option("--final-norm/--no-final-norm", help="Apply the teacher's final norm to every cached level.")] = False,
    dtype: Annotated[TokenDtype, typer.Option(help="Token storage dtype; int8 is per-token scaled and its fidelity is reported.")] = TokenDtype.float16,
    codec: Annotated[Codec, typer.Option(help="Compressor for cached arrays.")] = Codec.zstd,
    rank: Annotated[int, typer.Option(help="Store tokens as this many coefficients of one PCA basis per level, fitted at extraction (0: whole tokens); fidelity is reported.")] = 0,
    pixel_codec: Annotated[PixelCodec, typer.Option(help="Pixels as uint8 arrays (raw) or one PNG / lossless WebP / JPEG (lossy, PSNR reported) per sample.")] = PixelCodec.raw,
    batch_size: Annotated[int, typer.Option(help="Images per teacher forward.")] = 32,
    loader_workers: Annotated[int, typer.Option(help="DataLoader processes decoding images (0: in the main process; -1: 1 beside a CPU teacher, up to 8 for a GPU).")] = -1,
    chunk_samples: Annotated[int, typer.Option(help="Samples per zarr chunk (unit of a read).")] = 16,
    shard_samples: Annotated[int, typer.Option(help="Samples per zarr shard file (unit of a write); a multiple of --chunk-samples.")] = 256,
    label_key: Annotated[str, typer.Option(help="WebDataset field with the label, or FIELD:PATH into a JSON field, e.g. json:label or json:meta.class.")] = "cls",
    class_names: Annotated[Optional[str], typer.Option(help="Text file of class names, one per line (label = line number), for tar shards whose labels are names.")] = None,
    no_labels: Annotated[bool, typer.Option("--no-labels", help="Ignore labels (all stored as -1).")] = False,
    max_pixels: Annotated[Optional[int], typer.Option(help="Skip images with more pixels than this, checked before decoding [default: 64,000,000].", show_default=False)] = None,
    folder_block: Annotated[int, typer.Option(help="Images per shard group when reading an image folder.")] = 1000,
    device: DeviceOption = "auto",
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="bfloat16 autocast on CUDA.")] = True,
    workers: Annotated[int, typer.Option(help="Run shards on a local dask cluster of N worker processes (0: in this process).")] = 0,
    scheduler: Annotated[Optional[str], typer.Option(help="Run shards on an existing dask scheduler, e.g. tcp://10.0.0.5:8786.")] = None,
    scheduler_file: Annotated[Optional[Path], typer.Option(help="Dask scheduler file (dask scheduler --scheduler-file).")] = None,
    resources: Annotated[list[str], typer.Option("--resources", help="Dask resources each task needs, KEY=VALUE (repeatable), e.g. GPU=1.")] = [],
    storage_option: StorageOptions = [],
) -> None:
    """Run a timm teacher once over image shards into a feature cache.

    The cache is a resumable Zarr v3 group: rerunning the command completes it."""
    from apmpipe.stages.extract_config import ExtractConfig, TeacherConfig, preflight  # no torch yet: bad options fail fast
    from apmpipe.storage.sources import DEFAULT_MAX_PIXELS, read_class_names

    storage_options = parse_storage_options(storage_option)
    config = ExtractConfig(
        inputs=tuple(sources), out=out,
        teacher=TeacherConfig(name=teacher, pretrained=pretrained, checkpoint=str(checkpoint.resolve()) if checkpoint else None,
                              model_kwargs=tuple(sorted(parse_key_values(model_arg, "--model-arg").items())), seed=seed),
        layers=parse_int_list(layers, "--layers"), final_norm=final_norm, dtype=dtype.value, codec=codec.value, rank=rank, pixel_codec=pixel_codec.value,
        batch_size=batch_size, loader_workers=loader_workers, chunk_samples=chunk_samples, shard_samples=shard_samples,
        label_key=None if no_labels else label_key, class_names=read_class_names(class_names, storage_options) if class_names and not no_labels else (),
        max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels, folder_block=folder_block, device=device, amp=amp, storage_options=storage_options,
    )
    inputs = preflight(config)
    resource_needs = parse_key_values(resources, "--resources") or None
    from apmpipe.stages.extract import extract as run_extract

    runner = None
    if workers or scheduler or scheduler_file:
        from .cluster import dask_runner

        runner = dask_runner(workers, scheduler, str(scheduler_file) if scheduler_file else None, resource_needs)
    with ExtractProgress() as progress:  # beside remote workers the driver's teacher (spec, head check) stays on the CPU
        summary = run_extract(config, progress=progress, runner=runner, on_plan=progress.plan, driver_device="cpu" if runner else None, inputs=inputs)
    _print_extract_summary(summary)
    if summary.count("failed"):
        raise typer.Exit(1)


def parse_storage_options(items: list[str]) -> dict[str, Any]:
    """``--storage-option`` pairs; ``endpoint_url`` goes where s3fs expects it (``client_kwargs``)."""
    from apmpipe.storage.remote import route_storage_options

    return route_storage_options(parse_key_values(items, "--storage-option"))


def _print_extract_summary(summary: Any) -> None:
    images = summary.images
    rows = [
        ("cache", summary.cache),
        ("shards", f"{summary.count('done')} done, {summary.count('skipped')} already complete, {summary.count('failed')} failed"),
        ("images", f"{images} written, {len(summary.skipped_samples)} samples skipped"),
        ("on disk", f"{human_bytes(summary.stored_bytes)} in the cache"),
        ("throughput", f"{summary.images_per_second:.1f} img/s over {summary.seconds:.1f} s"),
        ("teacher head", summary.head),
    ]
    if summary.cache_samples:
        rows.insert(4, ("bytes per image", human_bytes(summary.stored_bytes / summary.cache_samples)))
    for layer, stats in summary.fidelity.items():
        rows.append((f"fidelity layer {layer}", f"min cosine {stats['cosine_min']:.5f}, relative MSE {stats['relative_mse']:.2e}"))
    if summary.pixel_psnr is not None:
        rows.append(("pixel fidelity", f"min PSNR {summary.pixel_psnr:.1f} dB"))
    out_console.print(_table("apmpipe extract", rows))
    for shard, key, reason in summary.skipped_samples[:20]:
        err_console.print(f"skipped {shard}/{key}: {reason}", highlight=False, markup=False, soft_wrap=True)
    for result in summary.results:
        if result.status == "failed":
            err_console.print(f"failed shard {result.name}: {result.error}", highlight=False, markup=False, soft_wrap=True)


@app.command()
@reports_user_errors
def info(
    ctx: typer.Context,
    cache: Annotated[str, typer.Argument(help="Feature cache path or URL.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON.")] = False,
    sizes: Annotated[bool, typer.Option("--sizes", help="Also measure bytes on disk and compression (lists every file: slow on object stores).")] = False,
    storage_option: StorageOptions = [],
) -> None:
    """Describe a feature cache.

    Teacher, layers, shapes, shards, samples, precision, bad samples (sizes with --sizes)."""
    from apmpipe.storage.cache import FeatureCache

    desc = FeatureCache.open(cache, storage_options=parse_storage_options(storage_option)).describe(sizes=sizes)
    if as_json:
        out_console.print_json(json.dumps(desc))
        return
    spec = desc["spec"]
    teacher = spec["teacher"]
    low_rank = f" coefficients of rank-{spec['rank']} bases" if spec["rank"] else ""
    rows = [
        ("format", desc["format"]),
        ("teacher", f"{teacher['name']} ({teacher['weights']}, sha256 {teacher['weights_sha256'][:12]})"),
        ("input", f"{spec['data_config']['input_size']} {spec['data_config']['interpolation']}, crop {spec['data_config'].get('crop_pct')}, mean {spec['data_config']['mean']}"),
        ("levels", ", ".join(f"{lv['layer']}: {lv['prefix_tokens']}+{lv['grid'][0]}x{lv['grid'][1]} tokens x {lv['dim']}" for lv in spec["levels"])),
        ("storage", f"{spec['dtype']}{low_rank}, codec {spec['codec']}, pixels {spec['pixel_codec']}, chunks of {spec['chunk_samples']}, zarr shards of {spec['shard_samples']}"),
        ("shards", f"{desc['shards']['complete']} complete, {desc['shards']['writing']} incomplete, {desc['shards']['failed']} failed"),
        ("samples", str(desc["samples"])),
        ("precision", ", ".join(desc["precision"]) or "-"),
        ("size", f"{human_bytes(desc['stored_bytes'])} on disk, {human_bytes(desc['raw_bytes'])} raw, ratio {desc['compression_ratio']:.2f}x, {human_bytes(desc['bytes_per_sample'])}/sample"
         if sizes else f"{human_bytes(desc['raw_bytes'])} raw (--sizes: bytes on disk)"),
        ("teacher head", "stored" if desc["head"].get("available") else f"none ({desc['head'].get('reason', 'unknown')})"),
        ("skipped samples", str(len(desc["skipped_samples"]))),
        *_array_rows(desc["arrays"]),
        *_recorded_fidelity_rows(desc["fidelity"]),
    ]
    out_console.print(_table(f"apmpipe cache {desc['url']}", rows))
    for item in desc["skipped_samples"][:20]:
        out_console.print(f"skipped {item['shard']}/{item['key']}: {item['reason']}", highlight=False, markup=False)
    for item in desc["failed_shards"]:
        out_console.print(f"failed shard {item['shard']}: {item['error']}", highlight=False, markup=False)


def _array_rows(arrays: dict[str, dict[str, float]]) -> list[tuple[str, str]]:
    """Bytes per sample of each array: stored (with ``--sizes``) beside the raw (decoded) size."""
    rows = []
    for name, sizes in arrays.items():
        raw = f"{human_bytes(sizes['raw_bytes_per_sample'])} raw" if "raw_bytes_per_sample" in sizes else ""
        stored = f"{human_bytes(sizes['stored_bytes_per_sample'])} stored" if "stored_bytes_per_sample" in sizes else ""
        rows.append((f"bytes/sample {name}", f"{stored} ({raw})" if stored and raw else stored or raw))
    return rows


def _recorded_fidelity_rows(fidelity: dict[str, Any]) -> list[tuple[str, str]]:
    """What extraction recorded of lossy storage: per level, worst cosine and mean relative MSE; pixel PSNR."""
    rows = [(f"fidelity layer {layer}", f"min cosine {f['cosine_min']:.5f}, relative MSE {f['relative_mse']:.2e} ({f['samples']} samples' shards)")
            for layer, f in fidelity["levels"].items()]
    if fidelity["pixels"]:
        rows.append(("pixel fidelity", f"min PSNR {fidelity['pixels']['psnr_db']:.1f} dB"))
    return rows


@app.command()
@reports_user_errors
def verify(
    ctx: typer.Context,
    cache: Annotated[str, typer.Argument(help="Feature cache path or URL.", show_default=False)],
    samples: Annotated[int, typer.Option(help="Number of cached samples to recompute.")] = 8,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Teacher weights, if not where extraction found them.")] = None,
    device: DeviceOption = "auto",
    storage_option: StorageOptions = [],
) -> None:
    """Recompute cached samples with the teacher: pass or fail.

    Each sample is recomputed in the precision its shard was made with; the verdict compares the worst
    difference with a tolerance for that precision and storage dtype (exit 1 on fail)."""
    from apmpipe.stages.verify import verify_cache

    report = verify_cache(cache, samples=samples, device=device, checkpoint=str(checkpoint) if checkpoint else None, storage_options=parse_storage_options(storage_option))
    rows = [(f"layer {layer}", f"max |diff| {s['max_abs']:.3g}, min cosine {s['min_cosine']:.6f} (tolerance >= {s['tolerance']:.6f})") for layer, s in report.levels.items()]
    if report.logits_max_abs is not None:
        rows.append(("logits", f"max |diff| {report.logits_max_abs:.3g} (tolerance <= {report.logits_tolerance:.3g})"))
    failures = report.failures
    rows.append(("verdict", f"FAIL: {'; '.join(failures)}" if failures else "PASS: every level and the logits are within tolerance"))
    out_console.print(_table(f"apmpipe verify: {report.samples} samples recomputed in {report.precision}", rows))
    if failures:
        raise typer.Exit(1)


class Preset(str, Enum):
    paper = "paper"
    base = "base"
    small = "small"
    tiny = "tiny"


class LevelMode(str, Enum):
    heads = "heads"
    query = "query"


def apply_config_file(ctx: Any, values: dict[str, Any], path: Optional[Path], allowed: list[str]) -> dict[str, Any]:
    """Options from a TOML file, for every option not given on the command line (CLI overrides the file)."""
    if path is None:
        return values
    import tomllib

    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {path} is not valid TOML: {exc}") from None
    merged = dict(values)
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in ("caches", "out"):
            raise ConfigError(f"--config {path}: give {name} on the command line (apmpipe {ctx.info_name} CACHE... --out RUN), not in the file")
        if name == "storage_options" and isinstance(value, dict):
            merged["storage_option"] = [f"{k}={v}" for k, v in value.items()] + list(merged.get("storage_option") or [])
            continue
        if name not in allowed:
            raise ConfigError(f"--config {path}: unknown option {key!r}; see apmpipe {ctx.info_name} --help")
        if name in merged and ctx.get_parameter_source(name).name == "DEFAULT":
            merged[name] = value
    return merged


@app.command()
@reports_user_errors
def train(
    ctx: typer.Context,
    caches: Annotated[list[str], typer.Argument(help="Feature caches written by apmpipe extract (one teacher).", show_default=False)],
    out: Annotated[str, typer.Option("--out", "-o", help="Run directory: checkpoints, metrics.jsonl, loss.png, student.safetensors.", show_default=False)],
    config: Annotated[Optional[Path], typer.Option(help="TOML file of options (keys as below, e.g. lr = 3e-4); command-line options override it.")] = None,
    preset: Annotated[Preset, typer.Option(help="Student size: paper (the authors' 4096-wide ReLU MLP), base, small, tiny.")] = Preset.small,
    hidden: Annotated[Optional[str], typer.Option(help="MLP trunk widths, overriding the preset, e.g. 1024,1024,512.")] = None,
    trigger_channels: Annotated[Optional[int], typer.Option(help="Conv filter output channels (T = channels x grid).")] = None,
    pos_dim: Annotated[Optional[int], typer.Option(help="Location code width (0: as wide as T).")] = None,
    level_mode: Annotated[LevelMode, typer.Option(help="heads: one output head per level on a shared trunk; query: level code in the query.")] = LevelMode.heads,
    locations: Annotated[int, typer.Option(help="Random grid locations per image per step, besides the prefix tokens (0: all).")] = 16,
    echo: Annotated[int, typer.Option(help="Steps per loaded batch, each on fresh random locations (reads echo x fewer bytes per step).")] = 1,
    epochs: Annotated[int, typer.Option(help="Passes over the caches (0: enough for --min-steps steps).")] = 0,
    min_steps: Annotated[int, typer.Option(help="With --epochs 0: train at least this many steps (whole epochs).")] = 4000,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (0: run all epochs).")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per step per rank.")] = 32,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate.")] = 2e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (weights only).")] = 0.05,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps (at most 5% of the run) before cosine decay.")] = 200,
    clip_grad: Annotated[float, typer.Option(help="Gradient norm clip (0: off).")] = 1.0,
    mse_weight: Annotated[float, typer.Option(help="Weight of MSE on standardised teacher tokens, per level.")] = 1.0,
    prefix_weight: Annotated[float, typer.Option(help="Extra weight of the prefix tokens' (CLS, registers) MSE.")] = 1.0,
    cosine_weight: Annotated[float, typer.Option(help="Weight of (1 - cosine) on teacher tokens, per level.")] = 0.0,
    logit_weight: Annotated[float, typer.Option(help="Weight of KL to the teacher's cached logits through its stored head (0: off).")] = 1.0,
    kd_temperature: Annotated[float, typer.Option(help="Temperature of that KL.")] = 2.0,
    rgb_weight: Annotated[float, typer.Option(help="Weight of the pixel reconstruction loss (0 disables the rgb head).")] = 0.1,
    standardize: Annotated[bool, typer.Option("--standardize/--no-standardize", help="Standardise targets per level (cache moments).")] = True,
    window_samples: Annotated[int, typer.Option(help="Shuffle window in samples; loader memory is about (2 x workers + 1) windows.")] = 512,
    loader_workers: Annotated[int, typer.Option(help="DataLoader processes reading the cache.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of weights, data order and location sampling.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    checkpoint_minutes: Annotated[float, typer.Option(help="Also checkpoint after this many minutes of work (0: off).")] = 5.0,
    log_every: Annotated[int, typer.Option(help="Steps between metric records.")] = 10,
    device: DeviceOption = "auto",
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="bfloat16 autocast on CUDA.")] = True,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the student.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its latest checkpoint.")] = False,
    storage_option: StorageOptions = [],
) -> None:
    """Train the APM student from feature caches.

    Streams shards of cached teacher tokens; the teacher is never loaded. Ctrl-C or SIGTERM saves a
    checkpoint and prints the command that resumes the run."""
    from apmpipe.stages.train import TrainConfig, train as run_train

    from .console import TrainProgress, stop_requests
    from .report import plot_losses

    values = apply_config_file(ctx, dict(ctx.params), config, TrainConfig.option_names())
    values["hidden"] = parse_int_list(values["hidden"], "--hidden") if isinstance(values["hidden"], str) else values["hidden"]
    values = {k: (v.value if isinstance(v, Enum) else v) for k, v in values.items()}
    values["storage_options"] = parse_storage_options(values.pop("storage_option"))
    values.pop("config")
    values.pop("ctx", None)
    train_config = TrainConfig.from_options({**values, "caches": tuple(values["caches"]), "hidden": tuple(values["hidden"]) if values["hidden"] else None})
    resumed = [0]

    def on_resume(step: int, total: int) -> None:
        resumed[0] = step
        err_console.print(f"resuming from step {step} of {total} ({train_config.out})", highlight=False)

    with TrainProgress() as progress, stop_requests() as stop_requested:
        summary = run_train(train_config, on_step=progress.step, on_resume=on_resume, stop_requested=stop_requested,
                            on_start=lambda model, total: (err_console.print(f"student: {model.num_params() / 1e6:.2f} M parameters, {model.flops_per_image() / 1e9:.3f} GFLOPs per image (all locations)", highlight=False), progress.start(total, resumed[0])))
    if summary.stopped_by:
        import signal

        err_console.print(f"{signal.Signals(summary.stopped_by).name}: stopped at step {summary.steps}; checkpoint saved in {Path(train_config.out) / 'checkpoints'}", highlight=False, soft_wrap=True)
        err_console.print(f"resume with: {resume_command(train_config)}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(128 + summary.stopped_by)
    if summary.student:
        from apmpipe.storage.checkpoint import RunDir

        plot = plot_losses(RunDir(summary.run_dir).read_metrics(), Path(summary.run_dir) / "loss.png")
        rows = [
            ("run", summary.run_dir),
            ("student", f"{summary.student} ({summary.params / 1e6:.2f} M params, {summary.flops_per_image / 1e9:.3f} GFLOPs/image)"),
            ("steps", f"{summary.steps} ({summary.epochs_done:.2f} epochs)"),
            ("loss", f"{summary.first_loss:.4f} -> {summary.last_loss:.4f}"),
            ("throughput", f"{summary.samples / summary.seconds:.1f} samples/s over {summary.seconds:.1f} s" if summary.seconds else "-"),
            ("loss curve", str(plot)),
        ]
        out_console.print(_table("apmpipe train", rows))


def resume_command(config: Any) -> str:
    """The command that continues ``config``'s run: its caches, --out, every option not at its default, --resume."""
    import shlex

    from apmpipe.stages.train import TrainConfig, flat_options

    default = flat_options(TrainConfig(caches=config.caches, out=config.out).to_dict())
    parts = ["apmpipe train", *map(shlex.quote, config.caches), "--out", shlex.quote(config.out)]
    for key, value in flat_options(config.to_dict()).items():
        flag = "--" + key.replace("_", "-")
        if key in ("caches", "out", "resume") or value == default.get(key):
            continue
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        else:
            parts += [flag, ",".join(map(str, value)) if isinstance(value, list) else shlex.quote(str(value))]
    secrets = " (and your --storage-option flags)" if config.storage_options else ""
    return " ".join([*parts, "--resume"]) + secrets


class TTTStart(str, Enum):
    trained = "trained"
    scratch = "scratch"


class IslandsMode(str, Enum):
    pca = "pca"
    kmeans = "kmeans"


@app.command("eval")
@reports_user_errors
def eval_command(
    ctx: typer.Context,
    cache: Annotated[str, typer.Argument(help="Evaluation feature cache.", show_default=False)],
    student: Annotated[str, typer.Option(help="Run directory (or student.safetensors) from apmpipe train.", show_default=False)],
    train_cache: Annotated[Optional[str], typer.Option(help="Training cache: fits weighted k-NN and a linear probe on global features.")] = None,
    class_embeddings: Annotated[Optional[Path], typer.Option(help="classes x dim .npy of text embeddings (CLIP zero-shot through the cached projection head).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Report folder (default: RUN_DIR/eval-<cache name>).")] = None,
    feature: Annotated[str, typer.Option(help="Global feature for k-NN/probe: pooled (what the teacher's head reads), cls, mean-patch.")] = "pooled",
    level: Annotated[int, typer.Option(help="Level (1-based, -1 = last) whose tokens give the global feature.")] = -1,
    batch_size: Annotated[int, typer.Option(help="Images per student forward.")] = 64,
    max_samples: Annotated[int, typer.Option(help="Evaluate a seeded random subset of N samples across all shards (0: all).")] = 0,
    knn_k: Annotated[int, typer.Option(help="Neighbours for weighted k-NN.")] = 20,
    knn_temperature: Annotated[float, typer.Option(help="Temperature of k-NN vote weights exp(sim/T).")] = 0.07,
    ttt_steps: Annotated[int, typer.Option(help="Test-time training steps per sample (0: no TTT).")] = 0,
    ttt_lr: Annotated[float, typer.Option(help="TTT learning rate (AdamW, reset per sample).")] = 1e-4,
    ttt_locations: Annotated[int, typer.Option(help="Random locations per TTT step (0: all).")] = 0,
    ttt_from: Annotated[TTTStart, typer.Option(help="Start each sample's TTT from the trained student or from fresh weights.")] = TTTStart.trained,
    ttt_samples: Annotated[int, typer.Option(help="Run TTT on a seeded random subset of N samples (0: as --max-samples).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the sample subsets, the probe's split and TTT.")] = 0,
    device: DeviceOption = "auto",
    storage_option: StorageOptions = [],
) -> None:
    """Evaluate a student on a feature cache.

    Fidelity per level, classification beside the teacher, test-time training; terminal table, JSON, PNGs."""
    from apmpipe.stages.evaluate import EvalConfig, evaluate

    from .report import plot_fidelity, plot_per_class

    config = EvalConfig(
        cache=cache, student=student, train_cache=train_cache, class_embeddings=str(class_embeddings) if class_embeddings else None,
        feature=feature, level=level, seed=seed, batch_size=batch_size, max_samples=max_samples, knn_k=knn_k, knn_temperature=knn_temperature, ttt_steps=ttt_steps, ttt_lr=ttt_lr,
        ttt_locations=ttt_locations, ttt_from=ttt_from.value, ttt_samples=ttt_samples, device=device, storage_options=parse_storage_options(storage_option),
    )
    report = evaluate(config)
    folder = out or Path(student if Path(student).is_dir() else Path(student).parent) / f"eval-{Path(cache.rstrip('/')).stem}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    plot_fidelity(report["fidelity"], folder / "fidelity.png")
    for key, result in report["classification"].items():
        if isinstance(result, dict):
            plot_per_class(result["per_class"], f"{result['method']}: per-class top-1", folder / f"per_class_{key}.png")
    print_eval_report(report, folder / "report.json")


def _fidelity_line(f: dict[str, float]) -> str:
    """Cosine and R^2 per token kind, the constant baseline's cosine beside."""
    parts = []
    for part in ("patch", "prefix"):
        if f"{part}_cosine" in f:
            base = f" (mean token {f[part + '_baseline_cosine']:.3f}), R2 {f[part + '_r2']:.3f}" if f"{part}_r2" in f else ""
            parts.append(f"{part} cos {f[part + '_cosine']:.3f}{base}")
    return "; ".join(parts)


def print_eval_report(report: dict[str, Any], json_path: Path) -> None:
    """The eval report as terminal tables."""
    rows = [("samples", str(report["samples"]))]
    for layer, f in report["fidelity"].items():
        rows.append((f"fidelity layer {layer}", _fidelity_line(f)))
    for key, result in report["classification"].items():
        if isinstance(result, dict):
            s, t = result["student"], result["teacher"]
            rows.append((result["method"], f"student top-1 {s['top1']:.3f} ({s['top1'] / max(t['top1'], 1e-9):.3f}x teacher) | teacher {t['top1']:.3f} | agree {result['agreement']:.3f}"))
        else:
            rows.append((key.replace("_", " "), result))
    if "ttt" in report:
        t = report["ttt"]
        rows.append(("test-time training", f"{t['samples']} samples x {t['steps']} steps from {t['start']}: {t['ms_per_step']:.1f} ms/step ({t['threads']} threads)"))
        last = list(t["fidelity_after"])[-1]
        rows.append(("  TTT fidelity, last level", f"before: {_fidelity_line(t['fidelity_before'][last])}; after: {_fidelity_line(t['fidelity_after'][last])}"))
        for key in ("head", "knn"):
            if f"{key}_before" in t:
                b, a = t[f"{key}_before"], t[f"{key}_after"]
                teacher = f" (teacher {t['teacher_head']['top1']:.3f})" if key == "head" and "top1" in t.get("teacher_head", {}) else ""
                rows.append((f"  TTT {key} top-1", f"{b.get('top1', float('nan')):.3f} -> {a.get('top1', float('nan')):.3f}{teacher}"))
    rows.append(("report", str(json_path)))
    out_console.print(_table("apmpipe eval", rows))


@app.command()
@reports_user_errors
def islands(
    ctx: typer.Context,
    sources: Annotated[list[str], typer.Argument(help="A feature cache (student beside teacher) or image files.", show_default=False)],
    student: Annotated[str, typer.Option(help="Run directory (or student.safetensors) from apmpipe train.", show_default=False)],
    out: Annotated[Path, typer.Option(help="PNG to write.")] = Path("islands.png"),
    images: Annotated[int, typer.Option(help="Images to draw (rows).")] = 4,
    mode: Annotated[IslandsMode, typer.Option(help="pca: 3 principal components as RGB; kmeans: clusters as colours.")] = IslandsMode.pca,
    clusters: Annotated[int, typer.Option(help="k-means clusters.")] = 6,
    panel: Annotated[int, typer.Option(help="Panel size in pixels.")] = 160,
    device: DeviceOption = "auto",
    storage_option: StorageOptions = [],
) -> None:
    """Draw islands of agreement in a student's outputs.

    Per-level student outputs (and the teacher's) as PCA colours or k-means clusters."""
    from apmpipe.stages.islands import islands as draw

    result = draw(student, sources, str(out), images=images, mode=mode.value, clusters=clusters, panel=panel, device=device,
                  storage_options=parse_storage_options(storage_option))
    if result.converted:
        err_console.print(f"islands: {result.converted}", highlight=False, markup=False, soft_wrap=True)
    out_console.print(f"wrote {result.path} ({result.width}x{result.height} px, {result.images} images{', student beside teacher' if result.with_teacher else ''})", highlight=False)


@app.command()
@reports_user_errors
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder for data, caches, student and the report.")] = Path("demo-out"),
    quick: Annotated[bool, typer.Option("--quick", help="A shorter teacher recipe and a 150-step student (for tests).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the train/val split, the teacher, the student and data order.")] = 0,
) -> None:
    """Run the whole pipeline offline on bundled digits.

    Real images (scikit-learn digits), a small trained teacher, and a report folder."""
    from .demo import run_demo

    summary = run_demo(out, quick=quick, seed=seed)
    print_eval_report(summary["eval"], out / "eval.json")
    out_console.print(f"report: {out / 'report.md'} (loss.png, fidelity.png, per-class plots, islands.png)", highlight=False)


@bench_app.command("extract")
@reports_user_errors
def bench_extract_command(
    ctx: typer.Context,
    sources: Annotated[Optional[list[str]], typer.Argument(help="Shards to extract (default: bundled digits written as shards).", show_default=False)] = None,
    teacher: Annotated[str, typer.Option(help="timm model name.")] = "vit_tiny_patch16_224",
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Load pretrained weights (not needed for speed).")] = False,
    model_arg: ModelArgs = [],
    layers: Annotated[str, typer.Option(help="Teacher blocks to cache, 1-based.")] = "4,8,12",
    images: Annotated[int, typer.Option(help="Images in the default dataset.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Images per forward.")] = 32,
    loader_workers: Annotated[int, typer.Option(help="DataLoader processes (-1: auto, as in extract).")] = -1,
    dtype: Annotated[TokenDtype, typer.Option(help="Token storage dtype.")] = TokenDtype.float16,
    codec: Annotated[Codec, typer.Option(help="Compressor.")] = Codec.zstd,
    device: DeviceOption = "auto",
) -> None:
    """Extraction speed beside the bare teacher forward.

    Extraction img/s vs bare forward_intermediates img/s (same teacher, batch, device); target ratio >= 0.95."""
    from apmpipe.stages.extract import ExtractConfig
    from apmpipe.stages.teacher import TeacherConfig

    from .bench import bench_extract, default_bench_shards, scratch_dir

    with scratch_dir() as tmp:
        inputs = sources or default_bench_shards(Path(tmp), images, 64)
        config = ExtractConfig(
            inputs=tuple(inputs), out=str(Path(tmp) / "bench.zarr"),
            teacher=TeacherConfig(teacher, pretrained=pretrained, model_kwargs=tuple(sorted(parse_key_values(model_arg, "--model-arg").items()))),
            layers=parse_int_list(layers, "--layers"), dtype=dtype.value, codec=codec.value, batch_size=batch_size,
            loader_workers=loader_workers, device=device,
        )
        result = bench_extract(config)
    rows = [
        ("machine", result.machine),
        ("images", f"{result.images} ({teacher}, batch {batch_size}, layers {layers})"),
        ("bare forward_intermediates", f"{result.forward_ips:.1f} img/s"),
        ("apmpipe extract", f"{result.extract_ips:.1f} img/s (decode in {result.loader_workers} workers, background writer)"),
        ("ratio extract / forward", f"{result.ratio:.3f} (target >= 0.95)"),
        ("stored bytes / image", f"{human_bytes(result.stored_bytes_per_image)} ({dtype.value}, {codec.value})"),
        ("raw bytes / image (fp32 tokens)", f"{human_bytes(result.raw_fp32_bytes_per_image)}; {result.compression:.2f}x smaller on disk"),
    ]
    out_console.print(_table("apmpipe bench extract", rows))


@bench_app.command("train")
@reports_user_errors
def bench_train_command(
    ctx: typer.Context,
    teacher: Annotated[str, typer.Option(help="timm model for the cache and the online baseline (random init).")] = "vit_small_patch16_224",
    images: Annotated[int, typer.Option(help="Bundled digit images in the cache.")] = 128,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    preset: Annotated[Preset, typer.Option(help="Student size.")] = Preset.small,
    loader_workers: Annotated[int, typer.Option(help="DataLoader processes.")] = 2,
    growth: Annotated[int, typer.Option(help="Cache growth factor for the peak-RSS check (1: skip it).")] = 10,
    locations: Annotated[int, typer.Option(help="Random grid locations per image per step (K), beside the all-locations rate.")] = 64,
    echo: Annotated[int, typer.Option(help="Steps per loaded batch (as apmpipe train --echo).")] = 1,
    student_rate: Annotated[float, typer.Option(help="A student rate (samples/s, e.g. measured on a GPU) to size the loader for.")] = 0.0,
    dtype: Annotated[TokenDtype, typer.Option(help="Token storage of the bench cache (as extract --dtype).")] = TokenDtype.float16,
    rank: Annotated[int, typer.Option(help="Low-rank token storage of the bench cache (as extract --rank; 0: whole tokens).")] = 0,
    device: DeviceOption = "auto",
) -> None:
    """Training speed: loader, student, cached vs online.

    Bytes per trained sample, loader vs student samples/s, cached vs online epoch, peak RSS (one run)."""
    from .bench import bench_train, scratch_dir

    resolved = device if device != "auto" else ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    with scratch_dir() as tmp:
        result = bench_train(Path(tmp), teacher, images, batch_size, preset.value, loader_workers, resolved, growth, locations, echo,
                             {"dtype": dtype.value, "rank": rank})
    k = f"K={locations}"
    rows = [
        ("machine", result.machine),
        ("setup", f"{result.samples} images, teacher {result.teacher} (layers 4,8,12, {dtype.value}{f', rank {rank}' if rank else ''}), "
                  f"student {preset.value}, batch {batch_size}, echo {echo}"),
        ("bytes read / trained sample", f"{human_bytes(result.bytes_per_trained_sample)} ({human_bytes(result.bytes_per_sample)} per loaded sample / echo {echo})"),
        ("(a) loader", f"{result.loader_sps:.1f} samples/s, {loader_workers} workers, decoding {result.decode_mb_s_per_worker:.0f} MB/s per worker"),
    ]
    for label, rate in result.student_sps.items():
        needed = result.loader_needed(rate)
        rows.append((f"(b) student, {label} locations", f"{rate:.1f} trained samples/s, needs {needed:.1f} loaded/s: loader / need {result.loader_sps / needed:.2f}x"
                     + (" (target >= 3)" if label == k else "")))
    if student_rate:
        needed = result.loader_needed(student_rate)
        rows.append(("loader for --student-rate", f"{student_rate:.0f} samples/s needs {needed:.0f} loaded/s = {needed * result.bytes_per_sample / 1e9:.2f} GB/s read; "
                     f"this loader gives {result.loader_sps / needed:.2f}x of it"))
    rows += [
        ("(c) cached epoch (apmpipe train)", f"{result.cached_epoch_s:.2f} s"),
        ("    online distillation epoch", f"{result.online_epoch_s:.2f} s (teacher forward every loaded batch, {k})"),
        ("online / cached", f"{result.cached_speedup:.2f}x (target >= 5)"),
    ]
    rows += [(f"peak RSS, {n} cached samples", f"{mib:.0f} MiB (train process + loader workers)") for n, mib in result.rss]
    out_console.print(_table("apmpipe bench train", rows))


@bench_app.command("ablation")
@reports_user_errors
def bench_ablation_command(
    ctx: typer.Context,
    workdir: Annotated[Path, typer.Option(help="Folder for the trained teacher, caches and runs (reused on reruns).")] = Path("bench-ablation"),
    steps: Annotated[int, typer.Option(help="Training steps of every run (--min-steps).")] = 1500,
    only: Annotated[Optional[list[str]], typer.Option(help="Run only the rows whose name contains this word (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split, teacher and every student.")] = 0,
) -> None:
    """Each training objective switched off in turn.

    On the demo's trained teacher: held-out R2 and teacher-head top-1."""
    from .bench import bench_ablation

    teacher, rows = bench_ablation(workdir, steps, seed, only)
    table = [("teacher", f"{teacher['folder']}: val top-1 {teacher['val_top1']:.3f} ({teacher['data']})"), ("steps per run", str(steps))]
    for row in rows:
        r2 = ", ".join(f"L{layer} {f.get('patch_r2', float('nan')):.3f}/{f.get('prefix_r2', float('nan')):.3f}" for layer, f in row.fidelity.items())
        s, t = row.head.get("student", {}).get("top1", float("nan")), row.head.get("teacher", {}).get("top1", float("nan"))
        table.append((row.name, f"R2 patch/CLS {r2} | head top-1 {s:.3f} / teacher {t:.3f} = {s / t:.3f}x | {row.seconds:.0f} s"))
    out_console.print(_table("apmpipe bench ablation", table))


def main(args: list[str] | None = None) -> None:
    """Console-script entry point: usage errors are one line with exit code 2, like user errors."""
    try:
        code = app(args=args, standalone_mode=False)
    except typer.Abort:
        err_console.print("aborted", highlight=False)
        raise SystemExit(130) from None
    except typer.TyperException as exc:  # the parser's usage errors (bad option value, missing argument)
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare ``apmpipe`` or ``apmpipe bench``: the help, no error
            typer.echo(message)
        else:
            err_console.print(f"error: {message}{hint}", highlight=False, markup=False, soft_wrap=True)
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    raise SystemExit(code if isinstance(code, int) else 0)
