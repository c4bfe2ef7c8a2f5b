"""Issue 20, wrong results: each fix with the test that failed before it (verify's recorded fidelity, samples a
user may modify, duplicate caches and inputs, --no-labels on folders, numeric options, NaN in reports, partly
labelled classification, --max-pixels above PIL's bomb limit)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import typing
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image

from apmpipe.pipeline.datasets import digit_images, write_digit_shards
from apmpipe.storage.cache import FeatureCache

from .conftest import FAST, TINY_VIT, run_cli, run_main

EMBED_QUICK = ["--batch-size", "16", "--loader-workers", "0"]


# -- 1: verify reads the fidelity extraction recorded ----------------------------------------------------------
@pytest.mark.parametrize("storage", [["--dtype", "int8"], ["--rank", "8"]], ids=["int8", "rank"])
def test_verify_passes_lossy_caches_against_their_recorded_fidelity(
    capsys: pytest.CaptureFixture, tmp_path: Path, storage: list[str]
) -> None:
    shards = write_digit_shards(tmp_path / "shards", count=24, per_shard=24)
    cache = tmp_path / "lossy.zarr"
    assert run_cli("extract", *shards, "--out", cache, *TINY_VIT, "--layers", "1,-1", *storage, *FAST).exit_code == 0
    result = run_main(capsys, "verify", cache, "--samples", "4", "--device", "cpu")
    assert result.returncode == 0 and "PASS" in result.stdout, result.stdout


# -- 2: samples a user may modify ------------------------------------------------------------------------------
def test_map_dataset_samples_may_be_modified_in_place(tiny_cache: Path) -> None:
    from apmpipe.storage.dataset import CacheMapDataset

    table = CacheMapDataset(str(tiny_cache), cached_chunks=64)
    first = table[0]
    pixels, tokens, logits = first["pixels"].clone(), first["tokens"][0].clone(), first["logits"].clone()
    for tensor in (first["pixels"], first["tokens"][0], first["logits"]):
        tensor.zero_()  # an in-place transform
    again = table[0]  # the same chunk, from the LRU
    assert again["pixels"].equal(pixels) and again["tokens"][0].equal(tokens) and again["logits"].equal(logits)


# -- 3: one cache given twice is read once ---------------------------------------------------------------------
def test_a_cache_given_twice_under_two_spellings_is_streamed_once(
    tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from apmpipe.storage.dataset import CacheIterableDataset
    from apmpipe.storage.stream import CacheStream

    monkeypatch.chdir(tiny_cache.parent)
    spellings = [tiny_cache.name, f"./{tiny_cache.name}/", str(tiny_cache)]
    once = CacheStream([str(tiny_cache)], batch_size=8)
    assert CacheStream(spellings, batch_size=8).steps_per_epoch() == once.steps_per_epoch() == 120 // 8
    assert len(CacheIterableDataset(spellings)) == len(CacheIterableDataset(str(tiny_cache))) == 120


# -- 4: one tar under two names is read once -------------------------------------------------------------------
def _tar_under_two_names(tmp_path: Path) -> Path:
    """A folder holding ``b.tar`` (20 digits) and ``a.tar``, a symlink to it."""
    folder = tmp_path / "both"
    (written,) = write_digit_shards(folder, prefix="b", count=20, per_shard=20)
    os.rename(written, folder / "b.tar")
    os.symlink(folder / "b.tar", folder / "a.tar")
    return folder


def test_a_tar_under_two_names_is_extracted_once(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    folder = _tar_under_two_names(tmp_path)
    for sources in ([folder], [folder / "a.tar", folder / "b.tar"]):
        out = tmp_path / f"c{len(sources)}.zarr"
        result = run_main(capsys, "extract", *sources, "--out", out, *TINY_VIT, *FAST)
        assert result.returncode == 0, result.stderr
        assert FeatureCache.open(str(out)).sample_counts() == {"a": 20}


def test_a_tar_under_two_names_is_embedded_once(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_student: Path
) -> None:
    folder = _tar_under_two_names(tmp_path)
    out = tmp_path / "emb"
    result = run_main(capsys, "embed", folder, "--student", tiny_student, "--out", out, *EMBED_QUICK)
    assert result.returncode == 0, result.stderr
    assert list(json.loads((out / "manifest.json").read_text())["parts"]) == ["a"]


# -- 5: --no-labels on image folders ---------------------------------------------------------------------------
def _image_folder(tmp_path: Path) -> Path:
    images, _ = digit_images(32, "L")
    folder = tmp_path / "photos"
    for cls, index in (("one", 1), ("zero", 0)):
        (folder / cls).mkdir(parents=True)
        images[index].save(folder / cls / f"img{index}.png")
    return folder


def test_no_labels_is_honoured_for_image_folders(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_student: Path
) -> None:
    folder = _image_folder(tmp_path)
    out = tmp_path / "c.zarr"
    assert run_main(capsys, "extract", folder, "--out", out, "--no-labels", *TINY_VIT, *FAST).returncode == 0
    cache = FeatureCache.open(str(out))
    assert cache.read("photos-00000", 0, 2).labels.tolist() == [-1, -1] and not cache.attrs.get("classes")
    emb = tmp_path / "emb"
    result = run_main(capsys, "embed", folder, "--student", tiny_student, "--out", emb, "--no-labels", *EMBED_QUICK)
    assert result.returncode == 0, result.stderr
    assert pq.read_table(emb / "metadata" / "photos-00000.parquet").column("label").to_pylist() == [-1, -1]
    assert not json.loads((emb / "manifest.json").read_text())["classes"]


# -- 9: --max-pixels above PIL's own decompression-bomb limit ---------------------------------------------------
def test_max_pixels_above_pils_bomb_limit_takes_effect(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = write_digit_shards(tmp_path / "shards", count=16, per_shard=16)  # 32 x 32 = 1,024 pixels each
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 256)  # PIL refuses above twice its limit: as 179 M is to 200 M
    out = tmp_path / "c.zarr"
    result = run_main(capsys, "extract", *shards, "--out", out, "--max-pixels", "2000", *TINY_VIT, *FAST)
    assert result.returncode == 0 and "skipped" not in result.stderr, result.stderr
    assert FeatureCache.open(str(out)).sample_counts() == {"digits-0000": 16}
    # far above --max-pixels, PIL's refusal is counted as what it is: too large, not undecodable
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 256)
    out = tmp_path / "d.zarr"
    result = run_main(capsys, "extract", *shards, "--out", out, "--max-pixels", "500", *TINY_VIT, *FAST)
    assert "skipped digits-0000/00000: image too large" in result.stderr, result.stderr


# -- 6: every numeric option is checked, in one place ----------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "option", "value", "message"),
    [
        ("train", "--clip-grad", "-1", "--clip-grad must be at least 0, got -1.0"),
        ("train", "--weight-decay", "-0.1", "--weight-decay must be at least 0, got -0.1"),
        ("train", "--lr", "nan", "--lr must be positive, got nan"),
        ("train", "--seed", "-3", "--seed must be at least 0, got -3"),
        ("train", "--rgb-weight", "-1", "--rgb-weight must be at least 0, got -1.0"),
        ("eval", "--knn-temperature", "0", "--knn-temperature must be positive, got 0.0"),
        ("eval", "--knn-temperature", "-0.07", "--knn-temperature must be positive, got -0.07"),
        ("eval", "--ttt-lr", "0", "--ttt-lr must be positive, got 0.0"),
        ("extract", "--seed", "-1", "--seed must be at least 0, got -1"),
        ("embed", "--topk", "0", "--topk must be at least 1, got 0"),
        ("islands", "--clusters", "0", "--clusters must be at least 1, got 0"),
        ("verify", "--samples", "-2", "--samples must be at least 1, got -2"),
    ],
)
def test_numeric_options_out_of_range_are_refused_before_any_work(
    capsys: pytest.CaptureFixture, tmp_path: Path, command: str, option: str, value: str, message: str
) -> None:
    student, out = tmp_path / "no-student", tmp_path / "out"
    args = {
        "train": ["train", tmp_path / "no.zarr", "--out", out],
        "eval": ["eval", tmp_path / "no.zarr", "--student", student, "--out", out],
        "extract": ["extract", tmp_path / "no.tar", "--out", out, *TINY_VIT],
        "embed": ["embed", tmp_path / "no.tar", "--student", student, "--out", out],
        "islands": ["islands", tmp_path / "no.zarr", "--student", student, "--out", out],
        "verify": ["verify", tmp_path / "no.zarr"],
    }[command]
    result = run_main(capsys, *args, option, value)
    assert result.returncode == 2 and result.stderr == f"error: {message}\n", result.stderr
    assert not out.exists()


def test_every_numeric_field_of_every_stage_config_has_a_range() -> None:
    from apmpipe.stages.embed import EmbedConfig
    from apmpipe.stages.evaluate import EvalConfig
    from apmpipe.stages.extract_config import ExtractConfig, TeacherConfig
    from apmpipe.stages.objectives import LossConfig
    from apmpipe.stages.train import TrainConfig

    numeric = {int, float, int | None, float | None}
    for config in (TeacherConfig, ExtractConfig, TrainConfig, LossConfig, EvalConfig, EmbedConfig):
        hints = typing.get_type_hints(config)
        fields = {f.name for f in dataclasses.fields(config) if hints[f.name] in numeric}
        assert fields == set(config.RANGES), config.__name__


# -- 7, 8: reports without NaN; partly labelled caches classified -----------------------------------------------
def _strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _labelled_by_the_teacher(eval_cache: Path, copy: Path) -> Path:
    """A copy of ``eval_cache`` whose labels are its teacher's own top-1 classes: a random-init teacher is at chance
    on the digits' labels, and eval then shows agreement instead of accuracies (issue 23.6)."""
    shutil.copytree(eval_cache, copy)
    for group in (copy / "shards").iterdir():
        if (group / "logits").is_dir():
            labels = zarr.open_array(str(group / "labels"), mode="r+")
            labels[:] = np.asarray(zarr.open_array(str(group / "logits"), mode="r")[:]).argmax(1)
    return copy


