"""The one domain exception of apmpipe and its few subclasses.

Every user-facing problem (bad option, unreadable input, incompatible cache, missing weights) is raised as an
``ApmError`` whose message is one complete line: what is wrong and what to do. The CLI prints that line and
exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .redact import redact_url

_OBJECT_REPR = re.compile(r"\s*@?\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")  # <_io.BytesIO object at 0x7f...>


class ApmError(Exception):
    """Root of all errors that are the user's to fix."""


class ConfigError(ApmError):
    """An option or config value is invalid or inconsistent."""


class InputError(ApmError):
    """An input dataset (shard, folder, image) is missing or unreadable."""


class CacheError(ApmError):
    """A feature cache is missing, incomplete, incompatible or corrupt."""


class ModelError(ApmError):
    """A teacher or student cannot be built, loaded or matched to a cache."""


def require_at_least(config: object, names: Iterable[str], minimum: int) -> None:
    """Raise ConfigError naming the ``--option`` whose value on ``config`` is below ``minimum``."""
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            bound = "at least 1" if minimum == 1 else f"{minimum} or more"
            raise ConfigError(f"--{name.replace('_', '-')} must be {bound}, got {value}")


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


def failure_line(exc: BaseException) -> str:
    """One line for a failure: the message of a domain error, else the exception's type and plain message."""
    return str(exc) if isinstance(exc, ApmError) else f"{type(exc).__name__}: {plain_message(exc)}"
