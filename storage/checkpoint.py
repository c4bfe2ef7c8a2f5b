"""Run directories, local or on an object store: atomic training checkpoints, the exported student, metrics and
the resolved config.

Layout of a run directory (a local folder or any fsspec URL: ``s3://bucket/run``, ``gs://...``, ``memory://...``)::

    config.toml                 resolved training options
    metrics.jsonl               one JSON object per logged step
    checkpoints/step-00000500/  model.safetensors + state.pt (optimizer, scheduler, step, loader position, RNG)
    checkpoints/latest          name of the newest complete checkpoint (what a resume reads)
    student.safetensors         final weights; metadata holds the student and cache-layout JSON
    .apmpipe-train.lock         while train runs: its writer lock (:mod:`.locks`)

``latest`` publishes a checkpoint: nothing reads a checkpoint folder that ``latest`` does not name, so a killed
save never leaves a run that cannot resume.

* Local folders: a checkpoint is written under a temporary name, its files and itself fsynced, renamed into place
  (the parent fsynced), and ``latest`` is replaced atomically after it; when one step is saved twice, ``latest``
  names the new copy before the old one is removed. ``metrics.jsonl`` is appended record by record.
* Object stores have no rename and no append. A checkpoint is written whole under a fresh name
  (``step-00000500-<random>/``), then ``latest`` is written last (one small object: a single PUT is atomic).
  ``metrics.jsonl`` is kept in memory and the whole object rewritten at each checkpoint (before ``latest``) and at
  export: after a kill it holds the records up to the last checkpoint at least, the ones a resumed run keeps.

What a killed save left (local temporaries, unpublished folders newer than ``latest``) is removed at the next save
and at a run's start (:meth:`RunDir.remove_stale_temporaries`). ``state.pt`` holds only tensors and plain Python
values and is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .errors import ModelError
from .files import TMP_SUFFIX, atomic_write, fsync_path
from .kinds import STUDENT_FILE, TRAINING_RUN, wrong_kind
from .redact import redact_url

KEEP_CHECKPOINTS = 2
CHECKPOINT_FILES = ("model.safetensors", "state.pt")
_logger = logging.getLogger(__name__)
_STEP = re.compile(r"step-(\d+)(-[0-9a-f]+)?")  # local: step-00000500; object stores add -<random>


def _step_of(name: str) -> int | None:
    """The step of a checkpoint folder's name; None for anything else (temporaries, ``latest``)."""
    match = _STEP.fullmatch(name)
    return int(match.group(1)) if match else None


def _safetensors_bytes(weights: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in weights.items()}, metadata)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte little-endian length, then JSON)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})


