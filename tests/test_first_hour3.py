"""Issue 23 (a new user's first hour, round two), items 4-8: hints that name what a path is and the command that
takes it, progress of the demo's teacher, teacher-head scores against unrelated labels, messages in plain words, and
the small things a newcomer meets. Each behaviour through the CLI where it can be."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from .conftest import FAST, TINY_TRAIN, TINY_VIT, run_main


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def _write_tar(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


# -- 4: wrong-way hints name what the thing is and the command that takes it --------------------------------------
def test_a_cache_given_as_student_or_images_is_named_a_cache(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path, tiny_student: Path
) -> None:
    line = _one_error_line(run_main(capsys, "eval", tiny_cache, "--student", tiny_cache).stderr)
    assert "is a feature cache (apmpipe extract --out), not a training run" in line, line
    assert "take a run as --student" in line and "--out " + str(tiny_cache) not in line, line
    result = run_main(capsys, "embed", tiny_cache, "--student", tiny_student, "-o", tmp_path / "e")
    line = _one_error_line(result.stderr)
    assert "is a feature cache" in line and "not input images" in line and "class folders" not in line, line


def test_a_run_given_as_cache_or_images_is_named_a_run(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_student: Path
) -> None:
    for args in (["info", tiny_student], ["train", tiny_student, "-o", tmp_path / "r"]):
        line = _one_error_line(run_main(capsys, *args).stderr)
        assert "is a training run (apmpipe train --out), not a feature cache" in line, line
        assert "--out " + str(tiny_student) not in line, line  # no advice to extract into the run folder
    line = _one_error_line(run_main(capsys, "extract", tiny_student, "-o", tmp_path / "c.zarr", *TINY_VIT).stderr)
    assert "is a training run" in line and "not input images" in line, line


def test_a_shard_given_as_student_is_named_a_shard(
    capsys: pytest.CaptureFixture, tiny_cache: Path, digit_shards: list[str]
) -> None:
    line = _one_error_line(run_main(capsys, "eval", tiny_cache, "--student", digit_shards[0]).stderr)
    assert "is an input shard, not a training run" in line, line


def test_an_option_of_another_command_names_that_command(capsys: pytest.CaptureFixture, tiny_cache: Path) -> None:
    result = run_main(capsys, "train", tiny_cache, "-o", "run", "--teacher", "vit_tiny_patch16_224")
    line = _one_error_line(result.stderr)
    assert result.returncode == 2 and "has no option --teacher; it is an option of apmpipe extract" in line, line
    assert "--echo" not in line, line


def test_a_global_option_after_the_command_says_it_goes_before(capsys: pytest.CaptureFixture, tiny_cache: Path) -> None:
    result = run_main(capsys, "train", tiny_cache, "-o", "run", "--threads", "1")
    line = _one_error_line(result.stderr)
    assert result.returncode == 2 and "--threads is a global option: it goes before the command" in line, line
    assert "apmpipe --threads N train ..." in line, line


def test_a_cache_without_samples_does_not_ask_for_a_smaller_batch(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    broken = _write_tar(tmp_path / "broken.tar", {"a.png": b"not an image", "a.cls": b"1", "b.png": b"", "b.cls": b"2"})
    cache = tmp_path / "empty.zarr"
    run_main(capsys, "extract", broken, "-o", cache, *TINY_VIT, *FAST)  # every sample skipped (its exit: issue 23.1)
    line = _one_error_line(run_main(capsys, "train", cache, "-o", tmp_path / "run", *TINY_TRAIN).stderr)
    assert "no samples in" in line and f"apmpipe info {cache}" in line and "--batch-size" not in line, line
