"""Issue 23: a new user's first hour, round two. Each through the CLI: an extraction that keeps nothing does not
succeed, a damaged cache gives one line naming the shard group, array and repair (and ``verify --integrity`` finds
it), unwritable outputs are refused before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from .conftest import FAST, TINY_TRAIN, TINY_VIT, run_main
from .test_hardening import _png, _tar


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# -- 1: an extraction that keeps nothing ----------------------------------------------------------------------
def test_an_extraction_that_keeps_nothing_fails_and_a_rerun_with_the_fix_extracts(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    image = _png(Image.new("L", (16, 16), 80))
    named = _tar(tmp_path / "named.tar", {"a.png": image, "a.cls": b"cat", "b.png": image, "b.cls": b"dog"})
    out = tmp_path / "c.zarr"
    result = run_main(capsys, "extract", named, "--out", out, *TINY_VIT, *FAST)
    assert result.returncode != 0, result.stdout
    summary = result.stderr.splitlines()[-1]
    assert summary.startswith("error: extract stored no sample: all 2 samples were skipped") and "'cat'" in summary
    attrs = json.loads((out / "shards" / "named" / "zarr.json").read_text())["attributes"]
    assert attrs["status"] == "failed" and "stored nothing" in attrs["error"]

    trained = run_main(capsys, "train", out, "--out", tmp_path / "run", *TINY_TRAIN, "--max-steps", "2")
    assert "lower --batch-size" not in trained.stderr and "no complete shard" in _one_error_line(trained.stderr)

    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    rerun = run_main(capsys, "extract", named, "--out", out, *TINY_VIT, *FAST, "--class-names", classes)
    assert rerun.returncode == 0 and "2 written" in rerun.stdout, rerun.stderr


def test_train_on_a_cache_of_zero_samples_says_so(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    empty = _tar(tmp_path / "empty.tar", {})
    out = tmp_path / "c.zarr"
    result = run_main(capsys, "extract", empty, "--out", out, *TINY_VIT, *FAST)
    assert result.returncode != 0 and "the 1 input(s) hold no samples" in result.stderr.splitlines()[-1]
    trained = run_main(capsys, "train", out, "--out", tmp_path / "run", *TINY_TRAIN, "--max-steps", "2")
    line = _one_error_line(trained.stderr)
    assert trained.returncode == 2 and "holds 0 samples" in line and "lower --batch-size" not in line
