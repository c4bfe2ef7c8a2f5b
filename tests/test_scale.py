"""Scaling out: caches and inputs on an S3-compatible server, dask workers killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr

from .conftest import FAST, TINY_VIT, TRAIN_FAST, kill_midway, run_cli, run_subprocess
from .test_extract import shard_arrays


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> str:
    """A real S3-compatible HTTP server (moto's server mode) on 127.0.0.1 for this module."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_extract_train_eval_against_s3(
    tmp_path: Path, s3_endpoint: str, digit_shards: list[str], tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    monkeypatch.chdir(tmp_path)

    fs = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("apm-bucket")
    for shard in digit_shards:
        fs.put(shard, f"apm-bucket/shards/{Path(shard).name}")
    opts = [
        "--storage-option",
        f"endpoint_url={s3_endpoint}",
        "--storage-option",
        "key=test",
        "--storage-option",
        "secret=test",
    ]
    cache = "s3://apm-bucket/cache.zarr"
    result = run_cli(
        "extract",
        "s3://apm-bucket/shards/digits-{0000..0002}.tar",
        "--out",
        cache,
        *TINY_VIT,
        "--layers",
        "1,-1",
        "--dtype",
        "float32",
        *FAST,
        *opts,
    )
    assert result.exit_code == 0, result.output
    assert "3 done" in result.output
    # the object-store cache holds the same arrays as the local one, readable by plain zarr over S3
    root = zarr.open_group(
        cache,
        mode="r",
        storage_options={"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": s3_endpoint}},
    )
    local = shard_arrays(tiny_cache)
    for name, group in root["shards"].groups():
        np.testing.assert_array_equal(group["tokens/2"][...], local[f"{name}/tokens/2"])
    info = run_cli("info", cache, "--json", *opts)
    assert info.exit_code == 0 and json.loads(info.output)["samples"] == 120
    run = "s3://apm-bucket/run"  # the run directory on the store too
    result = run_cli(
        "train",
        cache,
        "--out",
        run,
        "--preset",
        "tiny",
        "--batch-size",
        "8",
        "--window-samples",
        "32",
        "--loader-workers",
        "1",
        "--max-steps",
        "6",
        *opts,
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "s3:").exists(), "a local ./s3: folder was created"
    assert {"config.toml", "metrics.jsonl", "loss.png", "student.safetensors", "checkpoints"} <= {
        p.rsplit("/", 1)[-1] for p in fs.ls("apm-bucket/run", refresh=True)
    }
    result = run_cli("eval", cache, "--student", run, "--max-samples", "16", *opts)
    assert result.exit_code == 0, result.output
    (report,) = fs.glob("apm-bucket/run/eval-cache-*/eval.json")  # RUN/eval-<cache>-<hash of its URL>
    assert json.loads(fs.cat_file(report))["samples"] == 16
    assert fs.cat_file(report.replace("eval.json", "fidelity.png"))[:4] == b"\x89PNG"
    result = run_cli(
        "islands", cache, "--student", run, "--out", tmp_path / "islands.png", "--images", "2", "--panel", "32", *opts
    )
    assert result.exit_code == 0 and "student beside teacher" in result.output, result.output


def _s3_options(endpoint: str) -> list[str]:
    return [f"--storage-option={pair}" for pair in (f"endpoint_url={endpoint}", "key=test", "secret=test")]


