"""Scaling out: caches and inputs on an S3-compatible server, dask workers killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from .conftest import FAST, TINY_VIT, run_cli
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
    tmp_path: Path, s3_endpoint: str, digit_shards: list[str], tiny_cache: Path
) -> None:
    import s3fs

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
    run = tmp_path / "run"
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
    result = run_cli("eval", cache, "--student", run, "--out", tmp_path / "report", "--max-samples", "16", *opts)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "report" / "report.json").read_text())["samples"] == 16
    result = run_cli(
        "islands", cache, "--student", run, "--out", tmp_path / "islands.png", "--images", "2", "--panel", "32", *opts
    )
    assert result.exit_code == 0 and "student beside teacher" in result.output, result.output


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
