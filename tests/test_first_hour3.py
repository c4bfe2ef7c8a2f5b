"""Issue 23 (a new user's first hour, round two), items 4-8: hints that name what a path is and the command that
takes it, progress of the demo's teacher, teacher-head scores against unrelated labels, messages in plain words, and
the small things a newcomer meets. Each behaviour through the CLI where it can be."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from apmpipe.pipeline.cli import main

from .conftest import FAST, TINY_TRAIN, TINY_VIT, Outcome, one_error_line, run_main
from .test_hardening import _tar


# -- 4: wrong-way hints name what the thing is and the command that takes it --------------------------------------
def test_a_cache_given_as_student_or_images_is_named_a_cache(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path, tiny_student: Path
) -> None:
    line = one_error_line(run_main(capsys, "eval", tiny_cache, "--student", tiny_cache).stderr)
    assert "is a feature cache (apmpipe extract --out), not a training run" in line, line
    assert "take a run as --student" in line and "--out " + str(tiny_cache) not in line, line
    result = run_main(capsys, "embed", tiny_cache, "--student", tiny_student, "-o", tmp_path / "e")
    line = one_error_line(result.stderr)
    assert "is a feature cache" in line and "not input images" in line and "class folders" not in line, line


def test_a_run_given_as_cache_or_images_is_named_a_run(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_student: Path
) -> None:
    for args in (["info", tiny_student], ["train", tiny_student, "-o", tmp_path / "r"]):
        line = one_error_line(run_main(capsys, *args).stderr)
        assert "is a training run (apmpipe train --out), not a feature cache" in line, line
        assert "--out " + str(tiny_student) not in line, line  # no advice to extract into the run folder
    line = one_error_line(run_main(capsys, "extract", tiny_student, "-o", tmp_path / "c.zarr", *TINY_VIT).stderr)
    assert "is a training run" in line and "not input images" in line, line


def test_a_shard_given_as_student_is_named_a_shard(
    capsys: pytest.CaptureFixture, tiny_cache: Path, digit_shards: list[str]
) -> None:
    line = one_error_line(run_main(capsys, "eval", tiny_cache, "--student", digit_shards[0]).stderr)
    assert "is an input shard, not a training run" in line, line


def test_an_option_of_another_command_names_that_command(capsys: pytest.CaptureFixture, tiny_cache: Path) -> None:
    result = run_main(capsys, "train", tiny_cache, "-o", "run", "--teacher", "vit_tiny_patch16_224")
    line = one_error_line(result.stderr)
    assert result.returncode == 2 and "has no option --teacher; it is an option of apmpipe extract" in line, line
    assert "--echo" not in line, line


def test_a_global_option_after_the_command_says_it_goes_before(capsys: pytest.CaptureFixture, tiny_cache: Path) -> None:
    result = run_main(capsys, "train", tiny_cache, "-o", "run", "--threads", "1")
    line = one_error_line(result.stderr)
    assert result.returncode == 2 and "--threads is a global option: it goes before the command" in line, line
    assert "apmpipe --threads N train ..." in line, line


def test_a_cache_without_samples_does_not_ask_for_a_smaller_batch(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    broken = _tar(tmp_path / "broken.tar", {"a.png": b"not an image", "a.cls": b"1", "b.png": b"", "b.cls": b"2"})
    cache = tmp_path / "empty.zarr"
    run_main(capsys, "extract", broken, "-o", cache, *TINY_VIT, *FAST)  # every sample skipped (its exit: issue 23.1)
    line = one_error_line(run_main(capsys, "train", cache, "-o", tmp_path / "run", *TINY_TRAIN).stderr)
    assert "no samples in" in line and f"apmpipe info {cache}" in line and "--batch-size" not in line, line


# -- 5: the demo's teacher training shows progress and runs on the threads it is given ------------------------------
def _run_captured(*args: object) -> Outcome:
    """``apmpipe ARGS`` in this process with stdout and stderr captured (module fixtures cannot take capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return Outcome(int(exit_info.value.code or 0), out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Outcome, Outcome]:
    """``apmpipe --threads 1 demo`` with a 1-epoch teacher and a 6-step student (the demo's plan made small), run
    twice into one folder: (folder, first run, rerun that finds everything done)."""
    import torch

    from apmpipe.pipeline import demo
    from apmpipe.stages.reference_teacher import ReferenceRecipe

    def small(cls: type, quick: bool, seed: int, teacher_kind: str) -> demo.DemoPlan:
        return cls(teacher=replace(ReferenceRecipe(seed=seed), epochs=1), max_steps=6, ttt_samples=1)

    out, threads = tmp_path_factory.mktemp("demo") / "demo", torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(demo.DemoPlan, "of", classmethod(small))
        try:
            runs = [_run_captured("--threads", "1", "demo", "--out", out) for _ in range(2)]
        finally:
            torch.set_num_threads(threads)
    assert all(run.returncode == 0 for run in runs), runs
    return out, runs[0], runs[1]


def test_the_demo_teacher_shows_progress_on_the_given_threads(small_demo: tuple[Path, Outcome, Outcome]) -> None:
    out, first, _ = small_demo
    steps = 1297 // 64  # one epoch of the digits' train split at the recipe's batch size
    assert re.search(rf"teacher .* {steps}/{steps} epoch 1", first.stderr), first.stderr
    assert json.loads((out / "teacher" / "training.json").read_text())["threads"] == 1


# -- 8: small things ----------------------------------------------------------------------------------------------
def test_a_demo_rerun_shows_the_finished_run_not_a_stale_bar(small_demo: tuple[Path, Outcome, Outcome]) -> None:
    _, _, rerun = small_demo
    assert "already trained: step 6 of 6" in rerun.stderr and not re.search(r"train .* 0/6", rerun.stderr), rerun.stderr


def test_one_thread_and_one_sample_are_singular(small_demo: tuple[Path, Outcome, Outcome]) -> None:
    out, first, _ = small_demo
    text = first.stdout + (out / "report.md").read_text()
    assert "1 sample x 10 steps" in first.stdout and "(1 thread)" in first.stdout, first.stdout
    assert "1 threads" not in text and "1 samples" not in text and "1 validation sample," in text


def test_demo_and_eval_write_one_report_name(
    small_demo: tuple[Path, Outcome, Outcome],
    capsys: pytest.CaptureFixture,
    tmp_path: Path,
    tiny_student: Path,
    eval_cache: Path,
) -> None:
    out, _, _ = small_demo
    assert (out / "eval.json").is_file() and not (out / "report.json").exists()
    result = run_main(capsys, "eval", eval_cache, "--student", tiny_student, "-o", tmp_path / "report")
    assert result.returncode == 0 and (tmp_path / "report" / "eval.json").is_file(), result.stderr


def test_ctrl_c_prints_stopping_once_with_loader_workers(tmp_path: Path, tiny_cache: Path) -> None:
    run = tmp_path / "run"
    args = ["train", tiny_cache, "-o", run, *TINY_TRAIN, "--loader-workers", "2", "--max-steps", "100000"]
    args += ["--log-every", "1", "--checkpoint-every", "100000", "--checkpoint-minutes", "0"]
    proc = subprocess.Popen(  # a terminal's Ctrl-C reaches the whole process group: the loader workers too
        [sys.executable, "-m", "apmpipe.pipeline", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) > 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.count("SIGINT: stopping after this step's checkpoint") == 1, err


def test_the_loss_legend_lists_levels_in_order_beside_the_plot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from apmpipe.pipeline.report import plot_losses

    figures: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *args, **kwargs: figures.append(self))
    records = [
        {"step": s, "loss": 3.0, "loss_level_12": 1.0, "loss_level_4": 1.0, "loss_level_8": 1.0, "loss_rgb": 0.1}
        for s in (1, 2, 3)
    ]
    plot_losses(records, tmp_path / "loss.png")
    figure = figures[0]
    ax, legend = figure.axes[0], figure.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["total", "level 4", "level 8", "level 12", "rgb"]
    levels = ax.lines[1:4]  # equal losses draw on top of each other: each level needs its own dashes to be seen
    assert len({line.get_linestyle() for line in levels}) == 3
    figure.draw_without_rendering()
    assert legend.get_window_extent().x0 >= ax.get_window_extent().x1  # beside the axes: it covers no line


def _commands() -> list[tuple[str, Any]]:
    import typer

    from apmpipe.pipeline.cli.root import _subcommands, app

    return [(path, command) for path, command in _subcommands(typer.main.get_command(app), "apmpipe")]


def test_every_out_option_has_the_short_o() -> None:
    with_out = [(path, command) for path, command in _commands() if any("--out" in p.opts for p in command.params)]
    assert len(with_out) >= 6
    for path, command in with_out:
        assert any("-o" in p.opts and "--out" in p.opts for p in command.params), path


def test_usage_lines_name_arguments_plainly(capsys: pytest.CaptureFixture) -> None:
    for path, _ in _commands():
        result = run_main(capsys, *path.split()[1:], "--help")
        usage = result.stdout.splitlines()[0]
        assert "{" not in usage and "<list[" not in result.stdout, (path, result.stdout)
    assert run_main(capsys, "extract", "--help").stdout.startswith("Usage: apmpipe extract [OPTIONS] SOURCES...")


def test_islands_out_is_a_folder_and_a_png_path_still_names_the_file(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_student: Path, eval_cache: Path
) -> None:
    common = ["--student", tiny_student, "--images", "1", "--panel", "32"]
    result = run_main(capsys, "islands", eval_cache, *common, "-o", tmp_path / "figures")
    assert result.returncode == 0 and (tmp_path / "figures" / "islands.png").is_file(), result.stderr
    result = run_main(capsys, "islands", eval_cache, *common, "--out", tmp_path / "named.png")
    assert result.returncode == 0 and (tmp_path / "named.png").is_file(), result.stderr


def test_what_embed_leaves_in_its_folder_is_documented(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_student: Path, digit_shards: list[str]
) -> None:
    from apmpipe.storage import embeddings

    out = tmp_path / "emb"
    result = run_main(capsys, "embed", digit_shards[0], "--student", tiny_student, "-o", out, "--loader-workers", "0")
    assert result.returncode == 0, result.stderr
    page = (Path(__file__).parents[1] / "docs" / "embed.md").read_text()
    for entry in out.iterdir():
        name = re.sub(r"layer\d+$", "layer{L}", entry.name)  # emb_layer2 is documented as emb_layer{L}
        assert name in embeddings.__doc__ and f"emb/{name}" in page, entry.name


# -- 6: teacher-head scores against labels that are not the head's classes -----------------------------------------
def test_eval_shows_agreement_when_the_teacher_head_is_near_chance_on_the_labels(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_student: Path, eval_cache: Path
) -> None:
    out = tmp_path / "report"  # a random-init 10-class head on real digits: its own top-1 is about chance (0.1)
    result = run_main(capsys, "eval", eval_cache, "--student", tiny_student, "-o", out, "--ttt-steps", "2")
    assert result.returncode == 0, result.stderr
    head = json.loads((out / "eval.json").read_text())["classification"]["teacher_head"]
    assert "near chance" in head["labels_unrelated"] and "student" not in head and 0 <= head["agreement"] <= 1
    text = " ".join(result.stdout.replace("│", " ").split())  # the table's cells, unwrapped
    assert "labels are not the head's classes" in text and "student agrees with the teacher's top-1 on" in text
    assert "x teacher) | teacher" not in text.split("weighted k-NN")[0] and "TTT head agreement" in text, text
    assert not (out / "per_class_teacher_head.png").exists()  # no empty per-class plot


def test_label_ids_outside_the_head_are_not_its_classes() -> None:
    import torch

    from apmpipe.stages.classify import head_side_by_side

    labels = torch.tensor([0, 1, 2, 5, 5])
    teacher = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1])] * 10  # a 3-class head, perfect on the ids it has
    result = head_side_by_side("teacher head", teacher, teacher, labels)
    assert result["labels_unrelated"] == "label ids reach 5 but the head has 3 classes" and result["agreement"] == 1
    assert "per_class" in head_side_by_side("teacher head", teacher, teacher, torch.tensor([0, 1, 2, 0, 1]))


