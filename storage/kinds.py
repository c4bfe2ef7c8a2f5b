"""What a path holds, among the things apmpipe reads and writes (a feature cache, a training run, an embedding folder,
input images), so that a message about a path of the wrong kind names what it is and which command takes it.

Recognised by the files each kind always has; reading them costs one listing and at most one small JSON file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import fsspec

from .redact import redact_url

STUDENT_FILE = "student.safetensors"  # the exported student of a run (storage.checkpoint writes it)
RUN_FILES = (STUDENT_FILE, "checkpoints", "metrics.jsonl", "config.toml")  # any of them: a run folder


@dataclass(frozen=True)
class Kind:
    """A kind of path: what it is (``name``) and which commands take it (``taken_by``)."""

    name: str
    taken_by: str


FEATURE_CACHE = Kind(
    "a feature cache (apmpipe extract --out)", "train, eval, info and verify take a cache as their CACHE argument"
)
TRAINING_RUN = Kind("a training run (apmpipe train --out)", "eval, embed and islands take a run as --student")
TRAINED_STUDENT = Kind("a trained student (apmpipe train)", "eval, embed and islands take it as --student")
EMBEDDINGS = Kind("an embedding folder (apmpipe embed --out)", "it holds .npy and parquet parts for your own code")
IMAGES = Kind("input images", "extract and embed read images (tar shards or a folder root/<class>/<file>)")
INPUT_SHARD = Kind(
    "an input shard", "extract it first (apmpipe extract SHARDS --out CACHE.zarr --teacher NAME), then use CACHE.zarr"
)


def kind_of(fs: fsspec.AbstractFileSystem, path: str) -> Kind | None:
    """The kind of ``path`` on ``fs`` when apmpipe recognises it, else None."""
    from .embeddings import FORMAT_NAME as EMBEDDINGS_FORMAT
    from .embeddings import MANIFEST
    from .format import FORMAT_NAME as CACHE_FORMAT  # (imported here: format.py loads zarr, naming a path does not)
    from .sources import TAR_SUFFIXES

    if path.lower().rstrip("/").endswith(TAR_SUFFIXES):
        return INPUT_SHARD
    if path.rstrip("/").endswith(STUDENT_FILE):
        return TRAINED_STUDENT
    if not fs.isdir(path):
        return None
    names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}
    if "zarr.json" in names and _json_text(fs, f"{path.rstrip('/')}/zarr.json").find(CACHE_FORMAT) >= 0:
        return FEATURE_CACHE
    if MANIFEST in names and _json_text(fs, f"{path.rstrip('/')}/{MANIFEST}").find(EMBEDDINGS_FORMAT) >= 0:
        return EMBEDDINGS
    if names & set(RUN_FILES):
        return TRAINING_RUN
    return None


def _json_text(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The text of a small JSON file, or '' when it cannot be read or parsed."""
    try:
        return json.dumps(json.loads(fs.cat_file(path)))
    except (OSError, ValueError):
        return ""


def wrong_kind(url: str, wanted: Kind, storage_options: dict[str, Any] | None = None) -> str | None:
    """A message when ``url`` is a recognised kind other than ``wanted``, else None (it does not exist, or apmpipe
    does not know what it is)."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        have = kind_of(fs, path) if fs.exists(path) else None
    except (OSError, ValueError):
        return None
    return kind_mismatch(url, have, wanted)


def kind_mismatch(url: str, have: Kind | None, wanted: Kind) -> str | None:
    """``url`` is ``have`` where ``wanted`` was expected: what it is, and which commands take each kind (None when
    ``have`` is unknown or will do)."""
    if have is None or have == wanted or {have, wanted} in ({TRAINING_RUN, TRAINED_STUDENT}, {INPUT_SHARD, IMAGES}):
        return None
    return f"{redact_url(url)!r} is {have.name}, not {wanted.name}: {have.taken_by}; {wanted.taken_by}"
