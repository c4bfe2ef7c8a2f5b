"""The one domain exception of apmpipe and its few subclasses.

Every user-facing problem (bad option, unreadable input, incompatible cache, missing weights) is raised as an
``ApmError`` whose message is one complete line: what is wrong and what to do. The CLI prints that line and
exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


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


def require_at_least(config: object, names: Iterable[str], minimum: int) -> None:
    """Raise ConfigError naming the ``--option`` whose value on ``config`` is below ``minimum``."""
    for name in names:
        value = getattr(config, name)
        if value < minimum:
            bound = "at least 1" if minimum == 1 else f"{minimum} or more"
            raise ConfigError(f"--{name.replace('_', '-')} must be {bound}, got {value}")
