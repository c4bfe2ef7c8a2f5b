"""``apmpipe train --tensorboard``: the metrics.jsonl scalars as TensorBoard events, or one line saying why not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import TINY_TRAIN, run_cli, run_main


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_hold_the_metrics_scalars(tmp_path: Path, tiny_cache: Path, eval_cache: Path) -> None:
    from apmpipe.storage.tensorboard import scalar_tag

    run = tmp_path / "run"
    result = run_cli(
        "train", tiny_cache, "--out", run, *TINY_TRAIN, "--max-steps", "6", "--log-every", "2", "--tensorboard",
        "--val", eval_cache, "--val-every", "3", "--val-samples", "16",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert (run / "loss.png").exists() and [r["step"] for r in records] == [2, 3, 4, 6, 6]  # held-out scores at 3, 6
    scalars = _scalars(run / "tensorboard")
    keys = {k for r in records for k in r if k != "step"}
    assert {"loss/total", "loss/level_1", "loss/level_2", "loss/rgb", "lr", "samples_per_s", "data_wait_s"} <= set(
        scalars
    )
    assert {"val_r2", "val_best", "val_patch_r2_L1", "val_prefix_r2_L1"} <= set(scalars)
    assert sorted(scalars) == sorted(scalar_tag(k) for k in keys)
    for key in keys:  # TensorBoard stores float32
        expected = [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-30)) for r in records if key in r]
        assert scalars[scalar_tag(key)] == expected, key


def test_tensorboard_resume_hides_the_killed_runs_later_events(tmp_path: Path, tiny_cache: Path) -> None:
    run, events = tmp_path / "run", tmp_path / "tb"
    common = [*TINY_TRAIN, "--max-steps", "8", "--log-every", "1", "--tensorboard", "--tensorboard-dir", events]
    first = run_cli("train", tiny_cache, "--out", run, *common, "--checkpoint-every", "4")
    assert first.exit_code == 0, first.output
    # as if killed after step 8 but checkpointed at 4: the resumed run logs steps 5..8 again, and only those count
    (run / "student.safetensors").unlink()
    (run / "checkpoints" / "latest").write_text("step-00000004")
    again = run_cli("train", tiny_cache, "--out", run, *common, "--checkpoint-every", "4", "--resume")
    assert again.exit_code == 0, again.output
    steps = [step for step, _ in _scalars(events)["loss/total"]]
    assert steps == list(range(1, 9)), steps
    assert not (run / "tensorboard").exists()


def test_tensorboard_refusals_are_one_line(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def error(*args: object) -> str:
        result = run_main(capsys, "train", tiny_cache, *TINY_TRAIN, "--max-steps", "2", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        return result.stderr

    assert "add --tensorboard-dir LOCAL_FOLDER" in error("--out", "memory://runs/tb", "--tensorboard")
    assert "must be a local folder" in error("--out", tmp_path / "r", "--tensorboard", "--tensorboard-dir", "s3://b/tb")
    assert "--tensorboard-dir needs --tensorboard" in error("--out", tmp_path / "r", "--tensorboard-dir", tmp_path)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert "pip install tensorboard" in error("--out", tmp_path / "r", "--tensorboard")
