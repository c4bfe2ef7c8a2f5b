"""Issue 20, wrong results: each fix with the test that failed before it (verify's recorded fidelity, samples a
user may modify, duplicate caches and inputs, --no-labels on folders, numeric options, NaN in reports, partly
labelled classification, --max-pixels above PIL's bomb limit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from apmpipe.pipeline.datasets import write_digit_shards

from .conftest import FAST, TINY_VIT, run_cli, run_main


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
