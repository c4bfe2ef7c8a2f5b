"""The datasets for other training loops: samples as stored, every sample once per epoch by rank and worker,
exact mid-epoch resume through torchdata's StatefulDataLoader, random access with a chunk cache, the
example in docs/dataset.md."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from apmpipe.storage.cache import FeatureCache
from apmpipe.storage.dataset import CacheIterableDataset, CacheMapDataset
from apmpipe.storage.errors import CacheError, ConfigError
from apmpipe.storage.stream import CacheStream, StreamPosition, window_batches
from apmpipe.storage.writer import create_or_open

DATASET_DOCS = Path(__file__).resolve().parents[1] / "docs" / "dataset.md"
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")  # torchdata 0.11 on torch >= 2.10


def _stored(cache_url: Path) -> dict[str, dict[str, Any]]:
    """Every sample of the cache by key, as FeatureCache.read returns it."""
    cache = FeatureCache.open(str(cache_url))
    out = {}
    for name, count in cache.sample_counts().items():
        data = cache.read(name, 0, count)
        for row, key in enumerate(data.keys):
            out[key] = {
                "pixels": data.pixels[row],
                "label": int(data.labels[row]),
                "logits": data.logits[row],
                "tokens": [t[row] for t in data.tokens],
            }
    return out


def _assert_as_stored(sample: dict[str, Any], stored: dict[str, Any]) -> None:
    assert sample["pixels"].dtype == torch.uint8
    np.testing.assert_array_equal(sample["pixels"].numpy(), stored["pixels"])
    assert sample["label"] == stored["label"]
    np.testing.assert_array_equal(sample["logits"].numpy(), stored["logits"])
    assert len(sample["tokens"]) == len(stored["tokens"])
    for got, want in zip(sample["tokens"], stored["tokens"], strict=True):
        np.testing.assert_array_equal(got.numpy(), want)


def test_samples_equal_what_the_cache_reader_returns(tiny_cache: Path) -> None:
    stored = _stored(tiny_cache)
    table = CacheMapDataset(str(tiny_cache))
    assert len(table) == len(stored) == 120
    assert [table[i]["key"] for i in range(len(table))] == sorted(stored)  # stored order: shards by name
    streamed = list(CacheIterableDataset(str(tiny_cache), window_samples=24))
    assert sorted(s["key"] for s in streamed) == sorted(stored)
    for sample in [table[i] for i in range(len(table))] + streamed:
        _assert_as_stored(sample, stored[sample["key"]])


def test_stream_follows_the_cache_stream_plan(tiny_cache: Path) -> None:
    """One rank, batches of 8 out of windows of 24: the same batches, in the same order, as apmpipe's own loop."""
    ours = CacheIterableDataset(str(tiny_cache), window_samples=24, seed=3)
    theirs = CacheStream([str(tiny_cache)], batch_size=8, window_samples=24, seed=3)
    for epoch in (0, 1):
        ours.set_epoch(epoch)
        theirs.position = StreamPosition(epoch)
        mine = [b["tokens"][1] for b in DataLoader(ours, batch_size=8)]
        plan = [b["tokens"][1] for item in theirs for b in window_batches(item)]
        assert len(mine) == len(plan) == 15
        assert all(torch.equal(a, b) for a, b in zip(mine, plan, strict=True))


@pytest.mark.parametrize("world", [1, 2])
def test_every_sample_once_per_epoch_across_workers_and_ranks(tiny_cache: Path, world: int) -> None:
    epochs: list[list[str]] = []
    for epoch in (0, 1):
        keys, per_rank = [], []
        for rank in range(world):
            dataset = CacheIterableDataset(str(tiny_cache), window_samples=16, seed=1, rank=rank, world_size=world)
            dataset.set_epoch(epoch)
            mine = [key for batch in DataLoader(dataset, batch_size=4, num_workers=2) for key in batch["key"]]
            assert len(mine) == len(dataset)
            per_rank.append(len(mine))
            keys += mine
        assert len(set(per_rank)) == 1, "ranks must take equal steps (DDP)"
        assert len(keys) == len(set(keys)), "a sample was delivered twice in one epoch"
        # one rank: all 120; two: 15 chunks of 8 dealt 8/7, each rank cut to the smaller count
        assert len(keys) == (120 if world == 1 else 112)
        epochs.append(keys)
    assert epochs[0] != epochs[1], "each epoch shuffles differently"
    if world == 2:
        assert set(epochs[0]) | set(epochs[1]) == set(_stored(tiny_cache)), "the sample left out differs by epoch"


def _batches(loader: StatefulDataLoader, stop: int | None = None) -> tuple[list[bytes], dict | None]:
    """The batches (keys and tokens, as bytes) up to ``stop``, and the loader state right after them."""
    seen = []
    for step, batch in enumerate(loader, start=1):
        seen.append(repr(batch["key"]).encode() + batch["tokens"][0].numpy().tobytes())
        if step == stop:
            return seen, copy.deepcopy(loader.state_dict())
    return seen, None