class RunDir:
    """One training run's directory (rank 0 writes it): a local folder or an fsspec URL."""

    def __init__(self, url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        self.root = root.rstrip("/")
        if not self.local:
            self.fs.invalidate_cache(self.root)  # another process (the killed run) may have written since a listing
        self.checkpoints = f"{self.root}/checkpoints"
        self._records: list[dict[str, Any]] | None = None  # object stores: metrics.jsonl as it will be rewritten

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _write(self, name: str, data: bytes) -> None:
        """Replace the file ``name`` (relative to the run) whole and atomically."""
        if self.local:
            atomic_write(Path(self._path(name)), data)
        else:
            self.fs.pipe_file(self._path(name), data)

    def _read(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            return None

    def _remove(self, path: str) -> None:
        if self.local:
            if Path(path).is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                Path(path).unlink(missing_ok=True)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def _checkpoint_names(self) -> list[str]:
        """Every entry of ``checkpoints/`` (folders and files), sorted."""
        try:
            return sorted(
                p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.checkpoints, detail=False, refresh=True)
            )
        except FileNotFoundError:
            return []

    def has_checkpoint(self) -> bool:
        return self.fs.exists(self._path("checkpoints/latest"))

    def _latest_name(self) -> str:
        data = self._read("checkpoints/latest")
        return data.decode().strip() if data else ""

    def remove_stale_temporaries(self) -> None:
        """Remove what a killed save left, never what ``latest`` names: temporaries (``.tmp-*`` folders, ``*.tmp``
        files) and checkpoint folders that were never published (not older than ``latest``). Call it at the start
        of a run, on the rank that writes."""
        keep = self._latest_name()
        newest = _step_of(keep) if keep else -1
        for name in self._checkpoint_names():
            step = _step_of(name)
            unpublished = step is not None and newest is not None and step >= newest
            if name != keep and name != "latest" and (name.startswith(".") or unpublished):
                self._remove(f"{self.checkpoints}/{name}")
        if self.local:
            for path in Path(self.root).glob(f".*{TMP_SUFFIX}"):
                path.unlink(missing_ok=True)

    def save_checkpoint(self, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> str:
        """Write and publish the checkpoint of ``step``; returns its folder (as the filesystem names it)."""
        self.remove_stale_temporaries()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        files = dict(zip(CHECKPOINT_FILES, (_safetensors_bytes(weights), buffer.getvalue()), strict=True))
        name = f"step-{step:08d}"
        if self.local:
            self._publish_local(name, files)
        else:
            name = f"{name}-{secrets.token_hex(4)}"  # a fresh name: never overwrite what latest may name
            self.fs.pipe({f"{self.checkpoints}/{name}/{file}": data for file, data in files.items()})
            self._flush_metrics()
            self._write("checkpoints/latest", name.encode())
        older = [n for n in self._checkpoint_names() if _step_of(n) is not None and n != name]
        for old in older[: max(0, len(older) - (KEEP_CHECKPOINTS - 1))]:
            self._remove(f"{self.checkpoints}/{old}")
        return f"{self.checkpoints}/{name}"

    def _publish_local(self, name: str, files: dict[str, bytes]) -> None:
        folder = Path(self.checkpoints)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / name
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
        for file, data in files.items():
            (tmp / file).write_bytes(data)
        for path in (*(tmp / file for file in files), tmp):
            fsync_path(path)
        if final.exists():  # the same step again (a resumed run): name the new copy in latest before the old one goes
            self._write("checkpoints/latest", tmp.name.encode())
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(folder)
        self._write("checkpoints/latest", name.encode())

    def _checkpoint_folder(self) -> str:
        """The folder ``latest`` names, or (after a crash of an older apmpipe left it dangling) the newest complete
        one."""
        named = f"{self.checkpoints}/{self._latest_name()}"
        if self.fs.exists(f"{named}/state.pt"):
            return named
        complete = [
            f"{self.checkpoints}/{n}"
            for n in self._checkpoint_names()
            if _step_of(n) is not None and all(self.fs.exists(f"{self.checkpoints}/{n}/{f}") for f in CHECKPOINT_FILES)
        ]
        if not complete:
            raise ModelError(
                f"checkpoint {redact_url(named)} is missing and {redact_url(self.checkpoints)} holds no complete one; "
                "drop --resume to start a new run"
            )
        return complete[-1]

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The newest complete checkpoint's weights and state."""
        if not self.has_checkpoint():
            raise ModelError(f"no checkpoint in {redact_url(self.url)}; drop --resume to start a new run")
        folder = self._checkpoint_folder()
        weights = load_safetensors(self.fs.cat_file(f"{folder}/model.safetensors"))
        state = torch.load(io.BytesIO(self.fs.cat_file(f"{folder}/state.pt")), map_location="cpu", weights_only=True)
        return weights, state

    def saved_options(self) -> dict[str, Any]:
        """The resolved options in ``config.toml`` (empty when the run has none yet)."""
        data = self._read("config.toml")
        return tomllib.loads(data.decode()) if data else {}

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Add one record: appended to a local ``metrics.jsonl`` now, published with the next checkpoint on an
        object store."""
        if self.local:
            with Path(self._path("metrics.jsonl")).open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        else:
            if self._records is None:
                self._records = self.read_metrics()
            self._records.append(record)

    def _flush_metrics(self) -> None:
        if self._records is not None:
            self._write("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self._records).encode())

    def reset_metrics(self) -> None:
        """Start ``metrics.jsonl`` afresh (a new run)."""
        self._remove(self._path("metrics.jsonl"))
        self._records = None if self.local else []

    def truncate_metrics(self, step: int) -> None:
        """Drop records after ``step`` (a resumed run rewrites them)."""
        kept = [r for r in self.read_metrics() if r["step"] <= step]
        self._records = None if self.local else kept
        if self.fs.exists(self._path("metrics.jsonl")):
            self._write("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept).encode())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The logged records. A torn last line (a kill or a full disk during an append) is dropped with a warning;
        a resumed run then rewrites the file without it."""
        data = self._read("metrics.jsonl")
        lines = [line for line in data.decode(errors="replace").splitlines() if line] if data else []
        where = redact_url(f"{self.url.rstrip('/')}/metrics.jsonl")
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise ModelError(f"line {number} of {where} is not JSON; delete that line and rerun") from None
                _logger.warning(
                    "dropped the torn last line of %s (%d characters, written by a killed run)", where, len(line)
                )
        return records

    def write_text(self, name: str, text: str) -> None:
        self._write(name, text.encode())

    def save_student(self, weights: dict[str, torch.Tensor], metadata: dict[str, Any]) -> str:
        """Export final weights with their description (JSON strings in the safetensors metadata)."""
        self._flush_metrics()
        self._write(STUDENT_FILE, _safetensors_bytes(weights, {k: json.dumps(v) for k, v in metadata.items()}))
        return self.url.rstrip("/") + "/" + STUDENT_FILE


def load_student(
    path: str | os.PathLike, storage_options: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and metadata of an exported student: a run directory or its ``student.safetensors`` (local or URL)."""
    url = str(path)
    fs, where = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if not fs.exists(where):
        raise ModelError(
            f"no trained student at {redact_url(url)}: it does not exist; pass the --out folder of apmpipe train (or "
            f"its {STUDENT_FILE})"
        )
    if message := wrong_kind(url, TRAINING_RUN, storage_options):
        raise ModelError(message)
    file = _student_file(fs, where)
    if not fs.exists(file):
        unfinished = (
            " (it holds checkpoints: finish the run with apmpipe train ... --resume)"
            if RunDir(url, storage_options).has_checkpoint()
            else ""
        )
        raise ModelError(
            f"no trained student at {redact_url(url)}: it holds no {STUDENT_FILE}{unfinished}; train one with "
            f"apmpipe train CACHE --out {redact_url(url)}"
        )
    data = fs.cat_file(file)
    return load_safetensors(data), {k: json.loads(v) for k, v in _safetensors_metadata(data).items()}


def _student_file(fs: fsspec.AbstractFileSystem, where: str) -> str:
    """The student file of a run directory, or ``where`` itself when it names the file."""
    return f"{where.rstrip('/')}/{STUDENT_FILE}" if fs.isdir(where) else where


def student_digest(path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> str:
    """sha256 of an exported student's file (run directory or ``student.safetensors``, local or URL): its identity
    in what it made (``apmpipe embed`` outputs)."""
    fs, where = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
    digest = hashlib.sha256()
    with fs.open(_student_file(fs, where), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
