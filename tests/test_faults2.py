"""Faults and honest docs, round two (issue 20): torn metrics, one-class probes, mixed-precision workers, eval
folders per cache, run-folder writer locks, bounded embed parts, and FORMAT.md against the code."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import timm
from safetensors.torch import save_file

from apmpipe.pipeline import cluster
from apmpipe.pipeline.api import extract
from apmpipe.pipeline.datasets import digit_images, write_digit_shards
from apmpipe.pipeline.report import eval_folder
from apmpipe.stages import embed as embed_stage
from apmpipe.stages import evaluate
from apmpipe.stages.extract import basis_inputs, extract_shards
from apmpipe.stages.extract_config import ExtractConfig
from apmpipe.stages.input_options import resolve_config_inputs
from apmpipe.stages.teacher import TeacherPool
from apmpipe.storage.cache import FeatureCache
from apmpipe.storage.describe import describe
from apmpipe.storage.errors import CacheError
from apmpipe.storage.locks import LEASE_SECONDS, lock_name
from apmpipe.storage.sources import ShardSource

from .conftest import FAST, TINY_VIT, TRAIN_FAST, run_main

TINY_KWARGS = {"img_size": 32, "depth": 2, "num_classes": 10}  # TINY_VIT's --model-arg, for the Python API


def test_resume_drops_a_torn_last_metrics_line(
    tiny_cache: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    """A kill (or a full disk) during an append leaves half a JSON line at the end of metrics.jsonl: --resume
    drops it with a warning instead of crashing on it."""
    run = tmp_path / "run"
    args = ["train", tiny_cache, "--out", run, *TRAIN_FAST, "--max-steps", "4", "--checkpoint-every", "2"]
    assert run_main(capsys, *args).returncode == 0
    metrics = run / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 6, "loss": 0.5')  # torn mid-record
    with caplog.at_level(logging.WARNING):
        resumed = run_main(capsys, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "torn last line of" in caplog.text and "metrics.jsonl" in caplog.text
    assert metrics.read_text() == whole


def test_eval_refuses_a_one_class_train_cache_before_the_pass(
    tiny_student: Path, eval_cache: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A probe cannot be fitted on one class (LogisticRegression raised after the whole pass): refused in one line
    before any sample is read."""
    threes = [int(i) for i in np.flatnonzero(digit_images(8)[1] == 3)[:16]]
    shards = write_digit_shards(tmp_path / "shards", prefix="threes", indices=threes, per_shard=16, size=32)
    one_class = tmp_path / "threes.zarr"
    assert (
        run_main(capsys, "extract", *shards, "--out", one_class, *TINY_VIT, "--layers", "1,-1", *FAST).returncode == 0
    )
    monkeypatch.setattr(evaluate, "_pass", lambda *a, **k: pytest.fail("the eval pass ran before the refusal"))
    result = run_main(capsys, "eval", eval_cache, "--student", tiny_student, "--train-cache", one_class)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "one class (label 3)" in result.stderr, result.stderr