# -- 7: messages in plain words and values, no object reprs --------------------------------------------------------
def test_skip_and_failure_lines_have_no_object_reprs(
    capsys: pytest.CaptureFixture, tmp_path: Path, digit_shards: list[str]
) -> None:
    broken = _tar(tmp_path / "broken.tar", {"a.png": b"not an image", "a.cls": b"1"})
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(Path(digit_shards[0]).read_bytes()[:10])
    result = run_main(capsys, "extract", broken, truncated, "-o", tmp_path / "c.zarr", *TINY_VIT, *FAST)
    err = " ".join(result.stderr.split())
    assert "skipped broken/a: undecodable image: cannot identify image file" in err, err
    assert f"failed shard truncated: ReadError: truncated header ({truncated})" in err, err
    assert " object at 0x" not in err and "LocalFileOpener" not in err, err


def test_re_extracting_with_other_layers_names_them_plainly(
    capsys: pytest.CaptureFixture, tmp_path: Path, digit_shards: list[str]
) -> None:
    cache = tmp_path / "c.zarr"
    assert run_main(capsys, "extract", digit_shards[0], "-o", cache, *TINY_VIT, *FAST, "--layers", "-1").returncode == 0
    result = run_main(capsys, "extract", digit_shards[0], "-o", cache, *TINY_VIT, *FAST, "--layers", "1,-1")
    line = one_error_line(result.stderr)
    assert "was written with levels [layer 2], not [layer 1, layer 2]; use another --out" in line, line
    assert "{" not in line and "'layer'" not in line, line
