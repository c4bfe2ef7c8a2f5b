"""Shared fixtures: real bundled images (scikit-learn digits) as WebDataset shards and a tiny random ViT teacher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from apmpipe.pipeline.cli import app, main
from apmpipe.pipeline.datasets import write_digit_shards

# one thread count for every process the tests start (bit-identical comparisons across runs hold on a loaded machine),
# and one thread: the README runs two workers on two cores, and two threads each oversubscribe them (torch's parallel
# regions wait on descheduled threads). The demo's student on the small digits teacher, median images/s: 2 threads
# beside the other 2-thread worker and a 1-thread job, 77; 1 thread beside one 1-thread job, 121; 1 thread alone, 194.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# the files that take longest, started first: the README's `-n 2 --dist loadfile --no-loadscope-reorder` runs a file
# in one process, in this order, and these, started last, would run alone at the end (test_demo.py's module fixture:
# the full demo's student budget; xdist's own order, by test count, started it last)
LONGEST_FILES = ("test_demo.py", "test_first_hour.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collection order with :data:`LONGEST_FILES` moved to the front (xdist hands out files in this order)."""
    items.sort(key=lambda item: item.path.name not in LONGEST_FILES)


TINY_VIT = [
    "--teacher",
    "vit_tiny_patch16_224",
    "--no-pretrained",
    "--model-arg",
    "img_size=32",
    "--model-arg",
    "depth=2",
    "--model-arg",
    "num_classes=10",
]
FAST = ["--batch-size", "16", "--chunk-samples", "8", "--shard-samples", "16", "--loader-workers", "0", "--views", "1"]


TINY_TRAIN = ["--preset", "tiny", "--batch-size", "8", "--window-samples", "32", "--loader-workers", "0"]
TRAIN_FAST = [*TINY_TRAIN, "--log-every", "2"]  # a tiny student, in-process loading, a metric every 2 steps


def run_cli(*args: str) -> CliRunner.invoke:
    """Invoke ``apmpipe`` in-process, as a user would type it."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def one_error_line(stderr: str) -> str:
    """The one line a user error prints (asserting it is one, starting ``error: ``)."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def run_main(capsys: pytest.CaptureFixture, *args: str) -> Outcome:
    """Run the console-script entry point in this process; exit code and streams as a user would see them."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return Outcome(int(exit_info.value.code or 0), captured.out, captured.err)


def run_subprocess(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed console script in a real process (exit codes and stderr exactly as a user sees them)."""
    return subprocess.run(
        [sys.executable, "-m", "apmpipe.pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def kill_midway(args: list, watched: Path | Callable[[], bool], timeout: float = 120) -> None:
    """Start ``apmpipe ARGS`` in a real process and SIGKILL it once ``watched`` exists (a path, or a check that
    returns True), or once it ended by itself or ``timeout`` s passed (the callers then see the kill came too late)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "apmpipe.pipeline", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ready = watched.exists if isinstance(watched, Path) else watched
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def train_killed_and_resumed(args: list, tmp_path: Path) -> tuple[Path, Path]:
    """``apmpipe ARGS`` (a train command) run uninterrupted into ``tmp_path/ref``, and into ``tmp_path/killed``
    SIGKILLed once its step-12 checkpoint exists, then resumed; both must succeed. Returns the two run folders."""
    reference, killed = tmp_path / "ref", tmp_path / "killed"
    assert run_subprocess(*args, "--out", reference).returncode == 0
    kill_midway([*args, "--out", killed], killed / "checkpoints" / "step-00000012")
    assert not (killed / "student.safetensors").exists(), "the kill came too late to test anything"
    result = run_subprocess(*args, "--out", killed, "--resume")
    assert result.returncode == 0, result.stderr
    return reference, killed


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three WebDataset shards of 40 real digits each (32x32 grayscale PNG, labels in ``cls``)."""
    return write_digit_shards(tmp_path_factory.mktemp("shards"), count=120, per_shard=40, size=32)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory, digit_shards: list[str]) -> Path:
    """A float32 cache of both levels of the tiny ViT over the digit shards."""
    out = tmp_path_factory.mktemp("cache") / "digits.zarr"
    result = run_cli("extract", *digit_shards, "--out", out, *TINY_VIT, "--layers", "1,-1", "--dtype", "float32", *FAST)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Held-out digits (samples 1000..1079) through the same tiny ViT as ``tiny_cache``."""
    folder = tmp_path_factory.mktemp("eval")
    shards = write_digit_shards(folder / "shards", prefix="heldout", count=80, start=1000, per_shard=40, size=32)
    out = folder / "heldout.zarr"
    result = run_cli("extract", *shards, "--out", out, *TINY_VIT, "--layers", "1,-1", "--dtype", "float32", *FAST)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Path:
    """A tiny-preset student trained for a few epochs on ``tiny_cache``."""
    run = tmp_path_factory.mktemp("student") / "run"
    result = run_cli(
        "train",
        tiny_cache,
        "--out",
        run,
        "--preset",
        "tiny",
        "--batch-size",
        "8",
        "--window-samples",
        "32",
        "--loader-workers",
        "0",
        "--epochs",
        "8",
        "--lr",
        "2e-3",
        "--warmup-steps",
        "5",
        "--log-every",
        "5",
    )
    assert result.exit_code == 0, result.output
    return run
