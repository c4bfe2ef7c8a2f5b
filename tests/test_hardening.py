"""Issue 10: each hardening fix with the test that failed before it (shard identity, inputs, labels, images,
locks, partial failures, cache validation, precision, dask keys, checkpoints, secrets, info, bench)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from apmpipe.pipeline.datasets import write_digit_shards
from apmpipe.storage.sources import decode_image, iter_samples, resolve_inputs

from .conftest import FAST, TINY_VIT, kill_midway, run_cli, run_main, run_subprocess
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
    bad = _tar(
        tmp_path / "bad.tar",
        {"a.png": image, "a.cls": b"3", "b.png": image, "b.cls": b"cat", "c.png": image, "c.cls": b"1"},
    )
    out = tmp_path / "c.zarr"
    result = run_main(capsys, "extract", bad, "--out", out, *TINY_VIT, *FAST)
    assert result.returncode == 0, result.stderr
    assert "skipped bad/b: label 'cls' is 'cat', not an integer" in result.stderr
    group = zarr.open_group(str(out), mode="r")["shards/bad"]
    assert (
        group.attrs["status"] == "complete"
        and list(group["keys"][...]) == ["a", "c"]
        and group["labels"][...].tolist() == [3, 1]
    )

    meta = lambda label: json.dumps({"meta": {"label": label}}).encode()  # noqa: E731
    named = _tar(
        tmp_path / "named.tar",
        {
            "a.png": image,
            "a.json": meta("dog"),
            "b.png": image,
            "b.json": meta("cat"),
            "c.png": image,
            "c.json": meta("cow"),
        },
    )
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    samples = list(
        iter_samples(resolve_inputs([named]).shards[0], label_key="json:meta.label", class_names=("cat", "dog"))
    )
    assert [(s.label, s.problem) for s in samples[:2]] == [(1, None), (0, None)] and "not in --class-names" in samples[
        2
    ].problem
    out2 = tmp_path / "n.zarr"
    result = run_main(
        capsys,
        "extract",
        named,
        "--out",
        out2,
        *TINY_VIT,
        *FAST,
        "--label-key",
        "json:meta.label",
        "--class-names",
        tmp_path / "classes.txt",
    )
    assert result.returncode == 0, result.stderr
    root = zarr.open_group(str(out2), mode="r")
    assert root["shards/named/labels"][...].tolist() == [1, 0] and root.attrs["apmpipe"]["classes"] == ["cat", "dog"]


# -- 10: large images ----------------------------------------------------------------------------------------
def test_pixel_cap_skips_large_images_and_16_bit_needs_no_float64_copy(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
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


# -- 3: any timm head ----------------------------------------------------------------------------------------
HEADS = [
    ("test_efficientnet", {}, ["conv2d", "batchnorm", "act", "pool", "linear"]),  # conv_head + bn2 before pooling
    ("mobilenetv3_small_050", {}, ["pool", "conv2d", "act", "flatten", "linear"]),  # conv_head after pooling
    ("test_convnext", {}, ["pool", "layernorm", "flatten", "linear"]),  # head norm
    ("test_resnet", {}, ["pool", "linear"]),
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, ["layernorm", "pool_tokens", "linear"]),  # CLS
    (
        "vit_tiny_patch16_224",
        {"img_size": 32, "depth": 2, "global_pool": "avg", "fc_norm": True},
        ["pool_tokens", "layernorm", "linear"],
    ),
    (
        "vit_small_patch14_reg4_dinov2",
        {"img_size": 28, "depth": 2, "embed_dim": 48, "num_heads": 2},
        ["layernorm", "pool_tokens", "linear"],
    ),
    (
        "vit_base_patch16_clip_224.openai",
        {"img_size": 32, "depth": 2, "embed_dim": 48, "num_heads": 2},
        ["layernorm", "pool_tokens", "linear"],
    ),
]


@pytest.mark.parametrize("name, kwargs, ops", HEADS, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k, _ in HEADS])
def test_heads_of_timm_families_are_rebuilt_exactly(name: str, kwargs: dict, ops: list[str]) -> None:
    from apmpipe.stages.head import TeacherHead
    from apmpipe.stages.teacher import Teacher, TeacherConfig

    teacher = Teacher(
        TeacherConfig(name, pretrained=False, model_kwargs=tuple(sorted({**kwargs, "num_classes": 7}.items()))),
        (-1,),
        device="cpu",
    )
    head, reason = teacher.head()
    assert head is not None, reason
    assert [op["type"] for op in head.ops] == ops
    rebuilt = TeacherHead(head.tensors(), json.loads(json.dumps(head.attrs)))  # as read back from the cache
    pixels = torch.randint(
        0, 256, (3, *teacher.pixel_shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    tokens, logits = teacher.forward(pixels)
    torch.testing.assert_close(rebuilt(tokens[-1]), logits, atol=1e-4, rtol=1e-4)


def test_an_unsupported_head_is_a_stored_reason_and_logits_are_still_cached(
    tmp_path: Path, digit_shards: list[str]
) -> None:
    out = tmp_path / "map.zarr"
    vit_map = [*TINY_VIT, "--model-arg", "global_pool=map"]
    result = run_cli("extract", digit_shards[0], "--out", out, *vit_map, *FAST)
    assert result.exit_code == 0, result.output
    root = zarr.open_group(str(out), mode="r")
    assert "attention pooling" in root.attrs["apmpipe"]["head"]["reason"]
    assert root["shards/digits-0000/logits"].shape == (40, 10)
    out = tmp_path / "effnet.zarr"
    result = run_cli(
        "extract",
        digit_shards[0],
        "--out",
        out,
        "--teacher",
        "test_efficientnet",
        "--no-pretrained",
        "--model-arg",
        "num_classes=10",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert "stored (avg pooling, 10 classes)" in result.output


# -- 4: per-shard storage failures ---------------------------------------------------------------------------
def test_a_shard_whose_storage_fails_fails_alone(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from apmpipe.storage.writer import ShardWriter

    shards = write_digit_shards(tmp_path / "in", count=60, per_shard=20)
    real_init, real_finish = ShardWriter.__init__, ShardWriter.finish

    def init(self, cache, name, *args):  # type: ignore[no-untyped-def]
        if name == "digits-0001":
            raise OSError("503 Slow Down while creating the group")
        real_init(self, cache, name, *args)

    def finish(self, *args):  # type: ignore[no-untyped-def]
        if self.name == "digits-0002":
            raise OSError("500 Internal Error while writing attributes")
        return real_finish(self, *args)

    def fail(self, *args):  # type: ignore[no-untyped-def]
        raise OSError("the store is down")

    monkeypatch.setattr(ShardWriter, "__init__", init)
    monkeypatch.setattr(ShardWriter, "finish", finish)
    monkeypatch.setattr(ShardWriter, "fail", fail)
    result = run_main(capsys, "extract", *shards, "--out", tmp_path / "c.zarr", *TINY_VIT, *FAST)
    assert result.returncode == 1, result.stderr
    assert (
        "failed shard digits-0001: OSError: 503 Slow Down" in result.stderr
        and "failed shard digits-0002: OSError: 500" in result.stderr
    )
    assert "1 done" in result.stdout and "2 failed" in result.stdout
    assert _group_attrs(tmp_path / "c.zarr")["digits-0000"]["status"] == "complete"


# -- 6: precision --------------------------------------------------------------------------------------------
def _copy(cache: Path, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / cache.name
    shutil.copytree(cache, out)
    return out


def _set_shard_attr(cache: Path, shard: str, **values: object) -> None:
    path = cache / "shards" / shard / "zarr.json"
    meta = json.loads(path.read_text())
    meta["attributes"].update(values)
    path.write_text(json.dumps(meta))


def test_mixed_precision_and_token_dtypes_are_refused(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path, digit_shards: list[str]
) -> None:
    from apmpipe.storage.errors import CacheError
    from apmpipe.storage.stream import open_caches

    half = tmp_path / "half.zarr"
    assert run_cli("extract", digit_shards[0], "--out", half, *TINY_VIT, "--layers", "1,-1", *FAST).exit_code == 0
    with pytest.raises(CacheError, match="token dtype"):
        open_caches([str(tiny_cache), str(half)])
    mixed = _copy(tiny_cache, tmp_path)
    _set_shard_attr(mixed, "digits-0001", precision="bfloat16-autocast")
    with pytest.raises(CacheError, match="mixes shards computed in bfloat16-autocast .* float32"):
        open_caches([str(mixed)])
    assert json.loads(run_cli("info", mixed, "--json").output)["precision"] == ["bfloat16-autocast", "float32"]
    # a run in another precision does not add shards to a cache
    for name in ("digits-0000", "digits-0001", "digits-0002"):
        _set_shard_attr(mixed, name, precision="bfloat16-autocast")
    more = write_digit_shards(tmp_path / "more", prefix="more", count=20, per_shard=20)
    result = run_main(
        capsys, "extract", *more, "--out", mixed, *TINY_VIT, "--layers", "1,-1", "--dtype", "float32", *FAST
    )
    assert (
        result.returncode == 2
        and "holds shards computed in bfloat16-autocast, this run computes in float32" in result.stderr
    )


def test_verify_recomputes_in_the_shards_precision(tmp_path: Path, tiny_cache: Path) -> None:
    from apmpipe.stages.verify import verify_cache

    assert verify_cache(str(tiny_cache), samples=2, device="cpu").precision == "float32"
    cache = _copy(tiny_cache, tmp_path)
    for name in ("digits-0000", "digits-0001", "digits-0002"):
        _set_shard_attr(cache, name, precision="bfloat16-autocast")
    report = verify_cache(str(cache), samples=2, device="cpu")
    assert (
        report.precision == "bfloat16-autocast" and report.levels["2"]["max_abs"] > 1e-4
    )  # bf16 numbers, not the float32 ones


# -- 7: dask -------------------------------------------------------------------------------------------------
def test_two_caches_on_one_scheduler_do_not_share_tasks(tmp_path: Path) -> None:
    from distributed import LocalCluster

    from apmpipe.pipeline.cluster import dask_runner
    from apmpipe.stages.extract import ExtractConfig, extract
    from apmpipe.stages.teacher import TeacherConfig

    teacher = TeacherConfig(
        "vit_tiny_patch16_224", pretrained=False, model_kwargs=(("depth", 2), ("img_size", 32), ("num_classes", 10))
    )
    a = write_digit_shards(tmp_path / "a", count=16, per_shard=16)
    b = write_digit_shards(tmp_path / "b", count=16, start=100, per_shard=16)
    outs = [tmp_path / "a.zarr", tmp_path / "b.zarr"]
    errors: list[BaseException] = []

    def run(config: ExtractConfig) -> None:
        try:
            extract(config, runner=runner, driver_device="cpu")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        runner = dask_runner(scheduler=cluster.scheduler_address)
        configs = [
            ExtractConfig(
                inputs=tuple(src),
                out=str(out),
                teacher=teacher,
                batch_size=16,
                chunk_samples=8,
                shard_samples=16,
                loader_workers=0,
                device="cpu",
            )
            for src, out in zip((a, b), outs, strict=True)
        ]
        threads = [threading.Thread(target=run, args=(config,)) for config in configs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
    assert not errors, errors
    keys = [zarr.open_group(str(out), mode="r")["shards/digits-0000/keys"][...].tolist() for out in outs]
    assert keys[0][0] == "00000" and keys[1][0] == "00100"


def test_threads_building_one_teacher_get_one_teacher() -> None:
    from apmpipe.stages.teacher import TeacherConfig, TeacherPool

    config = TeacherConfig(
        "vit_tiny_patch16_224", pretrained=False, model_kwargs=(("depth", 1), ("img_size", 32)), seed=123
    )
    built: list = []
    pool = TeacherPool()
    threads = [
        threading.Thread(target=lambda: built.append(pool.get(config, (-1,), False, "cpu", False))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(t) for t in built}) == 1 and len({t.weights_sha256 for t in built}) == 1


def test_the_driver_does_not_build_the_teacher_on_the_workers_device(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, digit_shards: list[str]
) -> None:
    import apmpipe.pipeline.cluster

    seen = []
    monkeypatch.setattr(
        apmpipe.pipeline.cluster,
        "dask_runner",
        lambda *args: lambda config, shards, progress: seen.append(config.device) or [],
    )
    result = run_main(
        capsys,
        "extract",
        digit_shards[0],
        "--out",
        tmp_path / "c.zarr",
        *TINY_VIT,
        *FAST,
        "--workers",
        "1",
        "--device",
        "cuda",
    )
    assert result.returncode == 0, result.stderr  # no CUDA here: only the workers would need it
    assert seen == ["cuda"]


# -- 8: malformed caches -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda spec: spec["levels"][0].update(grid="2x2"), "spec.levels[0]"),
        (lambda spec: spec.pop("data_config"), "spec.data_config is missing"),
        (lambda spec: spec.update(num_classes="ten"), "spec.num_classes"),
        (lambda spec: spec.update(dtype="bfloat16"), "spec.dtype"),
    ],
)
def test_malformed_cache_attributes_are_one_line(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path, damage, message: str
) -> None:
    cache = _copy(tiny_cache, tmp_path)
    meta = json.loads((cache / "zarr.json").read_text())
    damage(meta["attributes"]["apmpipe"]["spec"])
    (cache / "zarr.json").write_text(json.dumps(meta))
    result = run_main(capsys, "info", cache)
    assert (
        result.returncode == 2
        and result.stderr.count("\n") == 1
        and "malformed attributes" in result.stderr
        and message in result.stderr
    ), result.stderr


def test_sample_counts_are_checked_and_unknown_head_ops_raise(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path
) -> None:
    from apmpipe.stages.head import TeacherHead
    from apmpipe.storage.cache import FeatureCache
    from apmpipe.storage.errors import CacheError

    cache = _copy(tiny_cache, tmp_path)
    _set_shard_attr(cache, "digits-0001", num_samples=41)
    result = run_main(capsys, "verify", cache, "--samples", "120", "--device", "cpu")
    assert (
        result.returncode == 2
        and "shard 'digits-0001'" in result.stderr
        and "records 41 samples but holds 40 samples in array 'pixels'" in result.stderr
    )
    tensors, attrs = FeatureCache.open(str(tiny_cache)).head()
    pool = next(i for i, op in enumerate(attrs["ops"]) if op["type"] == "pool_tokens")
    attrs["ops"][pool]["pool"] = "gem"
    with pytest.raises(CacheError, match="unknown pool 'gem'"):
        TeacherHead(tensors, attrs)


# -- 9: kill -9 ----------------------------------------------------------------------------------------------
def test_rerun_right_after_kill_9_with_loader_workers_is_bit_identical(tmp_path: Path) -> None:
    shards = write_digit_shards(tmp_path / "in", count=120, per_shard=20, size=32)
    args = [
        *shards,
        *TINY_VIT,
        "--layers",
        "1,-1",
        "--batch-size",
        "10",
        "--chunk-samples",
        "10",
        "--shard-samples",
        "20",
        "--loader-workers",
        "1",
    ]
    reference = tmp_path / "ref.zarr"
    assert run_subprocess("extract", *args, "--out", reference).returncode == 0
    killed = tmp_path / "killed.zarr"
    kill_midway(["extract", *args, "--out", killed], killed / "shards/digits-0001/tokens/2")
    result = run_subprocess("extract", *args, "--out", killed)  # at once, as a scheduler's retry would
    assert result.returncode == 0, result.stderr
    ref, got = shard_arrays(reference), shard_arrays(killed)
    assert ref.keys() == got.keys()
    for key in ref:
        np.testing.assert_array_equal(ref[key], got[key], err_msg=key)


def test_lock_message_names_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from apmpipe.storage.locks import writer_lock\nwith "
            f"writer_lock({str(tmp_path / 'c.zarr')!r}):\n print('held', flush=True)\n input()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    from apmpipe.storage.errors import CacheError
    from apmpipe.storage.locks import writer_lock

    with pytest.raises(CacheError, match=f"another apmpipe extract \\(pid {holder.pid}\\)"):
        with writer_lock(str(tmp_path / "c.zarr")):
            pass
    holder.communicate("\n")


def test_a_finished_cache_holds_zarr_files_alone(tiny_cache: Path) -> None:
    """extract deletes its lock file when it ends: zarr-python lists the cache's root without a warning."""
    import warnings

    assert not any(p.name.endswith(".lock") for p in tiny_cache.iterdir())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {name for name, _ in zarr.open_group(tiny_cache, mode="r").members()} >= {"shards"}


