"""The hot read path: tensorstore and zarr-python give the samples of FeatureCache.read; in-process read-ahead gives
the DataLoader's items; ``bench pipeline`` prints every stage."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from apmpipe.pipeline.console import out_console
from apmpipe.storage.cache import CachedSamples, FeatureCache
from apmpipe.storage.reader import BlockReader
from apmpipe.storage.stream import CacheStream, StreamPosition, loader_items, read_ahead, window_batches

from .conftest import FAST, TINY_VIT, run_cli, run_main


def _assert_same(a: CachedSamples, b: CachedSamples) -> None:
    assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.logits, b.logits)
    assert len(a.tokens) == len(b.tokens) and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True)
    )


@pytest.mark.parametrize("engine", ["tensorstore", "zarr"])
def test_block_reader_gives_the_samples_of_feature_cache_read(tiny_cache: Path, engine: str) -> None:
    cache = FeatureCache.open(str(tiny_cache))
    reader = BlockReader(cache, threads=2, engine=engine)
    assert reader.engine == engine
    for shard, count in cache.sample_counts().items():
        pending = [(s, reader.submit(shard, s, min(s + 8, count), logits=True)) for s in range(0, count, 8)]
        for start, wait in pending:  # every block in flight before the first is awaited
            expected = cache.read(shard, start, min(start + 8, count), extras=False, logits=True)
            _assert_same(wait(), expected)
    reader.close()


@pytest.mark.parametrize(
    ("options", "engine"),
    [(["--dtype", "int8", "--rank", "4"], "tensorstore"), (["--pixel-codec", "png"], "zarr")],
    ids=["int8-rank4", "png-pixels"],
)
def test_engines_agree_on_int8_low_rank_and_encoded_pixel_caches(
    tmp_path: Path, digit_shards: list[str], options: list[str], engine: str
) -> None:
    """int8 tokens with scales and low-rank coefficients read through tensorstore; a cache whose pixels are
    variable-length bytes (which tensorstore cannot open) falls back to zarr-python whole."""
    out = tmp_path / "c.zarr"
    assert (
        run_cli("extract", digit_shards[0], "--out", out, *TINY_VIT, "--layers", "1,-1", *FAST, *options).exit_code == 0
    )
    cache = FeatureCache.open(str(out))
    reader = BlockReader(cache, engine="tensorstore")
    assert reader.engine == engine
    for reconstruct in (True, False):
        got = reader.submit("digits-0000", 8, 24, logits=True, reconstruct=reconstruct)()
        _assert_same(got, cache.read("digits-0000", 8, 24, extras=False, logits=True, reconstruct=reconstruct))


def test_remote_caches_fall_back_to_zarr_with_the_same_samples(tiny_cache: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.put(str(tiny_cache), "/reader-test.zarr", recursive=True)
    remote = FeatureCache.open("memory://reader-test.zarr")
    local = FeatureCache.open(str(tiny_cache))
    reader = BlockReader(remote, engine="tensorstore")  # asked for, but tensorstore cannot open an fsspec store
    assert reader.engine == "zarr"
    shard = next(iter(local.sample_counts()))
    _assert_same(reader.submit(shard, 0, 8)(), local.read(shard, 0, 8, extras=False))
    fs.rm("/reader-test.zarr", recursive=True)


def _batches(stream: CacheStream, workers: int) -> list[dict]:
    return [b for item in loader_items(stream, workers) for b in window_batches(item)]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["pixels"], y["pixels"]) and torch.equal(x["labels"], y["labels"])
        assert ("logits" in x) == ("logits" in y) and torch.equal(
            x.get("logits", x["labels"]), y.get("logits", y["labels"])
        )
        assert all(torch.equal(s, t) for s, t in zip(x["tokens"], y["tokens"], strict=True))


def test_in_process_tensorstore_stream_equals_zarr_dataloader_stream_and_resumes(tiny_cache: Path) -> None:
    def stream(engine: str) -> CacheStream:
        return CacheStream([str(tiny_cache)], 8, window_samples=32, seed=3, logits=True, echo=2, engine=engine)

    old = _batches(stream("zarr"), workers=2)  # the old path: zarr-python in DataLoader workers
    new_stream = stream("tensorstore")
    _assert_same_batches(old, _batches(new_stream, workers=0))
    assert new_stream.readers()[0].engine == "tensorstore"
    # after the in-process tensorstore reads, forked DataLoader workers still read (they use zarr-python)
    _assert_same_batches(old, _batches(stream("auto"), workers=1))
    # exact resume mid-window, echoed batches counted, in-process
    resumed = stream("tensorstore")
    resumed.position = StreamPosition(0, 1, 5)
    skipped = len(new_stream.window_rows(0, 0, 32)) + 5
    _assert_same_batches(old[skipped:], _batches(resumed, workers=0))


def test_window_buffers_are_reused_only_once_nothing_holds_them(tiny_cache: Path) -> None:
    def stream() -> CacheStream:
        return CacheStream([str(tiny_cache)], 8, window_samples=8, seed=1, engine="tensorstore")

    kept = _batches(stream(), workers=0)  # every batch held: 15 windows, more than the buffers kept for reuse
    _assert_same_batches(_batches(stream(), workers=1), kept)
    addresses = [item["data"]["tokens"][0].data_ptr() for item in loader_items(stream(), 0)]  # each dropped at once
    assert len(set(addresses)) < len(addresses) == 15


def test_read_ahead_keeps_order_raises_producer_errors_and_stops_when_closed() -> None:
    assert list(read_ahead(iter(range(50)), ahead=1)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("broken block")

    with pytest.raises(ValueError, match="broken block"):
        list(read_ahead(failing(), ahead=1))
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    items = read_ahead(endless(), ahead=1)
    assert next(items) == 0
    items.close()  # stops and joins the producer: it made at most the one held, one waiting and one blocked
    assert len(produced) <= 4


def test_bench_pipeline_prints_every_stage_old_beside_new(tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(out_console, "_width", 400)  # one line per table row: stage names stay whole
    result = run_cli(
        "bench", "pipeline", "--cache", tiny_cache, "--batch-size", "8", "--window-samples", "32", "--preset", "tiny"
    )
    assert result.exit_code == 0, result.output
    text = result.output
    for stage in (
        "storage read",
        "read + decode",
        "windows to the main process",
        "pinning",
        "host->device",
        "gather / echo / rebuild",
        "student step",
        "end to end",
        "limiting stage",
        "loader per core",
        "loader cores needed",
        "assumptions",
    ):
        assert stage in text, stage


@pytest.mark.parametrize("option", [("--batch-size", "0"), ("--echo", "0"), ("--student-rate", "-1")])
def test_bench_pipeline_refuses_out_of_range_sizes_in_one_line(capsys: pytest.CaptureFixture, option: tuple) -> None:
    result = run_main(capsys, "bench", "pipeline", *option)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and option[0] in result.stderr, result.stderr
