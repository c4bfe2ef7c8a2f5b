"""What every command shares: the command class (usage names its arguments), one-line user errors, the options
several commands take (device, storage options, teacher arguments, token storage, student size), the global
--threads, and the parsers of comma lists and KEY=VALUE pairs."""

from __future__ import annotations

import ast
import functools
import os
import sys
from collections.abc import Callable
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand

from apmpipe.storage.errors import ApmError, ConfigError

from ..console import err_console


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


DEFAULT_CODEC_CHOICE = Codec.blosc_lz4  # storage.format.DEFAULT_CODEC, without importing zarr here (a test checks)


class Preset(StrEnum):
    paper = "paper"
    base = "base"
    small = "small"
    tiny = "tiny"


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


class ApmTyper(typer.Typer):
    """A group of commands that use :class:`ApmCommand` and report user errors in one line (each command module's
    ``app``)."""

    def command(self, name: str | None = None, **kwargs: Any) -> Callable[[F], F]:
        register = super().command(name, cls=ApmCommand, **kwargs)
        return lambda function: register(reports_user_errors(function))


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


def parse_views(text: str) -> int | None:
    """``--views``: a count, or ``auto`` (None, decided from the inputs' images)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--views {text!r} is neither a count nor auto; e.g. --views 4 or --views auto") from None


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


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """``--storage-option`` pairs; ``endpoint_url`` goes where s3fs expects it (``client_kwargs``)."""
    from apmpipe.storage.remote import route_storage_options

    return route_storage_options(parse_key_values(items, "--storage-option"))
