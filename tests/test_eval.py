"""apmpipe eval and islands: exact teacher-head path, k-NN/probe, TTT, pictures, errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from stages.head import TeacherHead
from storage.cache import FeatureCache
from storage.stream import iter_cache

from .conftest import FAST, TINY_VIT, run_cli, run_main


def test_teacher_head_path_reproduces_teacher_predictions(eval_cache: Path) -> None:
    cache = FeatureCache.open(str(eval_cache))
    head = TeacherHead(*cache.head())
    for _, _, data in iter_cache(cache, 40):
        logits = head(torch.from_numpy(data.tokens[-1]))
        np.testing.assert_allclose(logits.numpy(), data.logits, atol=1e-4, rtol=1e-4)
        assert (logits.argmax(1).numpy() == data.logits.argmax(1)).all()


def test_eval_reports_fidelity_classification_and_ttt(tmp_path: Path, tiny_student: Path, tiny_cache: Path, eval_cache: Path) -> None:
    out = tmp_path / "report"
    result = run_cli("eval", eval_cache, "--student", tiny_student, "--train-cache", tiny_cache, "--out", out,
                     "--ttt-steps", "8", "--ttt-lr", "3e-3", "--ttt-samples", "4", "--batch-size", "16")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 80
    fid = report["fidelity"]
    assert set(fid) == {"1", "2"} and -1 <= fid["2"]["patch_cosine"] <= 1 and "prefix_mse" in fid["2"]
    cls = report["classification"]
    head = cls["teacher_head"]
    assert 0 <= head["student"]["top1"] <= 1 and 0 <= head["agreement"] <= 1
    # real digits: the teacher's and the student's global features both classify far above chance (0.1)
    assert cls["knn"]["teacher"]["top1"] > 0.3 and cls["probe"]["teacher"]["top1"] > 0.3
    assert cls["knn"]["student"]["top1"] > 0.2 and cls["probe"]["student"]["top1"] > 0.2
    ttt = report["ttt"]
    assert ttt["samples"] == 4 and ttt["loss_after"] < ttt["loss_before"] and ttt["ms_per_sample"] > 0
    for name in ("fidelity.png", "per_class_knn.png", "per_class_probe.png", "per_class_teacher_head.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "test-time training" in result.output and "weighted k-NN" in result.output


def test_ttt_from_scratch_and_is_episodic(tmp_path: Path, tiny_student: Path, eval_cache: Path) -> None:
    out = tmp_path / "r"
    args = ["eval", eval_cache, "--student", tiny_student, "--out", out, "--max-samples", "6", "--ttt-steps", "5", "--ttt-lr", "3e-3"]
    assert run_cli(*args, "--ttt-samples", "3").exit_code == 0
    three = json.loads((out / "report.json").read_text())["ttt"]
    assert run_cli(*args, "--ttt-samples", "1").exit_code == 0
    one = json.loads((out / "report.json").read_text())["ttt"]
    # the first sample's result does not depend on how many samples follow, and later samples start fresh
    assert one["samples"] == 1 and three["samples"] == 3
    assert one["per_sample"][0] == three["per_sample"][0]
    assert all(p["loss_after"] < p["loss_before"] for p in three["per_sample"])
    assert run_cli(*args, "--ttt-samples", "2", "--ttt-from", "scratch").exit_code == 0
    scratch = json.loads((out / "report.json").read_text())["ttt"]
    assert scratch["start"] == "scratch" and scratch["loss_after"] < scratch["loss_before"]


def test_unlabelled_cache_gives_fidelity_and_says_why(tmp_path: Path, tiny_student: Path, eval_cache: Path) -> None:
    unlabelled = tmp_path / "nolabels.zarr"
    shutil.copytree(eval_cache, unlabelled)
    root = zarr.open_group(str(unlabelled), mode="r+")
    for _, group in root["shards"].groups():
        group["labels"][...] = -1
    result = run_cli("eval", unlabelled, "--student", tiny_student, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["fidelity"] and "no labels" in report["classification"]["skipped"]


def test_student_of_another_teacher_is_refused(capsys: pytest.CaptureFixture, tmp_path: Path, tiny_student: Path, digit_shards: list[str]) -> None:
    other = tmp_path / "other.zarr"
    assert run_cli("extract", digit_shards[0], "--out", other, *TINY_VIT, "--layers", "-1", *FAST).exit_code == 0
    result = run_main(capsys, "eval", other, "--student", tiny_student)
    assert result.returncode == 2 and "differs in levels" in result.stderr and result.stderr.strip().count("\n") == 0
    result = run_main(capsys, "eval", other, "--student", tmp_path / "nope")
    assert result.returncode == 2 and "no trained student" in result.stderr


def test_islands_png_from_cache_and_from_images(tmp_path: Path, tiny_student: Path, eval_cache: Path) -> None:
    out = tmp_path / "islands.png"
    result = run_cli("islands", eval_cache, "--student", tiny_student, "--out", out, "--images", "2", "--panel", "64")
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64 * (1 + 2 * 2), 22 + 2 * 64)
    from skimage import data

    photo = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(photo)
    out2 = tmp_path / "photo.png"
    result = run_cli("islands", photo, "--student", tiny_student, "--out", out2, "--mode", "kmeans", "--clusters", "3", "--panel", "48")
    assert result.exit_code == 0, result.output
    with Image.open(out2) as image:
        assert image.size == (48 * (1 + 2), 22 + 48)