@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_loader_resumes_mid_epoch_with_the_same_batches(tiny_cache: Path, workers: int) -> None:
    def loader(epoch: int, state: dict | None = None) -> StatefulDataLoader:
        dataset = CacheIterableDataset(str(tiny_cache), window_samples=24, seed=5, pixels=False)
        dataset.set_epoch(epoch)
        made = StatefulDataLoader(dataset, batch_size=5, num_workers=workers)
        if state is not None:
            made.load_state_dict(state)
        return made

    for epoch, stop in ((0, 7), (1, 3)):
        whole, _ = _batches(loader(epoch))
        head, state = _batches(loader(epoch), stop=stop)
        assert state is not None
        # a fresh dataset and loader, as after a restart, set to epoch 0: the state carries the epoch
        tail, _ = _batches(loader(0, state))
        assert head + tail == whole and len(tail) == len(whole) - stop


def test_map_dataset_indexes_and_decodes_each_chunk_once(tiny_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[str, int, int]] = []
    read = FeatureCache.read

    def counted(self: FeatureCache, name: str, start: int, stop: int, **options: Any) -> Any:
        reads.append((name, start, stop))
        return read(self, name, start, stop, **options)

    monkeypatch.setattr(FeatureCache, "read", counted)
    table = CacheMapDataset(str(tiny_cache), cached_chunks=64)
    assert table[-1]["key"] == table[len(table) - 1]["key"] == "00119"
    with pytest.raises(IndexError):
        table[len(table)]
    table, reads[:] = CacheMapDataset(str(tiny_cache), cached_chunks=64), []  # nothing decoded yet
    order = np.random.default_rng(0).permutation(len(table))
    batches = list(DataLoader(table, batch_size=16, sampler=order.tolist()))
    assert [key for b in batches for key in b["key"]] == [f"{i:05d}" for i in order]
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 15  # 120 samples in chunks of 8: each read once
    assert all(stop - start == 8 and start % 8 == 0 for _, start, stop in reads)  # whole chunks

    small = CacheMapDataset(str(tiny_cache), cached_chunks=1)
    reads.clear()
    for i in range(len(small)):  # sequential: one read per chunk even when one chunk is kept
        small[i]
    assert len(reads) == 15


def test_levels_dtype_pixels_and_logits_options(tiny_cache: Path) -> None:
    stored = _stored(tiny_cache)
    for dataset in (
        CacheMapDataset(str(tiny_cache), levels=[2], token_dtype="float16", pixels=False, logits=False),
        CacheIterableDataset(str(tiny_cache), levels=[2], token_dtype="float16", pixels=False, logits=False),
    ):
        assert [level.layer for level in dataset.levels] == [2]
        sample = next(iter(dataset))
        assert set(sample) == {"tokens", "label", "key"}
        (tokens,) = sample["tokens"]
        assert tokens.dtype == torch.float16
        np.testing.assert_array_equal(tokens.numpy(), stored[sample["key"]]["tokens"][1].astype(np.float16))


def _domain_error(kind: type[Exception], call: Any) -> str:
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_options_and_states_are_one_line_domain_errors(tiny_cache: Path, tmp_path: Path) -> None:
    url = str(tiny_cache)
    for make in (CacheIterableDataset, CacheMapDataset):
        message = _domain_error(CacheError, lambda make=make: make(url, levels=[1, 7]))
        assert "layer(s) 7 not cached" in message and "cached layers 1,2" in message
        assert "not one of float16, float32" in _domain_error(
            ConfigError, lambda make=make: make(url, token_dtype="int4")
        )
        assert "no feature cache" in _domain_error(CacheError, lambda make=make: make(str(tmp_path / "none.zarr")))
    empty = tmp_path / "empty.zarr"
    create_or_open(str(empty), FeatureCache.open(url).spec)
    assert "has no complete shard" in _domain_error(CacheError, lambda: CacheMapDataset(str(empty)))
    assert "rank 2 is not in 0..1" in _domain_error(
        ConfigError, lambda: CacheIterableDataset(url, rank=2, world_size=2)
    )
    assert "give no sample to each of 16 ranks" in _domain_error(
        CacheError, lambda: CacheIterableDataset(url, rank=0, world_size=16)
    )
    state = CacheIterableDataset(url, seed=1).state_dict()
    assert "saved over other caches" in _domain_error(
        CacheError, lambda: CacheIterableDataset(url, seed=2).load_state_dict(state)
    )


def _docs_example() -> str:
    section = DATASET_DOCS.read_text()
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "docs/dataset.md has no python block"
    return match.group(1)


def test_the_docs_training_loop_example_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _docs_example()], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed: True" in result.stdout
