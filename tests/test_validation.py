"""``apmpipe train --val``: held-out scores while training, the best weights exported, ``--patience``, resume."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apmpipe.stages.validation import Selection
from apmpipe.storage.checkpoint import load_student

from .conftest import TRAIN_FAST, one_error_line, run_cli, run_main, run_subprocess, train_killed_and_resumed


def _held_out_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_r2" in r]


def test_selection_keeps_the_best_weights_and_counts_scores_since() -> None:
    selection = Selection(patience=2)
    for step, score in enumerate([0.1, 0.3, 0.2]):
        selection.add(step, score, {"w": torch.full((2,), float(step))})
    assert (selection.best, selection.best_step, selection.since_best, selection.stalled) == (0.3, 1, 1, False)
    selection.add(3, 0.3, {"w": torch.zeros(2)})  # a tie is not better: the best stays, patience runs out
    assert selection.stalled and selection.weights["w"].tolist() == [1.0, 1.0]
    restored = Selection(patience=2)
    restored.load_state_dict(selection.state_dict())
    assert (
        restored.summary() == selection.summary() == {"best": 0.3, "best_step": 1, "last": 0.3, "stopped_early": True}
    )
    assert not Selection(patience=0).stalled


def test_val_exports_the_best_scored_weights_and_patience_stops_the_run(
    capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture, tmp_path: Path, tiny_cache: Path, eval_cache: Path
) -> None:
    run = tmp_path / "run"
    # a high LR makes the held-out score fall back after its best, so --patience 2 ends the run early
    options = ["--val", str(eval_cache), "--val-every", "3", "--val-samples", "0", "--patience", "2", "--lr", "0.05"]
    with caplog.at_level(logging.WARNING):
        result = run_main(
            capsys, "train", str(tiny_cache), "--out", str(run), *TRAIN_FAST, "--max-steps", "60", *options
        )
    assert result.returncode == 0, result.stderr
    assert "distinct images" not in caplog.text  # held-out scores are what the few-images warning asks for
    records = _held_out_records(run)
    best = max(records, key=lambda r: r["val_r2"])
    after_best = [r for r in records if r["step"] > best["step"]]
    assert [r["step"] for r in records] == list(range(3, 3 * len(records) + 1, 3)), records
    assert len(after_best) == 2 and records[-1]["step"] < 60, "--patience 2 stops two scores after the best"
    _, metadata = load_student(run)
    assert metadata["held_out"] == {
        "best": best["val_r2"],
        "best_step": best["step"],
        "last": records[-1]["val_r2"],
        "stopped_early": True,
        "cache": str(eval_cache),
    }
    assert f"{best['val_r2']:.3f} at step {best['step']} (exported" in result.stdout
    # the exported student is the best score's: apmpipe eval on the same held-out images gives its R^2
    evaluated = run_cli("eval", str(eval_cache), "--student", str(run), "--out", str(tmp_path / "ev"))
    assert evaluated.exit_code == 0 and "lean optimistic" in evaluated.output, evaluated.output  # chosen on it
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["selected_on_this_cache"] and report["student"]["held_out"] == metadata["held_out"]
    other = run_cli("eval", str(tiny_cache), "--student", str(run), "--out", str(tmp_path / "o"), "--max-samples", "8")
    assert other.exit_code == 0 and "lean optimistic" not in other.output, other.output
    fidelity = report["fidelity"]
    for layer, row in fidelity.items():
        for part in ("patch", "prefix"):
            assert row[f"{part}_r2"] == pytest.approx(best[f"val_{part}_r2_L{layer}"], abs=1e-5), (layer, part)
    again = run_main(capsys, "train", str(tiny_cache), "--out", str(run), *TRAIN_FAST, "--max-steps", "60", *options,
                     "--resume")  # fmt: skip
    assert again.returncode == 0 and f"already trained: step {records[-1]['step']}" in again.stderr, again.stderr
    assert _held_out_records(run) == records


def test_val_resumes_after_sigkill_to_the_same_selection(tmp_path: Path, tiny_cache: Path, eval_cache: Path) -> None:
    args = ["train", str(tiny_cache), *TRAIN_FAST, "--max-steps", "30", "--checkpoint-every", "4"]
    args += ["--val", str(eval_cache), "--val-every", "5", "--val-samples", "24", "--lr", "0.05"]
    reference, killed = train_killed_and_resumed(args, tmp_path)
    (ref, ref_meta), (got, got_meta) = load_student(reference), load_student(killed)
    assert ref_meta["held_out"] == got_meta["held_out"] and got_meta["held_out"]["best_step"] > 0
    assert all(ref[key].equal(got[key]) for key in ref)
    assert _held_out_records(killed) == _held_out_records(reference)
    at = args.index("--val")
    del args[at : at + 2]  # --resume without --val keeps the run's own: the export is still the selection's
    resumed = run_subprocess(*args, "--out", killed, "--resume")
    assert resumed.returncode == 0 and "already trained" in resumed.stderr, resumed.stderr
    assert load_student(killed)[1]["held_out"] == ref_meta["held_out"]


def test_val_under_ddp_scores_on_rank_zero_and_every_rank_stops_together(
    tmp_path: Path, tiny_cache: Path, eval_cache: Path
) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    run = tmp_path / "ddp"
    args = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "apmpipe.pipeline", "train", str(tiny_cache)]
    args += ["--out", str(run), *TRAIN_FAST, "--epochs", "3", "--device", "cpu", "--lr", "0.05"]
    args += ["--val", str(eval_cache), "--val-every", "1", "--val-samples", "16", "--patience", "1"]
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )  # a rank that did not stop with the others would hang here until the timeout
    assert result.returncode == 0, result.stderr[-3000:]
    records = _held_out_records(run)
    _, metadata = load_student(run)
    assert metadata["held_out"]["stopped_early"] and metadata["step"] == records[-1]["step"]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))  # one score a step, rank 0's alone


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--patience", "3"], "--patience counts held-out scores: pass --val CACHE"),
        (["--val", "{train}"], "is one of the training caches, so its scores would not be held out"),
        (["--val", "{missing}"], "no feature cache at"),
    ],
)
def test_val_option_errors_are_one_line(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path, options: list[str], message: str
) -> None:
    filled = [o.format(train=tiny_cache, missing=tmp_path / "nowhere.zarr") for o in options]
    result = run_main(capsys, "train", str(tiny_cache), "--out", str(tmp_path / "run"), *TRAIN_FAST, *filled)
    assert result.returncode == 2 and message in one_error_line(result.stderr), result.stderr
