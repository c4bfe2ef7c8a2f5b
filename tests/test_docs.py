"""README and docs/ kept true: every option of every command in its page, defaults as ``--help`` shows them,
command lines that parse, links that resolve, CI's test command as printed, and the README walkthrough run
exactly as printed."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from apmpipe.pipeline.cli import app
from apmpipe.pipeline.datasets import digit_images

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = sorted([README, *DOCS.glob("*.md"), ROOT / "storage" / "FORMAT.md"])

# the page that documents every option of each command (a new command fails the test until it has one)
COMMAND_PAGES = {
    (): "install.md",
    ("extract",): "extract.md",
    ("info",): "inspect.md",
    ("verify",): "inspect.md",
    ("train",): "train.md",
    ("eval",): "eval.md",
    ("islands",): "eval.md",
    ("embed",): "embed.md",
    ("demo",): "demo.md",
    ("bench", "extract"): "bench.md",
    ("bench", "train"): "bench.md",
    ("bench", "codecs"): "bench.md",
    ("bench", "pipeline"): "bench.md",
    ("bench", "ablation"): "bench.md",
    ("bench", "bytes"): "bench.md",
    ("bench", "augment"): "bench.md",
}
WALKTHROUGH_MARK = "<!-- walkthrough:"


def _commands() -> Iterator[tuple[tuple[str, ...], Any, typer.Context]]:
    """Every command and subcommand of the ``apmpipe`` app (groups with options of their own included), with the
    context its help is rendered in."""
    root = typer.main.get_command(app)
    pending = [((), root, typer.Context(root, info_name="apmpipe"))]
    while pending:
        path, command, ctx = pending.pop(0)
        if not hasattr(command, "commands") or command.params:
            yield path, command, ctx
        for name, sub in getattr(command, "commands", {}).items():
            pending.append(((*path, name), sub, typer.Context(sub, info_name=name, parent=ctx)))


def _command(path: tuple[str, ...]) -> tuple[Any, typer.Context]:
    return next((command, ctx) for found, command, ctx in _commands() if found == path)


def _param_names(param: Any) -> set[str]:
    """How a parameter is written in a table's first cell: its option strings, or an argument's NAME."""
    if param.param_type_name == "argument":
        return {param.name.upper()}
    return {*param.opts, *param.secondary_opts}


def _shown_default(param: Any, ctx: typer.Context) -> str | None:
    """The default ``--help`` shows for ``param`` ("required" for required ones), or None when it shows none."""
    if param.required:
        return "required"
    record = param.get_help_record(ctx)
    match = re.search(r"\[default: (.*?)\]", record[1]) if record else None
    return f"`{match.group(1)}`" if match else None


def _table_rows(text: str, heading: str) -> list[tuple[str, str]]:
    """(first cell, second cell) of each row of the first table after ``heading``."""
    section = text.split(heading, 1)[1]
    rows = []
    for line in section.split("\n|---", 1)[1].split("\n")[1:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append((cells[0], cells[1]))
    return rows


def _cell_names(cell: str) -> tuple[str | None, set[str]]:
    """A first cell's optional subcommand prefix (``info --sizes``) and the option/argument names it holds."""
    spans = re.findall(r"`([^`]+)`", cell)
    words = " ".join(spans).split()
    prefix = words[0] if words and words[0].islower() and not words[0].startswith("-") else None
    return prefix, {word for word in words if word.startswith("-") or word.isupper()}


def _check_row(command: Any, ctx: typer.Context, names: set[str], default: str, where: str) -> None:
    params = [param for param in command.params if _param_names(param) & names]
    assert len(params) == 1, f"{where}: {sorted(names)} is not one option of '{ctx.command_path}'"
    assert names == _param_names(params[0]), f"{where}: write {sorted(_param_names(params[0]))}, not {sorted(names)}"
    shown = _shown_default(params[0], ctx)
    assert shown is None or default == shown, f"{where}: {sorted(names)} defaults to {shown}, not {default}"


def test_every_command_has_a_docs_page() -> None:
    assert {path for path, _, _ in _commands()} == set(COMMAND_PAGES)


@pytest.mark.parametrize("path", sorted(COMMAND_PAGES), ids=lambda path: " ".join(("apmpipe", *path)))
def test_every_option_is_in_its_page_with_the_default_help_shows(path: tuple[str, ...]) -> None:
    command, ctx = _command(path)
    page = DOCS / COMMAND_PAGES[path]
    heading = f"### `{' '.join(('apmpipe', *path))}` options"
    text = page.read_text()
    assert heading in text, f"{page.name} has no '{heading}' table"
    rows = _table_rows(text, heading)
    for cell, default in rows:
        _check_row(command, ctx, _cell_names(cell)[1], default, f"{page.name}, {heading}")
    listed = set().union(*(_cell_names(cell)[1] for cell, _ in rows))
    missing = set().union(*map(_param_names, command.params)) - listed
    assert not missing, f"{page.name}, {heading}: add {sorted(missing)}"


