"""``apmpipe bench codecs``: every ``--codec`` on the arrays a training step reads, side by side."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from apmpipe.storage.redact import redact_url

from .caches import scratch_dir
from .measure import machine_line, timed

if TYPE_CHECKING:
    from apmpipe.storage.codec_trial import CodecTrial


@dataclass
class CodecRow:
    """One array of a cache under one ``--codec``: bytes per sample and rates (raw MB/s)."""

    array: str  # "pixels", "labels", "logits", "tokens/<layer>" (as stored), "scales/<layer>"
    codec: str
    stored_bytes_per_sample: float
    raw_bytes_per_sample: float
    encode_mb_s: float
    decode_mb_s: float

    @property
    def ratio(self) -> float:
        return self.raw_bytes_per_sample / self.stored_bytes_per_sample


@dataclass
class CodecBench:
    url: str
    machine: str
    samples: int
    default: str
    rows: list[CodecRow]

    def totals(self) -> dict[str, tuple[float, float]]:
        """Per codec, over every measured array: stored bytes per sample and samples/s decoding them all."""
        out = {}
        for codec in dict.fromkeys(row.codec for row in self.rows):
            rows = [row for row in self.rows if row.codec == codec]
            seconds = sum(row.raw_bytes_per_sample / (row.decode_mb_s * 1e6) for row in rows)
            out[codec] = (sum(row.stored_bytes_per_sample for row in rows), 1 / seconds)
        return out


CODEC_READS = 3  # decode time: best of this many passes over the blocks


def bench_codecs(url: str, samples: int, storage_options: dict | None = None) -> CodecBench:
    """Every ``--codec`` on the arrays a training step reads, from the first complete shard group of a cache (its
    first ``samples``, in whole blocks): each written to a local scratch folder exactly as extract writes it and
    read back one block at a time as a loader thread reads it, side by side."""
    from apmpipe.storage.cache import FeatureCache
    from apmpipe.storage.codec_trial import CodecTrial, trial_arrays, trial_samples
    from apmpipe.storage.format import CODECS, DEFAULT_CODEC

    cache = FeatureCache.open(url, storage_options=storage_options)
    shard, count = trial_samples(cache, samples)
    with scratch_dir() as tmp:
        rows = [
            _codec_row(CodecTrial.of(Path(tmp), cache, shard, name, count, codec), name, codec, count)
            for name in trial_arrays(cache)
            for codec in CODECS
        ]
    return CodecBench(redact_url(url), machine_line(torch.device("cpu")), count, DEFAULT_CODEC, rows)


def _codec_row(trial: CodecTrial, name: str, codec: str, count: int) -> CodecRow:
    """One trial written once (encode) and read back ``CODEC_READS`` times (decode: the best)."""
    encode = timed(trial.write)
    decode = min(timed(trial.read_blocks) for _ in range(CODEC_READS))
    raw = trial.data.nbytes
    return CodecRow(name, codec, trial.stored_bytes() / count, raw / count, raw / encode / 1e6, raw / decode / 1e6)
