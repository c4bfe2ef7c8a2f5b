"""Issue 20, wrong results: each fix with the test that failed before it (verify's recorded fidelity, samples a
user may modify, duplicate caches and inputs, --no-labels on folders, numeric options, NaN in reports, partly
labelled classification, --max-pixels above PIL's bomb limit)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
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
