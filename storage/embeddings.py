"""Embedding folders written by ``apmpipe embed``: per input shard (a *part*) one ``.npy`` per array and one
parquet of its samples, plus ``manifest.json`` (the student, the options, the levels and the completed parts).

Layout (clip-retrieval's: one folder per kind of array, one file per part)::

    manifest.json
    emb_layer{L}/{part}.npy      global feature of each image at the level of teacher layer L   [N, F]
    tokens_layer{L}/{part}.npy   (--tokens) the student's predicted token grid at that level    [N, T, D]
                                 (written batch by batch: see RowFile)
    logits/{part}.npy            (with a teacher head) teacher-head logits of the last level    [N, K] float32
    metadata/{part}.parquet      key, label, part, row, source (+ topk_classes, topk_probs with a head)
    .apmpipe-embed.lock          while ``apmpipe embed`` runs: its POSIX record lock and pid (not data)

Row ``i`` of every file of a part is one image (``row`` in the parquet). Features and tokens are float16 or
float32 (``--dtype``). A part is written under temporary names (``.{part}.tmp``), each file fsynced, then renamed
into place, and only then recorded in the manifest (replaced atomically): a part is complete exactly when the
manifest lists it under ``parts``; the files of a part it does not list (a killed run) are rewritten whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, InputError
from .files import TMP_SUFFIX, atomic_write, fsync_path
from .redact import redact_url

FORMAT_NAME = "apmpipe.embeddings"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "metadata"
LOGITS = "logits"
DTYPES = ("float16", "float32")


def feature_folder(layer: int) -> str:
    """Folder of the global features of the level read off teacher layer ``layer``."""
    return f"emb_layer{layer}"


TOKENS_PREFIX = "tokens_layer"  # folders of token grids: parts write them in pieces (RowFile)


def tokens_folder(layer: int) -> str:
    """Folder of the predicted token grids of the level read off teacher layer ``layer``."""
    return f"{TOKENS_PREFIX}{layer}"


NPY_HEADER_BYTES = 128  # a streamed .npy's header, written last: magic, version, length, dict, space padding


class RowFile:
    """One ``.npy`` of a part written in pieces under its temporary name: rows are appended batch by batch (only
    the batch in memory), the header with the final row count is written at :meth:`close`. ``np.load`` reads it as
    any ``.npy`` (format 1.0, its header padded to ``NPY_HEADER_BYTES``)."""

    def __init__(self, tmp: Path, dtype: np.dtype, item_shape: tuple[int, ...]) -> None:
        self.tmp, self.dtype, self.item_shape, self.rows = tmp, np.dtype(dtype), tuple(item_shape), 0
        tmp.parent.mkdir(exist_ok=True)
        self._handle = tmp.open("wb")
        self._handle.write(bytes(NPY_HEADER_BYTES))

    def append(self, rows: np.ndarray) -> None:
        assert rows.shape[1:] == self.item_shape, (rows.shape, self.item_shape)
        self._handle.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        """Write the header, flush and fsync (the file keeps its temporary name)."""
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
        text = repr({**header, "shape": (self.rows, *self.item_shape)})
        magic = np.lib.format.magic(1, 0)
        body = text.ljust(NPY_HEADER_BYTES - len(magic) - 2 - 1) + "\n"
        self._handle.seek(0)
        self._handle.write(magic + len(body).to_bytes(2, "little") + body.encode("latin1"))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def discard(self) -> None:
        self._handle.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class Part:
    """One part's outputs, row ``i`` of each array being sample ``i``.

    Args:
        arrays: folder name -> array (``emb_layer*``, ``logits``; ``tokens_layer*`` unless streamed).
        topk: the teacher head's top-k class indices and probabilities ``[N, k]`` each, or None.
        streamed: folder name -> the part's file written in pieces (``tokens_layer*``, see
            :meth:`EmbeddingStore.row_file`).
    """

    keys: list[str]
    labels: np.ndarray
    arrays: dict[str, np.ndarray]
    topk: tuple[np.ndarray, np.ndarray] | None = None
    streamed: dict[str, RowFile] = field(default_factory=dict)

    def table(self, name: str, source: str) -> pa.Table:
        count = len(self.keys)
        columns: dict[str, pa.Array] = {
            "key": pa.array(self.keys, pa.string()),
            "label": pa.array(self.labels, pa.int64()),
            "part": pa.array([name] * count, pa.string()),
            "row": pa.array(np.arange(count), pa.int64()),
            "source": pa.array([source] * count, pa.string()),
        }
        if self.topk is not None:
            columns["topk_classes"] = pa.array(list(self.topk[0].astype(np.int32)), pa.list_(pa.int32()))
            columns["topk_probs"] = pa.array(list(self.topk[1].astype(np.float32)), pa.list_(pa.float32()))
        return pa.table(columns)


def _option_change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """``--option NOW (run: BEFORE)`` for the first thing that would make a rerun write other outputs, or None."""
    if old["student"]["sha256"] != new["student"]["sha256"]:
        return f"--student {new['student']['path']} (run: {old['student']['path']}, another student file)"
    for key, value in new["options"].items():
        if old["options"].get(key) != value:
            return f"--{key.replace('_', '-')} {value} (run: {old['options'].get(key)})"
    if old["head"].get("cache") != new["head"].get("cache"):
        return f"the teacher head {_head_text(new['head'])} (run: {_head_text(old['head'])})"
    return None


def _head_text(head: dict[str, Any]) -> str:
    return f"of {head['cache']}" if head.get("cache") else f"none: {head.get('reason')}"


class EmbeddingStore:
    """An embedding folder open for writing parts (one process writes it; ``apmpipe embed`` holds a lock)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest

    @staticmethod
    def check_out(out: str) -> None:
        """Refuse (ConfigError) an ``out`` that is not a local folder."""
        if "://" in out:
            raise ConfigError(
                f"--out {redact_url(out)!r}: embeddings are written to a local folder; copy them to the store after"
            )

    @classmethod
    def create_or_open(cls, out: str, header: dict[str, Any]) -> EmbeddingStore:
        """Open ``out`` for the run described by ``header`` (student, options, head, levels, classes), creating it
        when new. Refuses (ConfigError) a folder embedded with another student or options, naming the option."""
        cls.check_out(out)
        path, shown = Path(out), redact_url(out)
        header = json.loads(json.dumps(header))
        manifest_path = path / MANIFEST
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
                raise ConfigError(
                    f"--out {shown!r} holds no apmpipe embeddings of version {FORMAT_VERSION}; use another"
                )
            change = _option_change(manifest, header)
            if change:
                raise ConfigError(
                    f"--out {shown!r} was embedded with other options: {change}; rerun with the run's options or "
                    "embed into another --out"
                )
            if header["classes"] and manifest["classes"] and header["classes"] != manifest["classes"]:
                raise InputError(
                    f"--out {shown!r} holds image-folder classes {manifest['classes'][:4]}...; these inputs have "
                    f"{header['classes'][:4]}...: embed them into another --out"
                )
            manifest.update({k: v for k, v in header.items() if k != "classes"})
            manifest["classes"] = header["classes"] or manifest["classes"]
        else:
            if path.exists() and any(p for p in path.iterdir() if not p.name.startswith(".apmpipe-")):
                raise ConfigError(f"--out {shown!r} exists and holds no apmpipe embeddings; choose a new folder")
            manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **header, "parts": {}, "failed": {}}
        store = cls(path, manifest)
        path.mkdir(parents=True, exist_ok=True)
        store._remove_stale_temporaries()
        store._save()
        return store

    def _save(self) -> None:
        atomic_write(self.path / MANIFEST, (json.dumps(self.manifest, indent=1) + "\n").encode())

    def _remove_stale_temporaries(self) -> None:
        """Temporaries a killed run left: of part files (one folder down) and of the manifest (at the top)."""
        for pattern in (f".*{TMP_SUFFIX}", f"*/.*{TMP_SUFFIX}"):
            for stale in self.path.glob(pattern):
                stale.unlink(missing_ok=True)

    def done(self) -> dict[str, str]:
        """Complete parts: name -> the fingerprint of the input it was made from (redacted)."""
        return {name: record["fingerprint"] for name, record in self.manifest["parts"].items()}

    def _tmp(self, relative: str) -> Path:
        final = self.path / relative
        return final.with_name(f".{final.name}{TMP_SUFFIX}")

    def row_file(self, folder: str, name: str, dtype: np.dtype, item_shape: tuple[int, ...]) -> RowFile:
        """Part ``name``'s file of ``folder`` to write in pieces (passed to :meth:`write_part` in ``Part.streamed``)."""
        return RowFile(self._tmp(f"{folder}/{name}.npy"), dtype, item_shape)

    def write_part(
        self, name: str, source: str, fingerprint: str, part: Part, skipped: Sequence[tuple[str, str]]
    ) -> None:
        """Write every file of a part under a temporary name (streamed ones are closed), rename them into place,
        then record the part."""
        files = {f"{folder}/{name}.npy": array for folder, array in part.arrays.items()}
        files[f"{METADATA}/{name}.parquet"] = part.table(name, redact_url(source))
        written = []
        for folder, streamed in part.streamed.items():
            assert streamed.rows == len(part.keys), (folder, streamed.rows, len(part.keys))
            streamed.close()
            written.append((streamed.tmp, self.path / folder / f"{name}.npy"))
        for relative, content in files.items():
            final = self.path / relative
            final.parent.mkdir(exist_ok=True)
            tmp = self._tmp(relative)
            with tmp.open("wb") as handle:
                if isinstance(content, pa.Table):
                    pq.write_table(content, handle)
                else:
                    np.save(handle, np.ascontiguousarray(content))
                handle.flush()
                os.fsync(handle.fileno())
            written.append((tmp, final))
        for tmp, final in written:
            os.replace(tmp, final)
        for folder in {final.parent for _, final in written}:
            fsync_path(folder)
        self.manifest["failed"].pop(name, None)
        self.manifest["parts"][name] = {
            "source": redact_url(source),
            "fingerprint": redact_url(fingerprint),
            "samples": len(part.keys),
            "skipped": [list(item) for item in skipped],
        }
        self.manifest["parts"] = dict(sorted(self.manifest["parts"].items()))
        self._save()

    def fail_part(self, name: str, source: str, error: str, skipped: Sequence[tuple[str, str]]) -> None:
        """Record why a part could not be read (a rerun tries it again)."""
        self.manifest["failed"][name] = {
            "source": redact_url(source),
            "error": error,
            "skipped": [list(item) for item in skipped],
        }
        self._save()


def read_parts(out: str | Path, folder: str) -> np.ndarray:
    """One folder's arrays (e.g. ``emb_layer12``) of every complete part, concatenated in manifest order: row
    ``i`` is row ``i`` of :func:`read_metadata`."""
    path = Path(out)
    parts = json.loads((path / MANIFEST).read_text())["parts"]
    return np.concatenate([np.load(path / folder / f"{name}.npy") for name in parts])


def read_metadata(out: str | Path) -> pa.Table:
    """The parquet rows of every complete part, in manifest order."""
    path = Path(out)
    parts = json.loads((path / MANIFEST).read_text())["parts"]
    return pa.concat_tables([pq.read_table(path / METADATA / f"{name}.parquet") for name in parts])
