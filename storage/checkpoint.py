"""Run directories: atomic training checkpoints, the exported student, metrics and the resolved config.

Layout of a run directory::

    config.toml                 resolved training options
    metrics.jsonl               one JSON object per logged step
    checkpoints/step-00000500/  model.safetensors + state.pt (optimizer, scheduler, step, loader position, RNG)
    checkpoints/latest          name of the newest complete checkpoint
    student.safetensors         final weights; metadata holds the student and cache-layout JSON

A checkpoint directory is written under a temporary name, its files and itself fsynced, renamed into place
(the parent fsynced), and ``latest`` is replaced atomically after it, so a killed run or a power cut always
leaves ``latest`` naming a complete checkpoint; when one step is saved twice, ``latest`` names the new copy
before the old one is removed. Stale temporaries of a killed save go at the next save (and, called at a run's
start, :meth:`RunDir.remove_stale_temporaries`).
``state.pt`` holds only tensors and plain Python values and is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelError

KEEP_CHECKPOINTS = 2
STUDENT_FILE = "student.safetensors"


TMP_SUFFIX = ".tmp"


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


class RunDir:
    """One training run's directory (rank 0 writes it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"

    def has_checkpoint(self) -> bool:
        return (self.checkpoints / "latest").exists()

    def _latest_name(self) -> str:
        latest = self.checkpoints / "latest"
        return latest.read_text().strip() if latest.exists() else ""

    def remove_stale_temporaries(self) -> None:
        """Remove what a killed save left (``.tmp-*`` folders, ``*.tmp`` files), never what ``latest`` names.
        Call it at the start of a run, on the rank that writes."""
        keep = self._latest_name()
        stale = [
            *self.checkpoints.glob(".tmp-*"),
            *self.checkpoints.glob(f".*{TMP_SUFFIX}"),
            *self.path.glob(f".*{TMP_SUFFIX}"),
        ]
        for path in stale:
            if path.name == keep:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def save_checkpoint(self, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temporaries()
        final = self.checkpoints / f"step-{step:08d}"
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=".tmp-"))
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        for path in (tmp / "model.safetensors", tmp / "state.pt", tmp):
            _fsync(path)
        if final.exists():  # the same step again (a resumed run): name the new copy in latest before the old one goes
            _atomic_write_text(self.checkpoints / "latest", tmp.name)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.checkpoints)
        _atomic_write_text(self.checkpoints / "latest", final.name)
        older = sorted(p for p in self.checkpoints.glob("step-*") if p != final)
        for old in older[: max(0, len(older) - (KEEP_CHECKPOINTS - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _checkpoint_folder(self) -> Path:
        """The folder ``latest`` names, or (after a crash of an older apmpipe left it dangling) the newest complete
        one."""
        named = self.checkpoints / self._latest_name()
        if (named / "state.pt").exists():
            return named
        complete = sorted(
            p
            for p in self.checkpoints.glob("step-*")
            if (p / "model.safetensors").exists() and (p / "state.pt").exists()
        )
        if not complete:
            raise ModelError(
                f"checkpoint {named} is missing and {self.checkpoints} holds no complete one; drop "
                "--resume to start a new run"
            )
        return complete[-1]

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The newest complete checkpoint's weights and state."""
        if not self.has_checkpoint():
            raise ModelError(f"no checkpoint in {self.path}; drop --resume to start a new run")
        folder = self._checkpoint_folder()
        weights = load_weights(folder / "model.safetensors")
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        return weights, state

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop records after ``step`` (a resumed run rewrites them)."""
        if self.metrics.exists():
            kept = [line for line in self.metrics.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            _atomic_write_text(self.metrics, "".join(line + "\n" for line in kept))

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line]

    def write_text(self, name: str, text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.path / name, text)

    def save_student(self, weights: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
        """Export final weights with their description (JSON strings in the safetensors metadata)."""
        path = self.path / STUDENT_FILE
        tmp = self.path / f".{STUDENT_FILE}{TMP_SUFFIX}"
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in weights.items()},
            str(tmp),
            metadata={k: json.dumps(v) for k, v in metadata.items()},
        )
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(self.path)
        return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def load_student(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and metadata of an exported student: a run directory or its ``student.safetensors``."""
    path = Path(path)
    file = path / STUDENT_FILE if path.is_dir() else path
    if not path.exists():
        raise ModelError(
            f"no trained student at {path}: it does not exist; pass the --out folder of apmpipe train (or "
            f"its {STUDENT_FILE})"
        )
    if not file.exists():
        unfinished = (
            " (it holds checkpoints: finish the run with apmpipe train ... --resume)"
            if RunDir(path).has_checkpoint()
            else ""
        )
        raise ModelError(
            f"no trained student at {path}: it holds no {STUDENT_FILE}{unfinished}; train one with "
            f"apmpipe train CACHE --out {path}"
        )
    with safe_open(str(file), framework="pt") as handle:
        metadata = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
    return load_weights(file), metadata


def student_digest(path: str | Path) -> str:
    """sha256 of an exported student's file (run directory or ``student.safetensors``): its identity in what it
    made (``apmpipe embed`` outputs)."""
    path = Path(path)
    file = path / STUDENT_FILE if path.is_dir() else path
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
