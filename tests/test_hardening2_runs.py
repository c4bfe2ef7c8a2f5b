"""Training runs as later stages find them: caches recorded canonically (embed from any folder finds the head) and
``train --resume`` over other caches (a documented restart of the interrupted epoch)."""

from __future__ import annotations

import json
import logging
import signal
import tomllib
from pathlib import Path

import pytest

from apmpipe.stages.train import TrainConfig, train
from apmpipe.storage.checkpoint import load_student

from .conftest import TRAIN_FAST, run_cli


def test_embed_from_another_folder_finds_the_head_of_relative_training_caches(
    tmp_path: Path, tiny_cache: Path, digit_shards: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, out = tmp_path / "run", tmp_path / "emb"
    monkeypatch.chdir(tiny_cache.parent)
    result = run_cli("train", f"./{tiny_cache.name}/", "--out", run, *TRAIN_FAST, "--max-steps", "2")
    assert result.exit_code == 0, result.output
    assert load_student(run)[1]["train_config"]["caches"] == [str(tiny_cache)]
    for folder in ("elsewhere", "again"):  # the rerun from a third folder is no "changed head"
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        result = run_cli("embed", digit_shards[0], "--student", run, "--out", out, "--loader-workers", "0")
        assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["head"]["cache"] == str(tiny_cache) and list(manifest["parts"]) == ["digits-0000"]


def test_resume_over_other_caches_restarts_the_interrupted_epoch(
    tmp_path: Path, tiny_cache: Path, eval_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """README: CACHE... may change on --resume; the run keeps its step and replans the interrupted epoch."""
    options = {"out": str(tmp_path / "run"), "preset": "tiny", "batch_size": 8, "window_samples": 32}
    options |= {"loader_workers": 0, "max_steps": 8, "log_every": 1, "checkpoint_every": 100}
    seen: list[int] = []
    stopped = train(
        TrainConfig(caches=(str(tiny_cache),), **options),
        on_step=lambda step, total, record: seen.append(step),
        stop_requested=lambda: signal.SIGTERM if len(seen) >= 3 else 0,
    )
    assert stopped.stopped_by == signal.SIGTERM and stopped.steps == 3
    with caplog.at_level(logging.WARNING):
        resumed = train(TrainConfig(caches=(str(tiny_cache), str(eval_cache)), resume=True, **options))
    assert resumed.steps == 8 and resumed.student
    assert "data plan changed" in caplog.text and "restarting epoch 0 from its start" in caplog.text
    config = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert config["caches"] == [str(tiny_cache), str(eval_cache)]
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
