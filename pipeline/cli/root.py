"""The root of the ``apmpipe`` command line: its global options, every command's module added in the order
``--help`` lists them, and the console-script entry point (usage errors as one line, exit code 2)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer

from ..console import err_console, out_console
from . import bench, demo, embed, evaluate, extract, inspect, train
from .options import set_cpu_threads

app = typer.Typer(
    name="apmpipe",
    help="Feature-cache distillation for the Asynchronous Perception Machine: extract a timm teacher's tokens "
    "once, train the APM student from the cache, evaluate it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: whole option names and a wide description column at 80 columns
)
for command in (extract, inspect, train, evaluate, embed, demo):  # in the order --help lists them
    app.add_typer(command.app)
app.add_typer(bench.app, name="bench")


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
