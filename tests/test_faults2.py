"""Faults and honest docs, round two (issue 20): torn metrics, one-class probes, mixed-precision workers, eval
folders per cache, run-folder writer locks, bounded embed parts, and FORMAT.md against the code."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from .conftest import TRAIN_FAST, run_main


def test_resume_drops_a_torn_last_metrics_line(
    tiny_cache: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    """A kill (or a full disk) during an append leaves half a JSON line at the end of metrics.jsonl: --resume
    drops it with a warning instead of crashing on it."""
    run = tmp_path / "run"
    args = ["train", tiny_cache, "--out", run, *TRAIN_FAST, "--max-steps", "4", "--checkpoint-every", "2"]
    assert run_main(capsys, *args).returncode == 0
    metrics = run / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 6, "loss": 0.5')  # torn mid-record
    with caplog.at_level(logging.WARNING):
        resumed = run_main(capsys, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "torn last line of" in caplog.text and "metrics.jsonl" in caplog.text
    assert metrics.read_text() == whole