def test_default_eval_folder_is_one_per_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``data/a/val.zarr`` and ``data/b/val.zarr`` overwrote each other's report in ``RUN/eval-val``; one cache
    spelt two ways still gets one folder."""
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(tmp_path)
    a, b = eval_folder(str(run), "data/a/val.zarr"), eval_folder(str(run), "data/b/val.zarr")
    assert a != b and Path(a).parent == Path(b).parent == run
    assert Path(a).name.startswith("eval-val-")
    assert eval_folder(str(run), str(tmp_path / "data/a/val.zarr") + "/") == a


def test_extract_summary_weighs_relative_mse_by_samples_as_info_does(tmp_path: Path) -> None:
    """Shards of 40 and 8 samples: the summary averaged their relative MSE unweighted while ``info`` weighs by
    samples; one number, one way."""
    shards = write_digit_shards(tmp_path / "shards", count=48, per_shard=40, size=32)
    cache = tmp_path / "int8.zarr"
    summary = extract(
        shards, str(cache), "vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_KWARGS, layers=(1, -1),
        dtype="int8", batch_size=16, chunk_samples=8, shard_samples=16, loader_workers=0,
    )  # fmt: skip
    recorded = describe(FeatureCache.open(str(cache)))["fidelity"]["levels"]
    per_shard = [r.fidelity["2"]["relative_mse"] for r in summary.results]
    assert per_shard[0] != pytest.approx(per_shard[1])  # else weighting could not show
    for layer, stats in summary.fidelity.items():
        assert stats["relative_mse"] == pytest.approx(recorded[layer]["relative_mse"], rel=1e-9)
        assert stats["cosine_min"] == recorded[layer]["cosine_min"]


@pytest.mark.parametrize("inputs", [1, 2, 3, 8, 9, 20])
def test_bases_are_fitted_on_256_images_of_up_to_8_inputs_spread_evenly(inputs: int) -> None:
    """FORMAT.md's fit: 256 images in equal parts from up to 8 inputs spread over the list. The code took
    ceil(256/m) from each (258 with 3 inputs) and every ceil(n/8)-th input (5 of 9)."""
    shards = [ShardSource(f"s{i:02d}", f"/data/s{i:02d}.tar") for i in range(inputs)]
    plan = basis_inputs(shards)
    chosen = [shard.name for shard, _ in plan]
    assert len(chosen) == min(8, inputs) == len(set(chosen)) and chosen[0] == "s00"
    assert sum(count for _, count in plan) == 256 and max(c for _, c in plan) - min(c for _, c in plan) <= 1
    gaps = np.diff([int(name[1:]) for name in chosen] + [inputs])  # evenly spread: every gap n // m or one more
    assert set(gaps.tolist()) <= {inputs // len(chosen), -(-inputs // len(chosen))}


def _compressor_names(codecs: list[dict]) -> list[str]:
    """The compressors among an array's codecs (inside a zarr shard's codecs too), by name and level."""
    names = []
    for codec in codecs:
        config = codec.get("configuration", {})
        if codec["name"] == "sharding_indexed":
            names += _compressor_names(config["codecs"])
        elif codec["name"] not in ("bytes", "vlen-utf8", "vlen-bytes", "crc32c", "transpose"):
            names.append(f"{codec['name']}-{config.get('level', config.get('clevel'))}")
    return names


FIXED_CODEC_ARRAYS = ("keys", "moments/", "bases/", "teacher_head/")  # FORMAT.md: zstd level 0 whatever --codec


def test_format_md_names_every_arrays_codec(tmp_path: Path, digit_shards: list[str], capsys) -> None:
    """FORMAT.md said ``--codec`` applies to every array (``none``: no compressor anywhere) while keys, moments,
    bases and head arrays get zstd level 0 whatever the codec: the text now says so, and the code names it."""
    cache = tmp_path / "none.zarr"
    args = [*digit_shards[:1], "--out", cache, *TINY_VIT, "--layers", "1,-1", *FAST, "--codec", "none", "--rank", "8"]
    assert run_main(capsys, "extract", *args).returncode == 0
    seen = set()
    for meta in cache.rglob("zarr.json"):
        node = json.loads(meta.read_text())
        if node["node_type"] != "array":
            continue
        path = meta.parent.relative_to(cache).as_posix()
        fixed = next((f for f in FIXED_CODEC_ARRAYS if f"/{f}" in f"/{path}"), None)
        seen.add(fixed)
        assert _compressor_names(node["codecs"]) == (["zstd-0"] if fixed else []), path
    assert seen == {None, *FIXED_CODEC_ARRAYS}
    format_md = (Path(__file__).parents[1] / "storage" / "FORMAT.md").read_text()
    codec_row = next(line for line in format_md.splitlines() if line.startswith("| `spec.codec`"))
    assert "zstd level 0" in codec_row and "(level 3, every array)" not in codec_row
    for name in FIXED_CODEC_ARRAYS:
        assert f"`{name}" in codec_row, name


def _holder(folder: Path, command: str) -> subprocess.Popen:
    """Another process holding ``command``'s writer lock on ``folder`` until its stdin closes."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from apmpipe.storage.locks import writer_lock\nwith writer_lock({str(folder)!r}, {command!r}):\n"
            " print('held', flush=True)\n input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_train_into_one_run_folder_is_refused_until_its_holder_dies(
    tiny_cache: Path, tmp_path: Path, capsys
) -> None:
    """Two trains into one --out interleaved checkpoints and metrics: the second is refused in one line naming
    the first's pid; once that one is killed (-9) the folder is free again."""
    run = tmp_path / "run"
    holder = _holder(run, "train")
    args = ["train", tiny_cache, "--out", run, *TRAIN_FAST, "--max-steps", "2"]
    refused = run_main(capsys, *args)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"being written by another apmpipe train (pid {holder.pid})" in refused.stderr
    assert not (run / "metrics.jsonl").exists()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert run_main(capsys, *args).returncode == 0


