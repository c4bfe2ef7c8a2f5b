"""What ``apmpipe info`` says of a cache: counts, precision, problems, recorded fidelity, raw and stored bytes per
array and the read amplification of its chunking, from shard attributes, array metadata and file listings (no
sample is read)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import fsspec

from .cache import FeatureCache
from .format import FORMAT_NAME, SHARDS_GROUP, STATUS_COMPLETE, STATUS_FAILED, STATUS_WRITING, sample_arrays
from .redact import redact_url


def describe(cache: FeatureCache, sizes: bool = False) -> dict[str, Any]:
    """Counts, precision and problems of ``cache`` from one listing of shard attributes, for ``apmpipe info``.

    Raw bytes come from the spec (no array is opened); ``sizes`` also measures the stored bytes, which lists
    every file of the cache (thousands of requests on an object store).
    """
    records = cache.shard_attrs()
    status = {name: attrs.get("status", STATUS_WRITING) for name, attrs in records.items()}
    complete = sorted(n for n, s in status.items() if s == STATUS_COMPLETE)
    samples = sum(cache.recorded_samples(name, records[name]) for name in complete)
    skipped = [{"shard": name, **s} for name in sorted(records) for s in records[name].get("skipped", [])]
    failed = [
        {"shard": name, "error": records[name].get("error", "")}
        for name in sorted(records)
        if status[name] == STATUS_FAILED
    ]
    raw = samples * cache.spec.raw_bytes_per_sample
    out = {
        "url": redact_url(cache.url),
        "format": f"{FORMAT_NAME} v{cache.attrs['version']}",
        "spec": cache.spec.to_dict(),
        "head": cache.attrs.get("head", {}),
        "shards": {
            "complete": len(complete),
            "writing": sum(s == STATUS_WRITING for s in status.values()),
            "failed": len(failed),
        },
        "samples": samples,
        "precision": sorted({str(records[name].get("precision")) for name in complete}),
        "raw_bytes": raw,
        "arrays": {name: {"raw_bytes_per_sample": size} for name, size in cache.spec.raw_array_bytes().items()},
        "fidelity": recorded_fidelity(cache, records),
        "skipped_samples": skipped,
        "failed_shards": failed,
        "sources": [redact_url(s) for s in cache.attrs.get("sources", [])],
        "classes": cache.attrs.get("classes", []),
    }
    if sizes:
        per_array = stored_array_bytes(cache)
        stored = sum(per_array.values())
        out.update(
            stored_bytes=stored,
            compression_ratio=raw / stored if stored else 0.0,
            bytes_per_sample=stored / samples if samples else 0.0,
        )
        amplification = read_amplification(cache)
        for name, size in per_array.items():
            stored_per_sample = size / samples if samples else 0.0
            entry = out["arrays"].setdefault(name, {})
            entry["stored_bytes_per_sample"] = stored_per_sample
            if name in amplification:
                entry["read_bytes_per_sample"] = stored_per_sample * amplification[name]
    return out


def read_amplification(cache: FeatureCache) -> dict[str, float]:
    """Per per-sample array, stored bytes fetched per stored byte of the samples a block wants, averaged over
    the complete shard groups by samples: a block of ``chunk_samples`` fetches whole chunks, so an array chunked
    by whole shard groups (labels, keys; logits and scales of caches written before they were sharded) costs
    ``shard_samples / chunk_samples`` times its share. Reads array metadata only; missing arrays are left out."""
    counts = cache.sample_counts()
    total = sum(counts.values())
    out: dict[str, float] = {}
    for name, count in counts.items():
        group = cache.shard(name)
        for array in sample_arrays(cache.spec):
            if array in group:
                factor = max(1.0, group[array].chunks[0] / cache.spec.chunk_samples)
                out[array] = out.get(array, 0.0) + factor * count / total
    return out


def stored_array_bytes(cache: FeatureCache) -> dict[str, int]:
    """Bytes on disk of each per-sample array summed over all shard groups, and ``other`` (metadata, moments,
    bases, teacher head), from one listing of every file of the cache."""
    fs, path = fsspec.core.url_to_fs(cache.url, **cache.storage_options)
    root = fs._strip_protocol(path).rstrip("/") + "/"
    names = sample_arrays(cache.spec)
    out = dict.fromkeys([*names, "other"], 0)
    for file, info in fs.find(path, detail=True).items():
        parts = fs._strip_protocol(file)[len(root) :].split("/")  # shards/<group>/<array...>/c/...
        inside = "/".join(parts[2:]) if parts[0] == SHARDS_GROUP else ""
        out[next((n for n in names if inside.startswith(n + "/")), "other")] += int(info.get("size") or 0)
    return out


def recorded_fidelity(cache: FeatureCache, records: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Fidelity recorded by extraction over the complete shards of ``records`` (shard attributes; default: read
    now): per level as :func:`level_fidelity` combines it; ``pixels``: the worst ``psnr_db`` (JPEG)."""
    records = cache.shard_attrs() if records is None else records
    complete = {n: a for n, a in records.items() if a.get("status") == STATUS_COMPLETE}
    shards = [(cache.recorded_samples(n, a), (a.get("stats") or {}).get("fidelity") or {}) for n, a in complete.items()]
    psnr = [
        a["stats"]["pixel_fidelity"]["psnr_db"]
        for a in complete.values()
        if "psnr_db" in ((a.get("stats") or {}).get("pixel_fidelity") or {})
    ]
    return {"levels": level_fidelity(shards), "pixels": {"psnr_db": min(psnr)} if psnr else {}}


def level_fidelity(shards: Iterable[tuple[int, dict[str, dict[str, float]]]]) -> dict[str, dict[str, float]]:
    """Per level, the fidelity of several shards from each one's ``(samples, stats.fidelity)``: the worst
    ``cosine_min`` and the sample-weighted ``relative_mse`` (what ``info`` and the extract summary both show)."""
    levels: dict[str, dict[str, float]] = {}
    for count, fidelity in shards:
        for layer, found in fidelity.items():
            agg = levels.setdefault(layer, {"cosine_min": 1.0, "relative_mse": 0.0, "samples": 0})
            agg["cosine_min"] = min(agg["cosine_min"], found["cosine_min"])
            agg["relative_mse"] += found["relative_mse"] * count
            agg["samples"] += count
    return {
        layer: {**agg, "relative_mse": agg["relative_mse"] / max(agg["samples"], 1)} for layer, agg in levels.items()
    }
