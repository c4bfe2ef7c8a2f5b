"""Durable local files: write whole or not at all (temporary name, fsync, rename, fsync the folder).

Run directories (:mod:`.checkpoint`) and embedding folders (:mod:`.embeddings`) write through these, so a killed
process never leaves a half-written file under a final name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import ConfigError
from .redact import redact_url

TMP_SUFFIX = ".tmp"  # temporaries end so; writers remove stale ones on start


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it into place, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def check_writable(out: str, option: str = "--out", *, folder: bool = True) -> None:
    """Refuse (ConfigError), before any work is done, a local output where nothing can be created: the folder
    ``out`` (``folder``), or the folder that would hold the file ``out``; the nearest existing one is probed by
    creating a file in it (permission bits do not tell: root ignores them, an immutable folder or a read-only mount
    refuses all the same). URLs are not probed: a probe would cost requests and could leave an object behind."""
    if "://" in out and not out.startswith("file://"):
        return
    path = Path(out.removeprefix("file://"))
    if not folder and path.is_dir():
        raise ConfigError(f"{option} {redact_url(out)!r} is a folder; name the file to write in it")
    existing = (path if folder else path.parent).absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".apmpipe-write-check-")
    except OSError as exc:
        where = "" if existing == path.absolute() else f" (in {redact_url(str(existing))})"
        raise ConfigError(
            f"{option} {redact_url(out)!r} cannot be written{where}: {exc.strerror or exc}; choose another {option} "
            "or make it writable"
        ) from None
    os.close(fd)
    os.unlink(probe)