def test_run_on_s3_resumes_after_sigkill_like_an_uninterrupted_local_run(
    tmp_path: Path, s3_endpoint: str, tiny_cache: Path
) -> None:
    import s3fs

    from apmpipe.storage.checkpoint import load_student

    fs = s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("apm-runs")
    args = [
        "train",
        tiny_cache,
        *TRAIN_FAST,
        *("--max-steps", "40", "--checkpoint-every", "4", "--warmup-steps", "3", "--locations", "3"),
    ]
    reference = tmp_path / "ref"
    assert run_subprocess(*args, "--out", reference).returncode == 0
    remote = "s3://apm-runs/run"
    kill_midway(
        [*args, "--out", remote, *_s3_options(s3_endpoint)],
        lambda: fs.invalidate_cache() or fs.exists("apm-runs/run/checkpoints/latest"),
    )
    assert not fs.exists("apm-runs/run/student.safetensors"), "the kill came too late to test anything"
    latest = fs.cat_file("apm-runs/run/checkpoints/latest").decode()
    # a save killed midway: objects of a newer checkpoint that latest never named, one of them half written
    partial = "apm-runs/run/checkpoints/step-00000036-0badc0de"
    fs.pipe_file(f"{partial}/model.safetensors", b"\x00" * 100)
    result = run_subprocess(*args, "--out", remote, *_s3_options(s3_endpoint), "--resume")
    assert result.returncode == 0, result.stderr
    assert f"resuming from step {int(latest[5:13])} of 40" in result.stderr
    fs.invalidate_cache()
    assert not fs.exists(partial), "the unpublished checkpoint was left on the store"
    ref, _ = load_student(reference)
    got, meta = load_student(remote, {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": s3_endpoint}})
    assert meta["step"] == 40
    for key in ref:
        assert ref[key].equal(got[key]), key
    steps = [json.loads(line)["step"] for line in fs.cat_file("apm-runs/run/metrics.jsonl").decode().splitlines()]
    assert steps == list(range(2, 41, 2))


def test_object_store_checkpoint_is_published_by_latest_and_a_killed_save_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from apmpipe.storage.checkpoint import RunDir

    url = f"memory://runs/{uuid.uuid4().hex}"
    run = RunDir(url)
    run.save_checkpoint(4, {"w": torch.ones(3)}, {"step": 4})
    published = run.fs.cat_file(f"{run.checkpoints}/latest").decode()
    real_pipe_file = run.fs.pipe_file

    def dies_on_latest(path: str, data: bytes, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if path.endswith("/latest"):
            raise KeyboardInterrupt("killed")
        real_pipe_file(path, data, **kwargs)

    monkeypatch.setattr(run.fs, "pipe_file", dies_on_latest)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(8, {"w": torch.full((3,), 2.0)}, {"step": 8})  # every object written, latest not
    monkeypatch.undo()
    run.fs.pipe_file(f"{run.checkpoints}/step-00000012-0badc0de/model.safetensors", b"partial")
    resumed = RunDir(url)
    weights, state = resumed.load_checkpoint()
    assert state == {"step": 4} and weights["w"].tolist() == [1.0, 1.0, 1.0]
    resumed.remove_stale_temporaries()
    assert sorted(p.rsplit("/", 1)[-1] for p in run.fs.ls(run.checkpoints, detail=False)) == ["latest", published]
    resumed.save_checkpoint(8, {"w": torch.full((3,), 3.0)}, {"step": 8})
    assert RunDir(url).load_checkpoint()[1] == {"step": 8}


def test_killed_dask_worker_is_retried_with_identical_result(
    tmp_path: Path, digit_shards: list[str], tiny_cache: Path
) -> None:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        pids = client.run(os.getpid)  # worker address -> pid
        out = tmp_path / "dask.zarr"
        killed: list[int] = []

        def kill_when_writing() -> None:
            deadline = time.time() + 120
            while time.time() < deadline and not killed:
                for status in out.glob("shards/*/zarr.json"):
                    if json.loads(status.read_text())["attributes"].get("status") == "writing":
                        busy = [addr for addr, keys in client.processing().items() if keys]
                        if busy:  # kill a worker that is extracting a shard right now
                            os.kill(pids[busy[0]], signal.SIGKILL)
                            killed.append(pids[busy[0]])
                            return
                time.sleep(0.005)

        killer = threading.Thread(target=kill_when_writing)
        killer.start()
        result = run_cli(
            "extract",
            *digit_shards,
            "--out",
            out,
            *TINY_VIT,
            "--layers",
            "1,-1",
            "--dtype",
            "float32",
            *FAST,
            "--scheduler",
            cluster.scheduler_address,
        )
        killer.join()
    assert killed, "no worker was killed"
    assert result.exit_code == 0, result.output
    ref, got = shard_arrays(tiny_cache), shard_arrays(out)
    assert ref.keys() == got.keys()
    for key in ref:
        np.testing.assert_array_equal(ref[key], got[key], err_msg=key)
