"""Issue 10: each hardening fix with the test that failed before it (shard identity, inputs, labels, images,
locks, partial failures, cache validation, precision, dask keys, checkpoints, secrets, info, bench)."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from pipeline.datasets import write_digit_shards
from storage.sources import decode_image, iter_samples, resolve_inputs

from .conftest import FAST, TINY_VIT, run_cli, run_main, run_subprocess
from .test_extract import shard_arrays


def _tar(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _group_attrs(cache: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())["attributes"] for p in cache.glob("shards/*/zarr.json")}


# -- 1, 2: shard identity and duplicate inputs ---------------------------------------------------------------
def test_shard_names_depend_on_each_input_alone(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    a = write_digit_shards(tmp_path / "a", count=20, per_shard=20)
    b = write_digit_shards(tmp_path / "b", count=20, start=500, per_shard=20)
    assert [s.name for s in resolve_inputs(a).shards] == ["digits-0000"]
    out = tmp_path / "c.zarr"
    assert run_cli("extract", *a, "--out", out, *TINY_VIT, *FAST).exit_code == 0
    # adding another input with the same stem must not store a's samples a second time under a new name
    result = run_main(capsys, "extract", *a, *b, "--out", out, *TINY_VIT, *FAST)
    assert result.returncode == 2 and "would both be shard group 'digits-0000'" in result.stderr
    assert sorted(_group_attrs(out)) == ["digits-0000"]
    # the same data reached under another name (a symlink) is recognised as already extracted
    (tmp_path / "link").mkdir()
    os.symlink(a[0], tmp_path / "link" / "alias.tar")
    result = run_main(capsys, "extract", tmp_path / "link" / "alias.tar", "--out", out, *TINY_VIT, *FAST)
    assert result.returncode == 0 and "1 already complete" in result.stdout
    assert sorted(_group_attrs(out)) == ["digits-0000"]


def test_the_same_input_twice_is_extracted_once(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    shards = write_digit_shards(tmp_path / "in", count=20, per_shard=20)
    assert len(resolve_inputs([shards[0], str(tmp_path / "in" / "*.tar"), str(tmp_path / "in")]).shards) == 1
    out = tmp_path / "c.zarr"
    result = run_main(capsys, "extract", shards[0], tmp_path / "in" / "*.tar", "--out", out, *TINY_VIT, *FAST)
    assert result.returncode == 0 and "20 written" in result.stdout
    assert _group_attrs(out)["digits-0000"]["num_samples"] == 20


# -- 5: labels -----------------------------------------------------------------------------------------------
def test_bad_label_skips_the_sample_json_paths_and_class_names(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    image = _png(Image.new("L", (16, 16), 80))
    bad = _tar(tmp_path / "bad.tar", {"a.png": image, "a.cls": b"3", "b.png": image, "b.cls": b"cat", "c.png": image, "c.cls": b"1"})
    out = tmp_path / "c.zarr"
    result = run_main(capsys, "extract", bad, "--out", out, *TINY_VIT, *FAST)
    assert result.returncode == 0, result.stderr
    assert "skipped bad/b: label 'cls' is 'cat', not an integer" in result.stderr
    group = zarr.open_group(str(out), mode="r")["shards/bad"]
    assert group.attrs["status"] == "complete" and list(group["keys"][...]) == ["a", "c"] and group["labels"][...].tolist() == [3, 1]

    meta = lambda label: json.dumps({"meta": {"label": label}}).encode()  # noqa: E731
    named = _tar(tmp_path / "named.tar", {"a.png": image, "a.json": meta("dog"), "b.png": image, "b.json": meta("cat"), "c.png": image, "c.json": meta("cow")})
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    samples = list(iter_samples(resolve_inputs([named]).shards[0], label_key="json:meta.label", class_names=("cat", "dog")))
    assert [(s.label, s.problem) for s in samples[:2]] == [(1, None), (0, None)] and "not in --class-names" in samples[2].problem
    out2 = tmp_path / "n.zarr"
    result = run_main(capsys, "extract", named, "--out", out2, *TINY_VIT, *FAST, "--label-key", "json:meta.label", "--class-names", tmp_path / "classes.txt")
    assert result.returncode == 0, result.stderr
    root = zarr.open_group(str(out2), mode="r")
    assert root["shards/named/labels"][...].tolist() == [1, 0] and root.attrs["apmpipe"]["classes"] == ["cat", "dog"]


# -- 10: large images ----------------------------------------------------------------------------------------
def test_pixel_cap_skips_large_images_and_16_bit_needs_no_float64_copy(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    big = _png(Image.new("L", (300, 200), 10))
    small = _png(Image.new("L", (16, 16), 10))
    shard = _tar(tmp_path / "big.tar", {"a.png": small, "b.png": big})
    out = tmp_path / "c.zarr"
    result = run_main(capsys, "extract", shard, "--out", out, *TINY_VIT, *FAST, "--max-pixels", "50000")
    assert result.returncode == 0, result.stderr
    assert "skipped big/b: image too large: 300x200 = 60,000 pixels, above --max-pixels 50,000" in result.stderr

    deep = np.arange(1500 * 1400, dtype=np.uint32).reshape(1500, 1400) % 65536
    data = _png(Image.fromarray(deep.astype(np.uint16)))
    tracemalloc.start()
    decoded = np.asarray(decode_image(data, 1))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    expected = np.floor(deep / 65535 * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(decoded, expected)
    assert peak < 6 * deep.size, f"peak {peak / deep.size:.1f} bytes per pixel: a float64 copy is 8"
