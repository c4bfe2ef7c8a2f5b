"""Remote URLs as users give them: fsspec storage options routed to where each filesystem expects them, and
local folders staged for upload."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


def route_storage_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with ``endpoint_url`` moved where s3fs reads it (``client_kwargs``); other keys unchanged.

    Users name an S3-compatible server (MinIO, moto) as ``endpoint_url=http://...``, as boto does; s3fs takes
    it inside ``client_kwargs``.
    """
    routed = dict(options)
    if "endpoint_url" in routed:
        routed["client_kwargs"] = {**routed.get("client_kwargs", {}), "endpoint_url": routed.pop("endpoint_url")}
    return routed


def canonical_url(url: str) -> str:
    """One spelling per location, to tell two spellings of one cache apart from two caches: protocol plus absolute
    path (local paths with symlinks resolved, trailing slashes dropped). :func:`absolute_url` is what a run records."""
    fs, path = fsspec.core.url_to_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return "file://" + os.path.realpath(path)
    return f"{protocol}://{path.rstrip('/')}"


def absolute_url(url: str) -> str:
    """``url`` as it opens from any working directory: a local path made absolute (``./c.zarr/`` ->
    ``/work/c.zarr``), a URL (``s3://...``, ``file://...``, an fsspec chain) unchanged."""
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


@contextmanager
def staged_folder(url: str, storage_options: dict[str, Any] | None = None) -> Iterator[Path]:
    """A local folder whose files end up at ``url``: the folder itself for a local path; for a remote URL a temporary
    folder whose files are uploaded (each one object, whole) when the block ends without error."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="apmpipe-") as tmp:
        yield Path(tmp)
        for file in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
            fs.put_file(str(file), f"{path.rstrip('/')}/{file.relative_to(tmp).as_posix()}")
