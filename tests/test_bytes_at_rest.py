"""Fewer bytes at rest: low-rank tokens (--rank) and compressed pixels (--pixel-codec), their recorded fidelity,
their bytes in ``apmpipe info``, and a plain zarr-python read of the stored form."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from apmpipe.storage.cache import FeatureCache
from apmpipe.storage.describe import describe, read_amplification
from apmpipe.storage.errors import ConfigError
from apmpipe.storage.format import CODECS, DEFAULT_CODEC, CacheSpec, LevelLayout
from apmpipe.storage.lowrank import BasisFit
from apmpipe.storage.stream import CacheStream, TokenDecoder, window_batches

from .conftest import FAST, TINY_VIT, TRAIN_FAST, run_cli, run_main

LAYERS = ["--layers", "1,-1"]  # as tiny_cache: its float32 tokens are the reference


def extract(out: Path, shards: list[str], *options: str) -> FeatureCache:
    result = run_cli("extract", *shards, "--out", out, *TINY_VIT, *LAYERS, *FAST, *options)
    assert result.exit_code == 0, result.output
    return FeatureCache.open(str(out))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def rank8(tmp_path_factory: pytest.TempPathFactory, digit_shards: list[str]) -> Path:
    """Two digit shards, tokens as 8 float16 coefficients per token."""
    out = tmp_path_factory.mktemp("rank") / "rank8.zarr"
    extract(out, digit_shards[:2], "--rank", "8")
    return out


def test_rank_reconstruction_meets_recorded_fidelity(rank8: Path, tiny_cache: Path) -> None:
    cache, full = FeatureCache.open(str(rank8)), FeatureCache.open(str(tiny_cache))
    records = cache.shard_attrs()
    for name in cache.complete_shards():
        approx, exact = cache.read(name, 0, 40), full.read(name, 0, 40)
        assert (
            [t.shape for t in approx.tokens] == [t.shape for t in exact.tokens] == [(40, 5, 192)] * 2
        )  # reconstructed to [N, T, D]
        recorded = records[name]["stats"]["fidelity"]
        for level, a, b in zip(cache.spec.levels, approx.tokens, exact.tokens, strict=True):
            measured = recorded[str(level.layer)]
            # with --rank extraction measures every batch: the recorded worst cosine is the shard's worst token
            assert cosines(a, b).min() == pytest.approx(measured["cosine_min"], abs=1e-5)
            assert np.square(a - b).sum() / np.square(b).sum() == pytest.approx(measured["relative_mse"], rel=1e-3)
            assert 0.0 < measured["relative_mse"] < 0.5
        np.testing.assert_array_equal(approx.pixels, exact.pixels)


def test_moments_are_of_reconstructed_tokens(rank8: Path) -> None:
    cache = FeatureCache.open(str(rank8))
    per_shard = (cache.read(n, 0, 40).tokens for n in cache.complete_shards())
    tokens = [np.concatenate(t) for t in zip(*per_shard, strict=True)]
    for level_tokens, moments in zip(tokens, cache.token_moments(), strict=True):
        assert moments.count == 80
        np.testing.assert_allclose(moments.sums, level_tokens.astype(np.float64).sum(0), rtol=1e-4, atol=1e-3)


def test_full_rank_is_near_exact(tmp_path: Path, digit_shards: list[str], tiny_cache: Path) -> None:
    cache = extract(tmp_path / "full.zarr", digit_shards[:1], "--rank", "192", "--dtype", "float32")
    exact = FeatureCache.open(str(tiny_cache)).read("digits-0000", 0, 40)
    for a, b in zip(cache.read("digits-0000", 0, 40).tokens, exact.tokens, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())
    assert all(f["relative_mse"] < 1e-9 for f in cache.shard_attrs()["digits-0000"]["stats"]["fidelity"].values())


def test_basis_is_stored_once_and_reused_by_later_runs(
    tmp_path: Path, rank8: Path, digit_shards: list[str], capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "grow.zarr"
    shutil.copytree(rank8, out)
    cache = FeatureCache.open(str(out))
    before = {lv.layer: (b.mean, b.components) for lv, b in zip(cache.spec.levels, cache.level_bases(), strict=True)}
    cache = extract(out, digit_shards, "--rank", "8")  # one more input shard: the basis is not refitted
    assert cache.complete_shards() == ["digits-0000", "digits-0001", "digits-0002"]
    for level, basis in zip(cache.spec.levels, cache.level_bases(), strict=True):
        np.testing.assert_array_equal(basis.mean, before[level.layer][0])
        np.testing.assert_array_equal(basis.components, before[level.layer][1])
        np.testing.assert_allclose(basis.components @ basis.components.T, np.eye(8), atol=1e-5)
    assert dict(zarr.open_group(str(out), mode="r")["bases"].attrs)["inputs"] == ["digits-0000", "digits-0001"]
    again = extract(tmp_path / "again.zarr", digit_shards[:2], "--rank", "8")  # the same inputs give the same basis
    for a, b in zip(again.level_bases(), cache.level_bases(), strict=True):
        np.testing.assert_array_equal(a.components, b.components)

    outcome = run_main(capsys, "extract", *digit_shards, "--out", out, *TINY_VIT, *LAYERS, *FAST, "--rank", "16")
    assert outcome.returncode == 2 and "rank" in outcome.stderr and len(outcome.stderr.strip().splitlines()) == 1, (
        outcome.stderr
    )


def test_plain_zarr_reads_coefficients_and_basis(tmp_path: Path, digit_shards: list[str]) -> None:
    cache = extract(tmp_path / "int8.zarr", digit_shards[:1], "--rank", "16", "--dtype", "int8")
    root = zarr.open_group(str(tmp_path / "int8.zarr"), mode="r")
    assert root.attrs["apmpipe"]["spec"]["rank"] == 16
    group = root["shards/digits-0000"]
    for level, expected in zip(cache.spec.levels, cache.read("digits-0000", 0, 40).tokens, strict=True):
        layer = str(level.layer)
        coefficients = (
            group[f"tokens/{layer}"][...].astype(np.float32) * group[f"scales/{layer}"][...][..., None]
        )  # [N, T, K]
        tokens = root[f"bases/{layer}/mean"][...] + coefficients @ root[f"bases/{layer}/components"][...]  # [N, T, D]
        assert (
            group[f"tokens/{layer}"].shape == (40, 5, 16)
            and group[f"tokens/{layer}"].metadata.dimension_names[-1] == f"component_{layer}"
        )
        np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)


def _inner_compressors(out: Path, array: str) -> list[str]:
    meta = json.loads((out / f"shards/digits-0000/{array}/zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"] if meta["codecs"][0]["name"] == "sharding_indexed" else []
    codecs = inner or meta["codecs"]
    assert codecs[-1]["name"] == "crc32c", codecs  # every (inner) chunk is checksummed, whatever --codec says
    return [c["name"] + (f":{c['configuration']['shuffle']}" if c["name"] == "blosc" else "") for c in codecs[1:-1]]


@pytest.mark.parametrize(
    ("options", "tokens", "others"),
    [
        ((), ["blosc:bitshuffle"], ["zstd"]),  # the default
        (("--codec", "zstd"), ["zstd"], ["zstd"]),
        (("--codec", "none"), [], []),
    ],
)
def test_codec_compresses_tokens_and_keeps_them_exact(
    tmp_path: Path,
    digit_shards: list[str],
    tiny_cache: Path,
    options: tuple[str, ...],
    tokens: list[str],
    others: list[str],
) -> None:
    out = tmp_path / "c.zarr"
    cache = extract(out, digit_shards[:1], "--dtype", "float32", *options)
    assert _inner_compressors(out, "tokens/1") == tokens
    assert _inner_compressors(out, "pixels") == _inner_compressors(out, "logits") == others
    got, want = cache.read("digits-0000", 0, 40), FeatureCache.open(str(tiny_cache)).read("digits-0000", 0, 40)
    for a, b in zip(got.tokens, want.tokens, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(got.pixels, want.pixels)


def test_rerun_without_codec_keeps_the_caches_and_another_codec_is_refused(
    tmp_path: Path, digit_shards: list[str]
) -> None:
    out = tmp_path / "c.zarr"
    extract(out, digit_shards[:1], "--codec", "zstd")  # e.g. a cache made when zstd was the default
    rerun = run_cli("extract", *digit_shards[:2], "--out", out, *TINY_VIT, *LAYERS, *FAST)
    assert rerun.exit_code == 0 and "1 already complete" in rerun.output, rerun.output
    assert FeatureCache.open(str(out)).spec.codec == "zstd" and _inner_compressors(out, "tokens/1") == ["zstd"]
    meta = json.loads((out / "shards/digits-0001/tokens/1/zarr.json").read_text())
    assert meta["codecs"][0]["configuration"]["codecs"][1]["name"] == "zstd"  # the added shard too
    refused = run_cli("extract", *digit_shards[:2], "--out", out, *TINY_VIT, *LAYERS, *FAST, "--codec", "none")
    assert refused.exit_code == 2 and "was written with codec 'zstd', not 'none'" in refused.output


def test_bench_default_codec_is_the_caches() -> None:
    from apmpipe.pipeline.cli.options import DEFAULT_CODEC_CHOICE

    assert DEFAULT_CODEC_CHOICE.value == DEFAULT_CODEC


def test_int8_tokens_take_zstd_under_the_default_codec(tmp_path: Path, digit_shards: list[str]) -> None:
    out = tmp_path / "c.zarr"
    extract(out, digit_shards[:1], "--dtype", "int8")
    assert _inner_compressors(out, "tokens/1") == _inner_compressors(out, "scales/1") == ["zstd"]


def test_bench_codecs_measures_every_array_a_step_reads(
    tiny_cache: Path, rank8: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from apmpipe.pipeline.bench.codecs import bench_codecs

    result = bench_codecs(str(tiny_cache), samples=20)  # whole blocks of 8: 16 samples
    arrays = ("pixels", "labels", "logits", "tokens/1", "tokens/2")
    rows = {(row.array, row.codec): row for row in result.rows}
    assert set(rows) == {(a, c) for a in arrays for c in CODECS}
    assert result.samples == 16 and result.default == "blosc-lz4"
    assert all(rows[(a, c)].raw_bytes_per_sample == 5 * 192 * 4 for a in ("tokens/1", "tokens/2") for c in CODECS)
    assert rows[("pixels", "zstd")].stored_bytes_per_sample < rows[("pixels", "none")].stored_bytes_per_sample
    assert rows[("tokens/1", "none")].ratio == pytest.approx(1.0, abs=0.01)  # only the shard index is added
    totals = result.totals()
    assert totals["none"][0] == pytest.approx(sum(rows[(a, "none")].stored_bytes_per_sample for a in arrays))
    assert all(rate > 0 for _, rate in totals.values())

    low_rank = {(row.array, row.codec): row for row in bench_codecs(str(rank8), samples=8).rows}
    assert low_rank[("tokens/1", "none")].raw_bytes_per_sample == 5 * 8 * 2  # float16 coefficients, as stored

    shown = run_cli("bench", "codecs", tiny_cache, "--samples", "8")
    assert shown.exit_code == 0 and "per sample, blosc-lz4 (default)" in shown.output
    refused = run_cli("bench", "codecs", tiny_cache, "--samples", "5")
    assert refused.exit_code == 2 and "--samples must be at least the cache's chunk_samples (8)" in refused.output

    monkeypatch.setattr(FeatureCache, "sample_counts", lambda self: {"empty": 0, "digits-0001": 40})
    assert bench_codecs(str(tiny_cache), samples=8).samples == 8  # a shard of skipped samples is passed over
    monkeypatch.setattr(FeatureCache, "sample_counts", lambda self: {"empty": 0})
    empty = run_cli("bench", "codecs", tiny_cache)
    assert empty.exit_code == 2 and "no complete shard with 8 samples or more" in empty.output


def test_bench_codecs_leaves_encoded_pixels_alone(tmp_path: Path, digit_shards: list[str]) -> None:
    from apmpipe.pipeline.bench.codecs import bench_codecs

    out = tmp_path / "png.zarr"
    extract(out, digit_shards[:1], "--pixel-codec", "png", "--dtype", "int8")
    arrays = {row.array for row in bench_codecs(str(out), samples=8).rows}
    assert arrays == {"labels", "logits", "tokens/1", "scales/1", "tokens/2", "scales/2"}


def test_whole_shard_chunks_of_older_caches_count_as_fetched(
    tmp_path: Path, digit_shards: list[str], capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "c.zarr"
    cache = extract(out, digit_shards[:2])
    expected = cache.read("digits-0000", 0, 40, logits=True).logits
    group = zarr.open_group(str(out / "shards/digits-0000"), mode="r+")
    del group["logits"]  # as written before logits were sharded: one chunk per shard group (16 samples here)
    group.create_array("logits", data=expected, chunks=(16, expected.shape[1]), dimension_names=("sample", "class"))
    cache = FeatureCache.open(str(out))
    np.testing.assert_array_equal(cache.read("digits-0000", 8, 16, logits=True).logits, expected[8:16])
    factors = read_amplification(cache)
    assert factors["logits"] == pytest.approx((2 * 40 + 1 * 40) / 80)  # a block of 8 fetches 16 in one group
    assert factors["labels"] == 2 and factors["tokens/1"] == factors["pixels"] == 1
    shown = run_main(capsys, "info", out, "--sizes")
    assert shown.returncode == 0 and "fetched per sample read" in shown.stdout.split("bytes/sample logits")[1]

    del zarr.open_group(str(out / "shards/digits-0001"), mode="r+")["logits"]  # a damaged group
    damaged = run_main(capsys, "info", out, "--sizes")
    assert damaged.returncode == 0 and read_amplification(FeatureCache.open(str(out)))["logits"] == 1.0


@pytest.mark.parametrize("codec", ["png", "webp"])
def test_lossless_pixel_codecs_are_bit_identical(
    tmp_path: Path, digit_shards: list[str], tiny_cache: Path, codec: str
) -> None:
    cache = extract(tmp_path / f"{codec}.zarr", digit_shards[:1], "--pixel-codec", codec)
    stored = zarr.open_group(str(tmp_path / f"{codec}.zarr"), mode="r")["shards/digits-0000/pixels"]
    meta = json.loads((tmp_path / f"{codec}.zarr/shards/digits-0000/pixels/zarr.json").read_text())
    assert (
        stored.shape == (40,) and meta["data_type"] == "variable_length_bytes" and meta["dimension_names"] == ["sample"]
    )
    np.testing.assert_array_equal(
        cache.read("digits-0000", 3, 27).pixels, FeatureCache.open(str(tiny_cache)).read("digits-0000", 3, 27).pixels
    )
    assert "pixel_fidelity" not in cache.shard_attrs()["digits-0000"]["stats"]


def test_jpeg_records_psnr_and_info_shows_bytes_and_fidelity(
    tmp_path: Path, digit_shards: list[str], tiny_cache: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "jpeg.zarr"
    cache = extract(out, digit_shards[:1], "--pixel-codec", "jpeg", "--rank", "8", "--dtype", "int8")
    recorded = cache.shard_attrs()["digits-0000"]["stats"]["pixel_fidelity"]["psnr_db"]
    decoded = cache.read("digits-0000", 0, 40).pixels.astype(np.float64)  # with --rank: every batch measured
    exact = FeatureCache.open(str(tiny_cache)).read("digits-0000", 0, 40).pixels
    assert (
        recorded == pytest.approx(10 * np.log10(255.0**2 / np.square(decoded - exact).mean()), abs=0.01)
        and 25 < recorded < 100
    )

    desc = describe(cache, sizes=True)
    assert desc["arrays"]["pixels"]["raw_bytes_per_sample"] == 3 * 32 * 32
    assert 0 < desc["arrays"]["pixels"]["stored_bytes_per_sample"] < 3 * 32 * 32
    assert (
        desc["arrays"]["tokens/1"]["raw_bytes_per_sample"] == 5 * 8
        and desc["arrays"]["scales/1"]["raw_bytes_per_sample"] == 5 * 4
    )
    assert sum(a.get("stored_bytes_per_sample", 0) for a in desc["arrays"].values()) * 40 == pytest.approx(
        desc["stored_bytes"]
    )
    arrays = desc["arrays"]  # a block (--chunk-samples 8) fetches only its samples, but whole-shard chunks (16)
    assert all(
        arrays[n]["read_bytes_per_sample"] == arrays[n]["stored_bytes_per_sample"]
        for n in ("pixels", "logits", "tokens/1", "scales/1")
    )
    assert arrays["labels"]["read_bytes_per_sample"] == pytest.approx(2 * arrays["labels"]["stored_bytes_per_sample"])
    assert set(desc["fidelity"]["levels"]) == {"1", "2"} and desc["fidelity"]["pixels"]["psnr_db"] == recorded
    outcome = run_main(capsys, "info", out, "--sizes")
    assert outcome.returncode == 0
    assert (
        "bytes/sample tokens/2" in outcome.stdout
        and "fidelity layer 1" in outcome.stdout
        and "PSNR" in outcome.stdout
        and "rank-8" in outcome.stdout
    )


def test_stream_reconstructs_low_rank_tokens(rank8: Path) -> None:
    stream = CacheStream([str(rank8)], batch_size=8, window_samples=16)
    batch = next(window_batches(next(iter(stream))))
    assert [tuple(t.shape) for t in batch["tokens"]] == [(8, 5, 192)] * 2 and batch["tokens"][0].dtype == torch.float16


def test_stream_ships_coefficients_that_the_decoder_rebuilds(
    tmp_path: Path, rank8: Path, digit_shards: list[str], capsys: pytest.CaptureFixture
) -> None:
    rebuilt_in_loader = next(window_batches(next(iter(CacheStream([str(rank8)], batch_size=8, window_samples=16)))))
    stream = CacheStream([str(rank8)], batch_size=8, window_samples=16, coefficients=True)
    shipped = next(window_batches(next(iter(stream))))
    assert [tuple(t.shape) for t in shipped["tokens"]] == [(8, 5, 8)] * 2  # 8 of 192 values per token cross over
    decoded = TokenDecoder(stream.coefficient_bases)(shipped["tokens"])
    for on_device, in_loader in zip(decoded, rebuilt_in_loader["tokens"], strict=True):
        assert on_device.dtype == torch.float32 and on_device.shape == in_loader.shape
        torch.testing.assert_close(on_device.half(), in_loader, atol=2e-3, rtol=2e-3)
    # caches with different bases cannot share one decoder: their tokens are rebuilt in the loader instead
    other = extract(tmp_path / "other.zarr", digit_shards[2:], "--rank", "8")
    assert not np.array_equal(
        other.level_bases()[0].components, FeatureCache.open(str(rank8)).level_bases()[0].components
    )
    mixed = CacheStream([str(rank8), other.url], batch_size=8, window_samples=16, coefficients=True)
    assert mixed.coefficient_bases is None and next(window_batches(next(iter(mixed))))["tokens"][0].shape[-1] == 192
    # training rebuilds on its device and learns
    run = tmp_path / "run"
    outcome = run_main(
        capsys,
        "train",
        rank8,
        "--out",
        run,
        *TRAIN_FAST,
        "--epochs",
        "4",
        "--logit-weight",
        "0",
    )
    assert outcome.returncode == 0, outcome.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"]


def test_older_v2_cache_without_the_new_fields_reads_as_before(tmp_path: Path, tiny_cache: Path) -> None:
    old = tmp_path / "old.zarr"
    shutil.copytree(tiny_cache, old)
    meta = json.loads((old / "zarr.json").read_text())
    for key in ("rank", "pixel_codec"):
        del meta["attributes"]["apmpipe"]["spec"][key]
    (old / "zarr.json").write_text(json.dumps(meta))
    cache = FeatureCache.open(str(old))
    assert (cache.spec.rank, cache.spec.pixel_codec) == (0, "raw")
    np.testing.assert_array_equal(
        cache.read("digits-0000", 0, 8).tokens[1],
        FeatureCache.open(str(tiny_cache)).read("digits-0000", 0, 8).tokens[1],
    )


def test_spec_refuses_impossible_rank_and_pixel_codec() -> None:
    base = {
        "teacher": {},
        "data_config": {"input_size": [4, 8, 8]},
        "levels": (LevelLayout(1, 1, (2, 2), 16),),
        "final_norm": False,
        "num_classes": 0,
    }
    with pytest.raises(ConfigError, match="--rank 17"):
        CacheSpec(**base, rank=17)
    with pytest.raises(ConfigError, match="--pixel-codec png"):
        CacheSpec(**base, pixel_codec="png")


def test_basis_fit_finds_the_spanning_directions() -> None:
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.normal(size=(32, 3)))[0].T  # [3, 32] orthonormal
    tokens = rng.normal(size=(50, 7, 3)) * [5.0, 3.0, 1.0] @ directions + 2.0  # [50, 7, 32], rank 3 around a mean of 2
    fit = BasisFit(32)
    fit.add(tokens[:20])
    fit.add(tokens[20:])
    basis, explained = fit.basis(3)
    assert explained == pytest.approx(1.0)
    np.testing.assert_allclose(basis.reconstruct(basis.project(tokens)), tokens, atol=1e-4)
    assert basis.rank == 3 and basis.components.dtype == np.float32
