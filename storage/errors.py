"""The one domain exception of apmpipe and its few subclasses.

Every user-facing problem (bad option, unreadable input, incompatible cache, missing weights) is raised as an
``ApmError`` whose message is one complete line: what is wrong and what to do. The CLI prints that line and
exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .redact import redact_in, redact_url

_OBJECT_REPR = re.compile(r"\s*@?\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")  # <_io.BytesIO object at 0x7f...>


class ApmError(Exception):
    """Root of all errors that are the user's to fix."""

    def __init__(self, message: str = "", *args: object) -> None:
        super().__init__(_unwrapped(message), *args)


def _unwrapped(message: str) -> str:
    """The one-line message of an ApmError raised in a DataLoader worker: torch re-raises it in the main process as
    ``type("Caught X in DataLoader worker process N.\nOriginal Traceback ...\nmodule.X: message")``."""
    if isinstance(message, str) and message.startswith("Caught ") and "\nOriginal Traceback" in message:
        last = message.rstrip("\n").rsplit("\n", 1)[-1]
        return last.partition(": ")[2] or last
    return message


class ConfigError(ApmError):
    """An option or config value is invalid or inconsistent."""


class InputError(ApmError):
    """An input dataset (shard, folder, image) is missing or unreadable."""


class CacheError(ApmError):
    """A feature cache is missing, incomplete, incompatible or corrupt."""


class ModelError(ApmError):
    """A teacher or student cannot be built, loaded or matched to a cache."""


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: finite, at least ``low`` (above it when ``strict``), at most ``high``."""

    low: float | None = None
    high: float | None = None
    strict: bool = False

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.strict else value < self.low):
            return False
        return self.high is None or value <= self.high

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"between {self.low} and {self.high}"
        if self.high is not None:
            return f"at most {self.high}"
        if self.low is None:
            return "a finite number"
        if self.strict:
            return "positive" if self.low == 0 else f"above {self.low}"
        return f"at least {self.low}"


ANY_NUMBER = Range()  # finite; further checks against the data where it is known
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, strict=True)
AT_LEAST_ONE = Range(1)
WORKERS = Range(-1)  # -1: auto, 0: in the main process


def check_ranges(values: Mapping[str, Any], ranges: Mapping[str, Range]) -> None:
    """Raise ConfigError naming the first ``--option`` in ``ranges`` whose value in ``values`` (a config's
    ``vars``) is outside its range; None (not set) passes. Every stage config checks its numeric options here."""
    for name, allowed in ranges.items():
        value = values[name]
        if value is not None and not allowed.admits(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be {allowed}, got {value}")


def check_choice(option: str, value: Any, choices: Iterable[str]) -> None:
    """Raise ConfigError when ``option``'s ``value`` (``option`` as the user names it, e.g. ``--trunk``) is not one of
    ``choices``: the one check of an option that names one of a fixed set."""
    if value not in choices:
        raise ConfigError(f"{option} {value!r} is not one of {', '.join(choices)}")


def plain_message(exc: BaseException) -> str:
    """An exception's message in plain words and values, for a skip or failure line: object reprs dropped (PIL's
    ``<_io.BytesIO object at 0x...>``), and an exception whose arguments are (message, stream object, url), as
    tar errors from webdataset, shown as ``message (url)``; the type name when nothing is left."""
    if isinstance(exc, ApmError):
        return str(exc)
    texts = [_OBJECT_REPR.sub("", str(arg)).strip() for arg in exc.args if isinstance(arg, str | int | float)]
    texts = [text for text in texts if text]
    if texts and len(texts) < len(exc.args):  # arguments beside the text are objects: the text ones, in words
        return texts[0] + (f" ({', '.join(redact_url(text) for text in texts[1:])})" if len(texts) > 1 else "")
    return _OBJECT_REPR.sub("", str(exc)).strip() or type(exc).__name__


def failure_line(exc: BaseException, urls: Iterable[str] = ()) -> str:
    """One line for a failure: the message of a domain error, else the exception's type and plain message; ``urls``
    (the shard's, the cache's) redacted wherever the text quotes them."""
    return redact_in(str(exc) if isinstance(exc, ApmError) else f"{type(exc).__name__}: {plain_message(exc)}", urls)
