"""Stage one end to end through the CLI: values, inputs, resume, faults, errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import zarr
from PIL import Image
from safetensors.torch import save_file

from apmpipe.pipeline.datasets import digit_images, write_digit_shards
from apmpipe.storage.locks import writer_lock

from .conftest import FAST, TINY_VIT, kill_midway, run_cli, run_main, run_subprocess


def tiny_vit(**overrides) -> torch.nn.Module:
    kwargs = {"img_size": 32, "depth": 2, "num_classes": 10, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()


def shard_arrays(cache: Path) -> dict[str, np.ndarray]:
    """Every array of every shard group, read with plain zarr-python (no apmpipe)."""
    root = zarr.open_group(str(cache), mode="r")
    return {
        f"{name}/{path}": array[...]
        for name, group in root["shards"].groups()
        for path, array in group.members(max_depth=None)
        if isinstance(array, zarr.Array)
    }


def test_cache_equals_direct_forward_intermediates(tiny_cache: Path) -> None:
    root = zarr.open_group(str(tiny_cache), mode="r")
    spec = root.attrs["apmpipe"]["spec"]
    assert [lv["layer"] for lv in spec["levels"]] == [1, 2]
    assert spec["levels"][0]["prefix_tokens"] == 1 and spec["levels"][0]["grid"] == [2, 2]
    group = root["shards/digits-0000"]
    assert group.attrs["status"] == "complete" and group.attrs["num_samples"] == 40
    pixels = group["pixels"][...]
    assert pixels.dtype == np.uint8 and pixels.shape == (40, 3, 32, 32)
    assert group["keys"][0] == "00000"
    images, labels = digit_images(32, "RGB")
    np.testing.assert_array_equal(group["labels"][...], labels[:40])
    # the cached pixels are exactly what timm's own eval transform feeds the model
    model = tiny_vit()
    transform = timm.data.create_transform(
        **timm.data.resolve_data_config({"input_size": (3, 32, 32)}, model=model), is_training=False
    )
    normalized = (torch.from_numpy(pixels).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(normalized[3], transform(images[3]), atol=1e-6, rtol=0)
    with torch.inference_mode():
        final, inter = model.forward_intermediates(
            normalized, indices=[0, 1], return_prefix_tokens=True, output_fmt="NLC"
        )
        logits = model.forward_head(final)
    for (spatial, prefix), layer in zip(inter, ("1", "2"), strict=True):
        expected = torch.cat([prefix, spatial], dim=1).numpy()
        np.testing.assert_allclose(group[f"tokens/{layer}"][...], expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(group["logits"][...], logits.numpy(), atol=1e-5, rtol=1e-5)


def test_keys_are_zarr_v3_string_dtype(tiny_cache: Path) -> None:
    meta = json.loads((tiny_cache / "shards/digits-0000/keys/zarr.json").read_text())
    assert meta["data_type"] == "string" and meta["codecs"][0]["name"] == "vlen-utf8"
    meta = json.loads((tiny_cache / "shards/digits-0000/tokens/1/zarr.json").read_text())
    assert meta["data_type"] == "float32" and meta["codecs"][0]["name"] == "sharding_indexed"


def test_info_and_verify(tiny_cache: Path) -> None:
    result = run_cli("info", tiny_cache, "--json", "--sizes")
    assert result.exit_code == 0
    desc = json.loads(result.output)
    assert desc["samples"] == 120 and desc["shards"]["complete"] == 3 and desc["compression_ratio"] > 1.0
    assert desc["precision"] == ["float32"]
    result = run_cli("verify", tiny_cache, "--samples", "4")
    assert result.exit_code == 0, result.output
    assert "4 samples recomputed" in result.output and "min cosine 1.000000" in result.output


def test_rerun_skips_complete_shards(tiny_cache: Path, digit_shards: list[str]) -> None:
    result = run_cli(
        "extract", *digit_shards, "--out", tiny_cache, *TINY_VIT, "--layers", "1,-1", "--dtype", "float32", *FAST
    )
    assert result.exit_code == 0 and "3 already complete" in result.output


def test_image_folder_input(tmp_path: Path) -> None:
    images, labels = digit_images(20, "L")
    for index in range(30):
        folder = tmp_path / "folder" / f"class_{labels[index] % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        images[index].save(folder / f"img{index:03d}.png")
    out = tmp_path / "c.zarr"
    result = run_cli("extract", tmp_path / "folder", "--out", out, *TINY_VIT, "--folder-block", "8", *FAST)
    assert result.exit_code == 0, result.output
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["apmpipe"]["classes"] == ["class_0", "class_1"]
    names = sorted(name for name, _ in root["shards"].groups())
    assert names == ["folder-00000", "folder-00001", "folder-00002", "folder-00003"]
    assert root["shards/folder-00000/keys"][0] == "class_0/img000"
    all_labels = np.concatenate([root[f"shards/{n}/labels"][...] for n in names])
    assert sorted(all_labels.tolist()) == sorted((labels[:30] % 2).tolist())


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _write_tar(path: Path, members: dict[str, bytes], gz: bool = False) -> None:
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_gzip_shards_mixed_modes_corrupt_and_truncated(tmp_path: Path, digit_shards: list[str]) -> None:
    images, _ = digit_images(24, "L")
    rgba = Image.new("RGBA", (30, 20), (200, 10, 10, 128))
    deep = Image.fromarray(np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 100)
    palette = images[2].convert("P")
    members = {
        "a.jpg": _encoded(images[0], "JPEG"),
        "a.cls": b"3",
        "b.png": _encoded(rgba, "PNG"),
        "b.cls": b"1",
        "c.png": b"\x89PNG this is not an image",
        "c.cls": b"2",
        "d.png": _encoded(deep, "PNG"),
        "e.png": _encoded(palette, "PNG"),
        "e.cls": b"4",
        "f.webp": _encoded(images[1].convert("RGB"), "WEBP"),
        "f.cls": b"5",
    }
    _write_tar(tmp_path / "mixed.tar.gz", members, gz=True)
    good = Path(digit_shards[0]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(good[: len(good) // 2])
    out = tmp_path / "c.zarr"
    result = run_subprocess(
        "extract", tmp_path / "mixed.tar.gz", tmp_path / "cut.tar", digit_shards[1], "--out", out, *TINY_VIT, *FAST
    )
    assert result.returncode == 1, result.stderr
    assert "failed shard cut" in result.stderr and "skipped mixed/c: undecodable image" in result.stderr
    root = zarr.open_group(str(out), mode="r")
    mixed = root["shards/mixed"]
    assert mixed.attrs["status"] == "complete" and list(mixed["keys"][...]) == ["a", "b", "d", "e", "f"]
    assert mixed["labels"][...].tolist() == [3, 1, -1, 4, 5]
    assert mixed.attrs["skipped"][0]["key"] == "c"
    assert root["shards/cut"].attrs["status"] == "failed"
    assert root["shards/digits-0001"].attrs["status"] == "complete"
    info = run_cli("info", out)
    assert "failed shard cut" in info.output and "skipped mixed/c" in info.output


def test_resume_after_sigkill_is_bit_identical(tmp_path: Path) -> None:
    shards = write_digit_shards(tmp_path / "in", count=160, per_shard=20, size=32)
    args = [*shards, *TINY_VIT, "--layers", "1,-1", *FAST]
    reference = tmp_path / "ref.zarr"
    assert run_subprocess("extract", *args, "--out", reference).returncode == 0
    killed = tmp_path / "killed.zarr"
    kill_midway(["extract", *args, "--out", killed], killed / "shards/digits-0002/tokens/2")
    statuses = [json.loads(p.read_text())["attributes"].get("status") for p in killed.glob("shards/*/zarr.json")]
    assert "complete" in statuses or "writing" in statuses
    assert len([s for s in statuses if s == "complete"]) < 8, "the kill came too late to test anything"
    # what zarr's atomic write leaves when the kill lands inside it (whether this kill did is up to timing)
    for path in (killed / f"zarr.{'0a' * 16}.partial", killed / f"shards/digits-0000/zarr.{'b1' * 16}.partial"):
        path.write_bytes(b"{")
    result = run_subprocess("extract", *args, "--out", killed)
    assert result.returncode == 0, result.stderr
    assert not list(killed.rglob("*.partial")) and "not recognized" not in result.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(zarr.open_group(str(killed / "shards"), mode="r").members()) == 8
    ref, got = shard_arrays(reference), shard_arrays(killed)
    assert ref.keys() == got.keys() and len({key.split("/")[0] for key in ref}) == 8
    for key in ref:
        np.testing.assert_array_equal(ref[key], got[key], err_msg=key)


def test_mismatched_teacher_and_concurrent_writer_refused(
    capsys: pytest.CaptureFixture, tiny_cache: Path, digit_shards: list[str]
) -> None:
    result = run_main(
        capsys,
        "extract",
        digit_shards[0],
        "--out",
        tiny_cache,
        *TINY_VIT,
        "--seed",
        "1",
        "--layers",
        "1,-1",
        "--dtype",
        "float32",
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "was written with teacher.weights" in result.stderr
    result = run_main(
        capsys, "extract", digit_shards[0], "--out", tiny_cache, *TINY_VIT, "--layers", "-1", "--dtype", "float32"
    )
    assert result.returncode == 2 and "was written with levels" in result.stderr
    with writer_lock(str(tiny_cache)):
        result = run_subprocess(
            "extract", digit_shards[0], "--out", tiny_cache, *TINY_VIT, "--layers", "1,-1", "--dtype", "float32"
        )
    assert result.returncode == 2 and "being written by another apmpipe extract" in result.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers", "3"], "--layers 3: teacher 'vit_tiny_patch16_224' has 2 levels"),
        (["--layers", "0"], "--layers 0"),
        (["--layers", "a,b"], "not a comma-separated list"),
        (["--shard-samples", "20"], "must be a positive multiple of --chunk-samples"),
        (["--dtype", "bf16"], "Invalid value for '--dtype'"),
        (["--model-arg", "depth"], "is not KEY=VALUE"),
        (["--model-arg", "no_such_arg=1"], "rejected --model-arg"),
        (["--checkpoint", "/nonexistent.safetensors"], "does not exist"),
    ],
)
def test_bad_options_are_one_line_exit_2(
    capsys: pytest.CaptureFixture, tmp_path: Path, digit_shards: list[str], extra: list[str], message: str
) -> None:
    result = run_main(
        capsys, "extract", digit_shards[0], "--out", tmp_path / "c.zarr", *TINY_VIT, "--chunk-samples", "8", *extra
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_missing_input_and_unknown_teacher(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    result = run_main(capsys, "extract", tmp_path / "nope-{0..3}.tar", "--out", tmp_path / "c.zarr", *TINY_VIT)
    assert result.returncode == 2 and "does not exist" in result.stderr
    (tmp_path / "x.tar").write_bytes(b"")
    result = run_main(
        capsys,
        "extract",
        tmp_path / "x.tar",
        "--out",
        tmp_path / "c.zarr",
        "--teacher",
        "vit_nonexistent_model",
        "--no-pretrained",
    )
    assert result.returncode == 2 and "unknown timm model" in result.stderr


def test_local_dir_teacher_and_checkpoint(tmp_path: Path, digit_shards: list[str]) -> None:
    model = tiny_vit(num_classes=5)
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architecture": "vit_tiny_patch16_224",
                "num_classes": 5,
                "model_args": {"img_size": 32, "depth": 2},
                "pretrained_cfg": {
                    "input_size": [3, 32, 32],
                    "mean": [0.4, 0.4, 0.4],
                    "std": [0.2, 0.2, 0.2],
                    "interpolation": "bilinear",
                    "crop_pct": 1.0,
                },
            }
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    out = tmp_path / "local.zarr"
    result = run_cli(
        "extract", digit_shards[0], "--out", out, "--teacher", f"local-dir:{folder}", "--pretrained", *FAST
    )
    assert result.exit_code == 0, result.output
    spec = zarr.open_group(str(out), mode="r").attrs["apmpipe"]["spec"]
    assert (
        spec["data_config"]["mean"] == [0.4, 0.4, 0.4]
        and spec["data_config"]["interpolation"] == "bilinear"
        and spec["num_classes"] == 5
    )
    # the same weights as a bare state dict give the same teacher identity
    out2 = tmp_path / "ckpt.zarr"
    result = run_cli(
        "extract",
        digit_shards[0],
        "--out",
        out2,
        *TINY_VIT[:-2],
        "--model-arg",
        "num_classes=5",
        "--checkpoint",
        folder / "model.safetensors",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    spec2 = zarr.open_group(str(out2), mode="r").attrs["apmpipe"]["spec"]
    assert spec2["teacher"]["weights_sha256"] == spec["teacher"]["weights_sha256"]


def test_one_channel_convnet_teacher_int8(tmp_path: Path, digit_shards: list[str]) -> None:
    out = tmp_path / "rn.zarr"
    result = run_cli(
        "extract",
        digit_shards[0],
        "--out",
        out,
        "--teacher",
        "resnet18",
        "--no-pretrained",
        "--model-arg",
        "in_chans=1",
        "--model-arg",
        "num_classes=10",
        "--layers",
        "4,-1",
        "--dtype",
        "int8",
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert (
        "fidelity layer 5" in result.output
        and "teacher head" in result.output
        and "stored (avg pooling" in result.output
    )
    root = zarr.open_group(str(out), mode="r")
    group = root["shards/digits-0000"]
    assert group["pixels"].shape == (40, 1, 224, 224)
    levels = root.attrs["apmpipe"]["spec"]["levels"]
    assert [(lv["prefix_tokens"], lv["grid"], lv["dim"]) for lv in levels] == [(0, [14, 14], 256), (0, [7, 7], 512)]
    assert group["tokens/5"].dtype == np.int8 and group["scales/5"].shape == (40, 49)
    assert group.attrs["stats"]["fidelity"]["5"]["cosine_min"] > 0.999


def test_user_error_in_a_real_process_is_one_line(tmp_path: Path, digit_shards: list[str]) -> None:
    result = run_subprocess("extract", digit_shards[0], "--out", tmp_path / "c.zarr", *TINY_VIT, "--layers", "7")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    result = run_subprocess(
        "--debug", "extract", digit_shards[0], "--out", tmp_path / "c.zarr", *TINY_VIT, "--layers", "7"
    )
    assert result.returncode == 1 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_dask_workers_give_the_same_cache(tmp_path: Path, tiny_cache: Path, digit_shards: list[str]) -> None:
    out = tmp_path / "dask.zarr"
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
        "--workers",
        "2",
    )
    assert result.exit_code == 0, result.output
    ref, got = shard_arrays(tiny_cache), shard_arrays(out)
    assert ref.keys() == got.keys()
    for key in ref:
        np.testing.assert_array_equal(ref[key], got[key], err_msg=key)


def test_same_shard_name_from_other_data_is_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    first = write_digit_shards(tmp_path / "a", count=20, per_shard=20, size=32)
    other = write_digit_shards(tmp_path / "b", count=20, start=500, per_shard=20, size=32)
    out = tmp_path / "c.zarr"
    assert run_cli("extract", *first, "--out", out, *TINY_VIT, *FAST).exit_code == 0
    result = run_main(capsys, "extract", *other, "--out", out, *TINY_VIT, *FAST)
    assert result.returncode == 2 and "already holds shard 'digits-0000'" in result.stderr


def test_tuple_model_args_resume_and_a_new_cache_is_locked_from_the_start(
    capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    shards = write_digit_shards(tmp_path / "in", count=160, per_shard=20, size=32)
    args = [*shards, *TINY_VIT, "--model-arg", "img_size=(32, 32)", *FAST]
    out = tmp_path / "c.zarr"
    proc = subprocess.Popen(
        [sys.executable, "-m", "apmpipe.pipeline", "extract", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "shards").exists():
        time.sleep(0.01)
    second = run_main(capsys, "extract", *args, "--out", out)
    assert second.returncode == 2 and "being written by another apmpipe extract" in second.stderr
    assert proc.wait() == 0, proc.stderr.read()
    again = run_main(capsys, "extract", *args, "--out", out)
    assert again.returncode == 0 and "8 already complete" in again.stdout
