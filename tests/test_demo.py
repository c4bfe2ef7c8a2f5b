"""apmpipe demo --quick end to end: every report artifact exists and its numbers are sane."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apmpipe.pipeline.datasets import digit_split

from .conftest import run_cli, run_main


def test_demo_quick_writes_a_sane_report(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--out", out)
    assert result.exit_code == 0, result.output
    for name in (
        "report.md",
        "summary.json",
        "eval.json",
        "loss.png",
        "fidelity.png",
        "islands.png",
        "per_class_knn.png",
        "per_class_teacher_head.png",
    ):
        assert (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and min(image.size) > 50
    summary = json.loads((out / "summary.json").read_text())
    assert summary["extract"]["train_images"] == 1297 and summary["extract"]["val_images"] == 500
    # the teacher was trained here (a timm local-dir folder) and is far above chance (0.1) even with the quick recipe
    assert summary["teacher"]["val_top1"] > 0.6 and (out / "teacher" / "config.json").exists()
    assert summary["train"]["last_loss"] < 0.8 * summary["train"]["first_loss"]
    fidelity = summary["eval"]["fidelity"]
    assert set(fidelity) == {"1", "2"} and all("patch_r2" in f and "prefix_r2" in f for f in fidelity.values())
    head = summary["eval"]["classification"]["teacher_head"]
    assert head["teacher"]["top1"] > 0.6 and head["student"]["top1"] > 0.3
    ttt = summary["eval"]["ttt"]
    assert ttt["loss_after"] < ttt["loss_before"] and not math.isnan(ttt["ms_per_step"])
    report = (out / "report.md").read_text()
    assert (
        "![islands](islands.png)" in report
        and "val top-1" in report
        and "baseline" in report
        and "| weighted k-NN" in report
    )
    # rerunning the same command reuses the teacher, caches and run, and keeps the figures of the run that did the work
    again = run_cli("demo", "--quick", "--out", out)
    assert again.exit_code == 0, again.output
    rerun = json.loads((out / "summary.json").read_text())
    assert (
        rerun["train"] == summary["train"]
        and rerun["extract"] == summary["extract"]
        and "training a small ViT" not in again.output
    )


@pytest.mark.slow
def test_cnn_demo_trains_one_student_on_three_grids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--teacher-kind cnn with the demo's plan made small (a 120-step teacher on 384 of the digits' train split, 96 val
    digits, a 20-step student): the hierarchical teacher's three levels on three grids go through train, eval, TTT
    and islands, and the report names them."""
    from apmpipe.pipeline import demo
    from apmpipe.stages.reference_teacher import ConvReferenceRecipe

    def small(cls: type, quick: bool, seed: int, teacher_kind: str) -> demo.DemoPlan:
        assert teacher_kind == "cnn"
        return cls(
            teacher=replace(ConvReferenceRecipe(seed=seed), epochs=5, batch_size=16), max_steps=20, ttt_samples=1
        )

    def few_digits(seed: int) -> tuple[np.ndarray, np.ndarray]:
        train_idx, val_idx = digit_split(seed)
        return train_idx[:384], val_idx[:96]

    monkeypatch.setattr(demo, "digit_split", few_digits)
    monkeypatch.setattr(demo.DemoPlan, "of", classmethod(small))
    out, threads = tmp_path / "demo", torch.get_num_threads()
    try:  # one thread: on a loaded box more oversubscribe the cores and cost many times the CPU
        result = run_cli("--threads", "1", "demo", "--teacher-kind", "cnn", "--out", out)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["extract"]["train_images"], summary["extract"]["val_images"]) == (384, 96)
    teacher = summary["teacher"]
    assert (teacher["architecture"], teacher["layers"], teacher["grids"]) == (
        "convnext_atto",
        [2, 3, 4],
        ["16x16", "8x8", "4x4"],
    )
    fidelity = summary["eval"]["fidelity"]
    assert set(fidelity) == {"2", "3", "4"} and all("patch_r2" in f and "prefix_r2" not in f for f in fidelity.values())
    assert summary["train"]["steps"] == 20 and summary["train"]["options"]["lr"] == 2e-3  # the train defaults ran
    assert summary["eval"]["classification"]["teacher_head"]["teacher"]["top1"] > 0.1  # above chance after 120 steps
    assert summary["eval"]["ttt"]["samples"] == 1 and (out / "islands.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "timm ConvNeXt" in report and "layers by grid: 2 (16x16), 3 (8x8), 4 (4x4);" in report


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The full demo (the harder teacher on rendered digits, its caches, the default student), run once per module."""
    out = tmp_path_factory.mktemp("full") / "demo"
    result = run_cli("demo", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_default_student_decides_like_its_trained_teacher(full_demo: Path) -> None:
    """The product's promise on the harder trained teacher (4 blocks, rendered digits), with `apmpipe train`'s defaults.

    Measured at seed 0 (1 thread, 4,000 steps, docs/train.md): teacher 0.903 val top-1; the default local query gave
    held-out patch R^2 0.77/0.65 and CLS R^2 0.55/0.60 on blocks 2/4, head top-1 0.930x the teacher's (the paper's
    query: patch 0.48/0.51, 0.909x). The bars sit below those, and short of issue 21's 0.9 target.
    """
    out = full_demo
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"]["val_top1"] >= 0.85 and summary["teacher"]["recipe"]["depth"] == 4
    assert summary["train"]["options"]["lr"] == 2e-3 and summary["train"]["steps"] >= 4000  # the train defaults ran
    classification = summary["eval"]["classification"]
    head, probe = classification["teacher_head"], classification["probe"]
    assert head["student"]["top1"] >= 0.85 * head["teacher"]["top1"], head
    fidelity = summary["eval"]["fidelity"]
    assert set(fidelity) == {"2", "4"} and all(
        f["patch_r2"] >= 0.5 and f["prefix_r2"] >= 0.45 for f in fidelity.values()
    ), fidelity
    assert abs(probe["teacher"]["top1"] - head["teacher"]["top1"]) <= 0.05, (probe, head)


def test_bench_bytes_compares_reading_less_with_the_default(capsys: pytest.CaptureFixture, full_demo: Path) -> None:
    """bench bytes reuses the demo's teacher and caches in its workdir; the default plan always runs beside."""
    result = run_main(capsys, "bench", "bytes", "--workdir", full_demo, "--steps", "60", "--only", "levels")
    assert result.returncode == 0, result.stderr
    assert "training a small ViT" not in result.stderr  # the demo's teacher was reused
    assert "int8, --levels 4, --echo 4" in result.stdout and "baseline" in result.stdout
    rows = json.loads((full_demo / "bench-bytes.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["float16 cache, all levels (default)", "int8, --levels 4, --echo 4"]
    # int8 (1/2), one of two levels (1/2), echo 4 (1/4); pixels, labels and logits are read beside the tokens
    assert 1 / 16 < rows[1]["bytes_ratio"] < 1 / 8 + 0.05, rows[1]
    assert list(rows[0]["patch_cosine"]) == ["2", "4"] and list(rows[1]["patch_cosine"]) == ["4"]
    assert rows[0]["head_top1"] > 0.2 and not rows[0]["meets_bar"]  # 60 steps: above chance (0.1)