def test_report_json_writes_null_for_classes_absent_from_the_samples(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_student: Path, eval_cache: Path
) -> None:
    out = tmp_path / "report"
    cache = _labelled_by_the_teacher(eval_cache, tmp_path / "known.zarr")
    group = next((cache / "shards").iterdir())
    labels = zarr.open_array(str(group / "labels"), mode="r+")
    head_classes = zarr.open_array(str(group / "logits"), mode="r").shape[1]
    labels[0] = head_classes - 1  # the last class of the head: the ones between it and the teacher's are absent
    args = ["eval", cache, "--student", tiny_student, "--out", out, "--ttt-steps", "1"]
    result = run_main(capsys, *args, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    per_class = _strict_json(out / "eval.json")["classification"]["teacher_head"]["per_class"]
    assert None in per_class["student"] and None in per_class["teacher"]
    assert (out / "per_class_teacher_head.png").exists()


def test_shown_writes_a_dash_for_missing_figures() -> None:
    from apmpipe.pipeline.console import shown

    assert [shown(None), shown(float("nan")), shown(0.5), shown(2e-5, ".4g")] == ["–", "–", "0.500", "2e-05"]


def test_classification_evaluates_the_labelled_samples_and_says_how_many_were_left_out(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_student: Path, eval_cache: Path
) -> None:
    cache = _labelled_by_the_teacher(eval_cache, tmp_path / "partly.zarr")
    labels = zarr.open_array(str(cache / "shards" / "heldout-0000" / "labels"), mode="r+")
    labels[:3] = -1
    out = tmp_path / "report"
    result = run_main(capsys, "eval", cache, "--student", tiny_student, "--out", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    classification = _strict_json(out / "eval.json")["classification"]
    assert classification["left_out"] == "3 of 80 samples have no label (-1): classified without them"
    assert "top1" in classification["teacher_head"]["student"] and "skipped" not in classification
    assert "3 of 80 samples have no label" in result.stdout
