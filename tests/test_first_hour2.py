"""Issue 23: a new user's first hour, round two. Each through the CLI: an extraction that keeps nothing does not
succeed, a damaged cache gives one line naming the shard group, array and repair (and ``verify --integrity`` finds
it), unwritable outputs are refused before anything loads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import FAST, TINY_TRAIN, TINY_VIT, one_error_line, run_main
from .test_hardening import _png, _tar


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
    assert "lower --batch-size" not in trained.stderr and "no samples in" in one_error_line(trained.stderr)

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
    line = one_error_line(trained.stderr)
    assert trained.returncode == 2 and "no samples in" in line and "lower --batch-size" not in line


# -- 2: a damaged cache ---------------------------------------------------------------------------------------
def _chunk_files(cache: Path, array: str) -> list[Path]:
    return sorted(p for p in cache.glob(f"shards/*/{array}/c/**/*") if p.is_file())


def _random_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[64 : len(data) // 2] = np.random.default_rng(0).bytes(len(data) // 2 - 64)
    path.write_bytes(bytes(data))


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _deleted_after_the_first(path: Path) -> None:
    """Delete every zarr shard file of a token array but its first (``c/0/0/0``), as a partial copy or sync leaves
    it: the first samples read fine, and zarr would read the others as zeros."""
    if path.parts[-3] != "0":
        path.unlink()


def _low_order_flips(path: Path) -> None:
    """Flip the lowest bit of 8 KB of bytes: values shift a little, nothing fails to decode without a checksum."""
    data = np.frombuffer(path.read_bytes(), dtype=np.uint8).copy()
    data[256 : 256 + 8192] ^= 1
    path.write_bytes(data.tobytes())


def test_verify_integrity_names_each_damaged_chunk(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path
) -> None:
    cache = tmp_path / "c.zarr"
    shutil.copytree(tiny_cache, cache)
    result = run_main(capsys, "verify", cache, "--integrity")
    assert result.returncode == 0 and "PASS: every chunk reads and matches its checksum" in result.stdout, result.stdout
    flipped = _chunk_files(cache, "tokens/1")[0]
    _low_order_flips(flipped)
    (cache / "shards" / "digits-0002" / "labels" / "c" / "0").unlink()  # zarr would read labels 0 in its place
    result = run_main(capsys, "verify", cache, "--integrity")
    named = f"shards/{flipped.relative_to(cache / 'shards').as_posix()}"
    assert result.returncode == 1 and "FAIL: 2 damaged chunk(s)" in result.stdout, result.stdout
    assert named in result.stdout and "checksum" in result.stdout, result.stdout
    assert "shards/digits-0002/labels/c/0" in result.stdout and "missing" in result.stdout
    only = run_main(capsys, "verify", cache, "--integrity", "--shard", "digits-0001")
    assert only.returncode == 0 and "PASS" in only.stdout, only.stdout


def test_damaged_metadata_names_its_shard_group(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path
) -> None:
    cache = tmp_path / "c.zarr"
    shutil.copytree(tiny_cache, cache)
    (cache / "shards" / "digits-0000" / "tokens" / "2" / "zarr.json").write_text("garbage")
    result = run_main(capsys, "verify", cache, "--integrity")
    assert result.returncode == 1 and "shards/digits-0000/zarr.json" in result.stdout, result.stdout
    (cache / "shards" / "digits-0001" / "zarr.json").write_text('{"zarr_format": 3, "node_ty')
    result = run_main(capsys, "info", cache)
    line = one_error_line(result.stderr)
    assert result.returncode == 2 and "shard 'digits-0001'" in line and "delete its group (shards/digits-0001)" in line


TRAIN_WITH_WORKERS = ["--preset", "tiny", "--batch-size", "8", "--window-samples", "32", "--loader-workers", "2"]


@pytest.mark.parametrize(
    ("array", "damage"), [("tokens/1", _random_bytes), ("pixels", _truncated), ("tokens/1", _deleted_after_the_first)]
)
@pytest.mark.parametrize("command", ["verify", "train", "eval", "islands"])
def test_a_damaged_cache_gives_one_line_naming_group_array_and_repair(
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    tiny_cache: Path,
    tiny_student: Path,
    array: str,
    damage: object,
    command: str,
) -> None:
    cache = tmp_path / "c.zarr"
    shutil.copytree(tiny_cache, cache)
    for path in _chunk_files(cache, array):  # every chunk: whichever sample a command reads first is damaged
        damage(path)
    args = {
        "verify": ["verify", cache, "--samples", "2"],
        "train": ["train", cache, "--out", tmp_path / "run", *TRAIN_WITH_WORKERS, "--max-steps", "2"],
        "eval": ["eval", cache, "--student", tiny_student, "--out", tmp_path / "report"],
        "islands": ["islands", cache, "--student", tiny_student, "--out", tmp_path / "i.png", "--images", "1"],
    }[command]
    result = run_main(capsys, *args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    match = re.search(
        rf"array '{array}' of shard '(digits-\d+)' in cache .* cannot be read \(.+\): it is damaged", errors[0]
    )
    assert match and f"delete its group (shards/{match[1]}) and rerun apmpipe extract" in errors[0], errors[0]


# -- 3: unwritable outputs ------------------------------------------------------------------------------------
@pytest.fixture
def locked(tmp_path: Path, tiny_student: Path) -> Iterator[Path]:
    """A folder holding a copy of a trained run, both immutable (``chattr +i``: refused even to root, whom
    permission bits do not stop)."""
    folder = tmp_path / "locked"
    shutil.copytree(tiny_student, folder / "run")
    if subprocess.run(["chattr", "+i", folder, folder / "run"], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", folder, folder / "run"], check=True)


@pytest.mark.parametrize(
    "command",
    ["extract", "train", "train-resume", "eval", "eval-into-run", "embed", "islands", "islands-folder"],
)
def test_an_unwritable_output_is_refused_in_one_line(
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    locked: Path,
    digit_shards: list[str],
    tiny_cache: Path,
    tiny_student: Path,
    command: str,
) -> None:
    args = {
        "extract": ["extract", digit_shards[0], "--out", locked / "c.zarr", *TINY_VIT, *FAST],
        "train": ["train", tiny_cache, "--out", locked / "new-run", *TINY_TRAIN, "--max-steps", "2"],
        "train-resume": ["train", tiny_cache, "--out", locked / "run", *TINY_TRAIN, "--resume"],
        "eval": ["eval", tiny_cache, "--student", tiny_student, "--out", locked / "report"],
        "eval-into-run": ["eval", tiny_cache, "--student", locked / "run"],  # the report goes to RUN/eval-<cache>
        "embed": ["embed", digit_shards[0], "--student", tiny_student, "--out", locked / "embeddings"],
        "islands": ["islands", tiny_cache, "--student", tiny_student, "--out", locked / "islands.png"],
        "islands-folder": ["islands", tiny_cache, "--student", tiny_student, "--out", locked],  # gets islands.png
    }[command]
    result = run_main(capsys, *args)
    line = one_error_line(result.stderr)
    named = f"{locked / 'run'}/eval-" if command == "eval-into-run" else str(args[args.index("--out") + 1])
    assert result.returncode == 2 and named in line, line
    assert "cannot be written" in line and "Operation not permitted" in line, line