def test_the_readme_option_tables_match_help() -> None:
    text = README.read_text()
    headings = re.findall(r"^### (`apmpipe .*)$", text, re.M)
    assert headings, "README has no option tables"
    for heading in headings:
        paths = [tuple(name.split()[1:]) for name in re.findall(r"`(apmpipe [^`]+)`", heading)]
        for cell, default in _table_rows(text, heading):
            prefix, names = _cell_names(cell)
            path = next((path for path in paths if prefix is None or path[-1] == prefix), paths[0])
            _check_row(*_command(path), names, default, f"README, {heading}")


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


def _invocations(block: str) -> Iterator[list[str]]:
    """The argument lists after ``apmpipe`` (or ``-m apmpipe.pipeline``) of each command line in a bash block."""
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        tokens = list(lexer)
        for index, token in enumerate(tokens):
            if token in ("apmpipe", "apmpipe.pipeline") or token.endswith("/apmpipe"):
                ends = (i for i in range(index + 1, len(tokens)) if tokens[i] in ("&&", "||", "|", ";", "&"))
                yield tokens[index + 1 : next(ends, None)]


def _check_invocation(args: list[str], where: str) -> None:
    """Global options, then a command (and subcommand), then only options that command has."""
    path: tuple[str, ...] = ()
    command, _ = _command(())
    rest = list(args)
    while rest:
        token = rest.pop(0)
        subcommands = getattr(command, "commands", {})
        if token in subcommands:
            path, command = (*path, token), subcommands[token]
            continue
        if not token.startswith("--") or token == "--help":
            continue
        name = token.split("=", 1)[0]
        options = {name for param in command.params for name in _param_names(param)}
        assert name in options, f"{where}: 'apmpipe {' '.join(args)}': {' '.join(('apmpipe', *path))} has no {name}"


def test_every_command_line_in_the_docs_names_real_options() -> None:
    """In bash blocks and inline code alike (``apmpipe eval --train-cache``)."""
    checked = 0
    for page in PAGES:
        text = page.read_text()
        inline = re.findall(r"`((?:\.venv/bin/)?apmpipe [^`]+)`", text)
        for block in [*_code_blocks(text, "bash"), *inline]:
            for args in _invocations(block):
                _check_invocation(args, page.name)
                checked += 1
    assert checked > 50


def _heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_every_docs_link_resolves() -> None:
    linked = 0
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page
            assert resolved.is_file(), f"{page.name} links to {target}, which does not exist"
            if anchor:
                assert anchor in _heading_anchors(resolved.read_text()), f"{page.name}: no heading for {target}"
            linked += 1
    assert linked > 20
    assert {path.name for path in DOCS.glob("*.md")} <= {
        Path(target).name for target in re.findall(r"\]\((docs/[^)#]+)", README.read_text())
    }, "a docs page the README does not link to"


def test_ci_runs_the_readme_test_command() -> None:
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in README.read_text().splitlines()


def _walkthrough() -> list[list[str]]:
    """The README walkthrough's command lines, as printed (comments and blank lines left out)."""
    section = README.read_text().split(WALKTHROUGH_MARK, 1)[1]
    block = _code_blocks(section, "bash")[0]
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def _write_image_folders(root: Path) -> None:
    """Real images in the layout the walkthrough asks for: photos/{train,val}/<class>/<image>.png."""
    images, labels = digit_images(32, "RGB")
    for split, indices in (("train", range(64)), ("val", range(1000, 1032))):
        for index in indices:
            folder = root / "photos" / split / f"digit{labels[index]}"
            folder.mkdir(parents=True, exist_ok=True)
            images[index].save(folder / f"{index:05d}.png")


def test_the_readme_walkthrough_runs_as_printed(tmp_path: Path) -> None:
    commands = _walkthrough()
    assert [command[:2] for command in commands] == [
        ["apmpipe", "extract"],
        ["apmpipe", "extract"],
        ["apmpipe", "train"],
        ["apmpipe", "eval"],
        ["apmpipe", "embed"],
    ]
    script = Path(sys.executable).with_name("apmpipe")  # the installed console script
    assert script.exists()
    _write_image_folders(tmp_path)
    for command in commands:
        result = subprocess.run([script, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stderr[-3000:]}"
        for flag in ("--out", "-o"):
            if flag in command:
                assert (tmp_path / command[command.index(flag) + 1]).exists(), shlex.join(command)
    assert list(tmp_path.glob("runs/*/student.safetensors")) and list(tmp_path.glob("runs/*/eval-*/eval.json"))
    assert list(tmp_path.glob("emb/manifest.json"))