def _lock_object(fs, run: str, host: str, pid: int, age: float) -> str:
    key = f"{run}/{lock_name('train')}"
    fs.pipe_file(key, json.dumps({"host": host, "pid": pid, "token": "t", "renewed": time.time() - age}).encode())
    return key


def test_train_lock_on_an_object_store_names_a_live_holder_and_clears_dead_ones(tiny_cache: Path, capsys) -> None:
    """On an object store the lock is an object renewed by its holder: a live one (renewed within the lease) is
    named in the refusal; one of a dead process on this host, or not renewed for a lease, is taken over."""
    fs = fsspec.filesystem("memory")
    run = "memory://faults2/run"
    args = ["train", tiny_cache, "--out", run, *TRAIN_FAST, "--max-steps", "2"]
    _lock_object(fs, run, "gpu-node-7", 4242, age=1.0)
    refused = run_main(capsys, *args)
    assert refused.returncode == 2 and "another apmpipe train (pid 4242 on gpu-node-7)" in refused.stderr
    assert not fs.exists(f"{run}/metrics.jsonl")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    key = _lock_object(fs, run, socket.gethostname(), dead.pid, age=1.0)  # killed here: its pid is gone
    assert run_main(capsys, *args).returncode == 0
    assert not fs.exists(key), "the finished run left its lock behind"
    _lock_object(fs, run, "gpu-node-7", 4242, age=LEASE_SECONDS + 1)  # killed elsewhere: not renewed for a lease
    assert run_main(capsys, *args, "--resume").returncode == 0