def test_a_lock_file_deleted_between_open_and_lock_is_opened_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder that finishes between a taker's open and its lockf deletes the file the taker opened: the taker
    must lock the file now at the path (else two runs could each hold a lock), and delete it when done."""
    from apmpipe.storage import locks

    opened: list[str] = []
    real_open = os.open

    def open_then_lose_it(path: str, *args: int) -> int:
        fd = real_open(path, *args)
        if not opened:
            os.unlink(path)  # the previous holder's release, between our open and our lock
        opened.append(path)
        return fd

    monkeypatch.setattr(locks.os, "open", open_then_lose_it)
    folder = tmp_path / "c.zarr"
    with locks.writer_lock(str(folder)):
        lock = folder / locks.lock_name("extract")
        assert len(opened) == 2 and lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()


# -- 16, 17: info reads little and shows no secrets ----------------------------------------------------------
def test_info_opens_no_array_and_lists_no_files_without_sizes(
    monkeypatch: pytest.MonkeyPatch, tiny_cache: Path
) -> None:
    from apmpipe.storage import describe
    from apmpipe.storage.cache import FeatureCache

    def forbidden(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("info read array metadata or listed every file")

    monkeypatch.setattr(FeatureCache, "_arrays", forbidden)
    monkeypatch.setattr(describe, "stored_array_bytes", forbidden)
    result = run_cli("info", tiny_cache)
    assert result.exit_code == 0 and "120" in result.output and "--sizes" in result.output


def test_credentials_stay_out_of_reprs_attributes_and_info(tmp_path: Path, tiny_cache: Path) -> None:
    from apmpipe.stages.extract import ExtractConfig
    from apmpipe.stages.teacher import TeacherConfig
    from apmpipe.storage.cache import FeatureCache
    from apmpipe.storage.writer import ShardWriter, record_sources

    config = ExtractConfig(
        inputs=("s3://b/x.tar",),
        out="s3://b/c.zarr",
        teacher=TeacherConfig("vit_tiny_patch16_224"),
        storage_options={"secret": "S3CR3T"},
    )
    assert "S3CR3T" not in repr(config)
    cache = FeatureCache.open(str(_copy(tiny_cache, tmp_path)), mode="r+")
    record_sources(cache, ["s3://AKIA:S3CR3T@bucket/x.tar", "https://h/x.tar?X-Amz-Signature=S3CR3T&v=1"], [])
    writer = ShardWriter(cache, "x", "s3://AKIA:S3CR3T@bucket/x.tar", "s3://AKIA:S3CR3T@bucket/x.tar", "float32")
    assert "S3CR3T" not in json.dumps(dict(writer.group.attrs)) and "S3CR3T" not in repr(cache)
    info = run_cli("info", cache.url, "--json")
    assert (
        "S3CR3T" not in info.output and "s3://***@bucket/x.tar" in info.output and "X-Amz-Signature=***" in info.output
    )


# -- 19: xarray ----------------------------------------------------------------------------------------------
def test_xarray_opens_shard_arrays(tiny_cache: Path) -> None:
    xr = pytest.importorskip("xarray")
    shard = xr.open_zarr(str(tiny_cache), group="shards/digits-0000", consolidated=False)
    assert shard["pixels"].dims == ("sample", "channel", "y", "x") and shard.sizes["sample"] == 40
    tokens = xr.open_zarr(str(tiny_cache), group="shards/digits-0000/tokens", consolidated=False)
    assert tokens["2"].dims == ("sample", "token_2", "feature_2") and tokens["2"].shape == (40, 5, 192)


# -- 20: bench's RSS sampler ---------------------------------------------------------------------------------
def test_rss_sampler_drains_stderr_and_does_not_spin(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    from apmpipe.pipeline.bench.train import _peak_tree_rss

    noisy = [sys.executable, "-c", "import sys; sys.stderr.write('x' * 300_000); sys.stderr.flush()"]
    done: list[float] = []
    sampler = threading.Thread(target=lambda: done.append(_peak_tree_rss(noisy)), daemon=True)
    sampler.start()
    sampler.join(timeout=30)
    assert done and done[0] > 0, "the sampler hung on a child writing more than a pipe buffer to stderr"
    calls = []

    def denied(self):  # type: ignore[no-untyped-def]
        calls.append(1)
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "memory_info", denied)
    _peak_tree_rss([sys.executable, "-c", "import time; time.sleep(0.5)"])
    assert len(calls) < 50, f"{len(calls)} samples in 0.5 s: busy loop"


# -- 11: checkpoints -----------------------------------------------------------------------------------------
def test_checkpoints_are_fsynced_before_rename_and_latest_never_dangles(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from apmpipe.storage.checkpoint import RunDir

    run = RunDir(tmp_path / "run")
    weights, state = {"w": torch.ones(3)}, {"step": 5}
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1]
    )
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (events.append(("replace", f"{src} -> {dst}")), real_replace(src, dst))[1]
    )
    final = run.save_checkpoint(5, weights, state)
    rename = next(i for i, (kind, what) in enumerate(events) if kind == "replace" and what.endswith(str(final)))
    tmp = events[rename][1].split(" -> ")[0]
    synced_before = {what for kind, what in events[:rename] if kind == "fsync"}
    assert {f"{tmp}/model.safetensors", f"{tmp}/state.pt", tmp} <= synced_before
    assert ("fsync", str(run.checkpoints)) in events[rename:]

    # saving the same step again: killed between removing the old copy and renaming the new one
    def dies_on_rename(src, dst):  # type: ignore[no-untyped-def]
        if str(dst) == str(final):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_rename)
    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(5, {"w": torch.full((3,), 2.0)}, state)
    monkeypatch.setattr(os, "replace", real_replace)
    loaded, _ = RunDir(tmp_path / "run").load_checkpoint()
    assert loaded["w"].tolist() == [2.0, 2.0, 2.0]


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    from apmpipe.storage.checkpoint import RunDir

    run = RunDir(tmp_path / "run")
    run.save_checkpoint(1, {"w": torch.ones(1)}, {"step": 1})
    stale = [
        Path(run.checkpoints) / ".tmp-killed",
        Path(run.checkpoints) / ".latest.abc.tmp",
        Path(run.root) / ".student.safetensors.tmp",
    ]
    stale[0].mkdir()
    for path in stale[1:]:
        path.write_text("partial")
    run.remove_stale_temporaries()
    assert not any(path.exists() for path in stale) and run.load_checkpoint()[1] == {"step": 1}
