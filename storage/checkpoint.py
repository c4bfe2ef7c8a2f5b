"""Run directories: atomic training checkpoints, the exported student, metrics and the resolved config.

Layout of a run directory::

    config.toml                 resolved training options
    metrics.jsonl               one JSON object per logged step
    checkpoints/step-00000500/  model.safetensors + state.pt (optimizer, scheduler, step, loader position, RNG)
    checkpoints/latest          name of the newest complete checkpoint
    student.safetensors         final weights; metadata holds the student and cache-layout JSON

A checkpoint directory is written under a temporary name and renamed into place, and ``latest`` is replaced
atomically after it, so a killed run always leaves the previous checkpoint readable. ``state.pt`` holds only
tensors and plain Python values and is loaded with ``weights_only=True``.
"""
from __future__ import annotations

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


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class RunDir:
    """One training run's directory (rank 0 writes it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"

    def has_checkpoint(self) -> bool:
        return (self.checkpoints / "latest").exists()

    def save_checkpoint(self, step: int, weights: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        for stale in self.checkpoints.glob(".tmp-*"):  # left by a save that was killed half-way
            shutil.rmtree(stale, ignore_errors=True)
        final = self.checkpoints / f"step-{step:08d}"
        tmp = Path(tempfile.mkdtemp(dir=self.checkpoints, prefix=".tmp-"))
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _atomic_write_text(self.checkpoints / "latest", final.name)
        older = sorted(p for p in self.checkpoints.glob("step-*") if p != final)
        for old in older[: max(0, len(older) - (KEEP_CHECKPOINTS - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The newest complete checkpoint's weights and state."""
        if not self.has_checkpoint():
            raise ModelError(f"no checkpoint in {self.path}; drop --resume to start a new run")
        folder = self.checkpoints / (self.checkpoints / "latest").read_text().strip()
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
        tmp = self.path / f".{STUDENT_FILE}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
        os.replace(tmp, path)
        return path


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def load_student(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and metadata of an exported student: a run directory or its ``student.safetensors``."""
    path = Path(path)
    file = path / STUDENT_FILE if path.is_dir() else path
    if not file.exists():
        raise ModelError(f"no trained student at {path} (expected {file.name}); run apmpipe train --out {path} first")
    with safe_open(str(file), framework="pt") as handle:
        metadata = {k: json.loads(v) for k, v in (handle.metadata() or {}).items()}
    return load_weights(file), metadata