def test_dask_workers_with_and_without_a_gpu_write_one_precision(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --device auto, a GPU worker autocast to bfloat16 while a CPU worker computed float32, and each task
    checked only the shards complete when it started: one run wrote both. The driver now decides one precision.
    Simulated in one process: worker 0 "has a GPU" (its teacher autocasts as asked; bfloat16 on this CPU)."""
    from distributed import Client, LocalCluster, get_worker

    def simulated_gpu(dask_worker) -> bool:  # type: ignore[no-untyped-def]
        return dask_worker.name == 0

    def get(self, config, layers, final_norm, device, amp):  # type: ignore[no-untyped-def]
        teacher = pool_get(self, config, layers, final_norm, device, amp)
        with contextlib.suppress(ValueError):  # ValueError: not on a worker (the driver's own teacher)
            teacher.amp = amp and get_worker().name == 0
        return teacher

    pool_get = TeacherPool.get
    monkeypatch.setattr(TeacherPool, "get", get)
    monkeypatch.setattr(cluster, "worker_has_cuda", simulated_gpu)
    shards = write_digit_shards(tmp_path / "shards", count=48, per_shard=8, size=32)
    weights = tmp_path / "teacher.safetensors"  # random init draws from torch's process-wide RNG, which the
    save_file(timm.create_model("vit_tiny_patch16_224", **TINY_KWARGS).state_dict(), weights)  # other thread uses
    out = tmp_path / "mixed.zarr"
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as local,
        Client(local),
    ):
        args = [*shards, "--out", out, *TINY_VIT, "--checkpoint", weights, "--layers", "1,-1", *FAST]
        args += ["--scheduler", local.scheduler_address]
        result = run_main(capsys, "extract", *args)
    assert result.returncode == 0, result.stderr
    cache = FeatureCache.open(str(out))
    assert len(cache.complete_shards()) == 6
    assert {attrs["precision"] for attrs in cache.shard_attrs().values()} == {"float32"}


def test_another_writers_zarr_temporary_is_listed_without_a_warning(
    tmp_path: Path, tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing that meets another writer's temporary (zarr's LocalStore writes NAME.<32 hex>.partial, then renames
    it) says nothing: it once printed zarr's "not recognized as a component" warning beside a dask run."""
    import shutil
    import warnings

    from apmpipe.storage import cache as cache_module

    copy = tmp_path / "c.zarr"
    shutil.copytree(tiny_cache, copy)
    (copy / "shards" / f"zarr.{'0' * 32}.partial").write_bytes(b"{")
    for quiet in (False, True):
        if not quiet:  # the listing without the filter: the warning this test is about
            monkeypatch.setattr(cache_module, "quiet_zarr_temporaries", lambda: None)
        else:
            monkeypatch.undo()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert len(FeatureCache.open(str(copy)).shard_attrs()) == 3
        said = [w for w in caught if "not recognized as a component" in str(w.message)]
        assert bool(said) != quiet, said


def test_a_task_refuses_a_precision_its_worker_cannot_compute(tiny_cache: Path, digit_shards: list[str]) -> None:
    """A CPU worker handed a run decided in bfloat16 autocast (every worker had a GPU when it started) refuses in
    one line rather than write float32 shards beside them."""
    config = ExtractConfig.from_options(
        digit_shards[:1], str(tiny_cache), "vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY_KWARGS,
        layers=(1, -1), dtype="float32", chunk_samples=8, shard_samples=16, precision="bfloat16-autocast",
    )  # fmt: skip
    with pytest.raises(CacheError, match="this worker computes in float32 .* in bfloat16-autocast; give every worker"):
        extract_shards(config, resolve_config_inputs(config).shards)


def test_embed_tokens_are_written_batch_by_batch(
    tiny_student: Path, digit_shards: list[str], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--tokens held a whole part (N x T x D per level) until it was written: each batch's grids now go to the
    part's temporary file as they come, and the finished file is an ordinary .npy of every row."""
    out = tmp_path / "emb"
    on_disk: list[int] = []  # bytes of token grids in temporary files as each batch starts
    embed_batch = embed_stage._Embedder.__call__

    def spying(self, pixels):  # type: ignore[no-untyped-def]
        on_disk.append(sum(p.stat().st_size for p in out.glob("tokens_layer*/.*.tmp")))
        return embed_batch(self, pixels)

    monkeypatch.setattr(embed_stage._Embedder, "__call__", spying)
    args = [digit_shards[0], "--student", tiny_student, "--out", out, "--tokens", "--batch-size", "8"]
    assert run_main(capsys, "embed", *args, "--loader-workers", "0", "--dtype", "float32").returncode == 0
    assert len(on_disk) >= 5 and all(b > a for a, b in itertools.pairwise(on_disk)), on_disk  # 40 samples, 8 a batch
    tokens = {layer: np.load(out / f"tokens_layer{layer}/digits-0000.npy") for layer in (1, 2)}
    assert {t.shape for t in tokens.values()} == {(40, 5, 192)} and all(t.dtype == np.float32 for t in tokens.values())
    assert not list(out.glob("*/.*.tmp"))
