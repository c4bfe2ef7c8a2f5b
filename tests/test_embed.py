"""apmpipe embed end to end through the CLI: values against the student, resume after kill -9, options, ledger."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from apmpipe.pipeline.datasets import digit_images, write_digit_shards
from apmpipe.stages.classify import global_feature
from apmpipe.stages.head import TeacherHead
from apmpipe.stages.inputs import PixelNormalizer
from apmpipe.stages.student import load_model
from apmpipe.storage.cache import FeatureCache
from apmpipe.storage.checkpoint import load_student
from apmpipe.storage.embeddings import read_metadata, read_parts

from .conftest import kill_midway, run_cli, run_main, run_subprocess

QUICK = ["--batch-size", "16", "--loader-workers", "0"]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_embeddings_are_what_the_student_predicts_on_the_cached_pixels(
    tmp_path: Path, tiny_student: Path, tiny_cache: Path, digit_shards: list[str]
) -> None:
    out = tmp_path / "emb"
    args = ["--student", tiny_student, "--out", out, "--dtype", "float32", "--tokens", "--topk", "3"]
    result = run_cli("embed", *digit_shards, *args, *QUICK)
    assert result.exit_code == 0, result.output
    manifest = _manifest(out)
    # levels named by the teacher layer; pooled on the last level (the head reads it), cls below it
    assert [(lv["layer"], lv["feature"]) for lv in manifest["levels"]] == [(1, "cls"), (2, "pooled")]
    assert list(manifest["parts"]) == ["digits-0000", "digits-0001", "digits-0002"]
    assert manifest["head"]["cache"] == str(tiny_cache) and manifest["options"]["dtype"] == "float32"
    cache = FeatureCache.open(str(tiny_cache))
    model, _ = load_model(str(tiny_student), torch.device("cpu"))
    head = TeacherHead(*cache.head())
    normalize = PixelNormalizer(cache.spec.data_config)
    for part in manifest["parts"]:
        data = cache.read(part, 0, 40)  # the pixels extraction stored for the same images
        predicted = model.predict_tokens(normalize(torch.from_numpy(data.pixels)))
        with torch.no_grad():
            logits = head(predicted[1])
        expected = {
            "emb_layer1": global_feature(predicted[0], "cls", 1, None),
            "emb_layer2": global_feature(predicted[1], "pooled", 1, head),
            "tokens_layer1": predicted[0],
            "tokens_layer2": predicted[1],
            "logits": logits,
        }
        for folder, value in expected.items():
            np.testing.assert_allclose(
                np.load(out / folder / f"{part}.npy"), value.numpy(), rtol=1e-5, atol=1e-5, err_msg=folder
            )
        rows = pq.read_table(out / "metadata" / f"{part}.parquet").to_pydict()
        assert rows["key"] == list(data.keys) and rows["label"] == data.labels.tolist()
        assert rows["row"] == list(range(40)) and set(rows["part"]) == {part} and rows["source"][0].endswith(".tar")
        assert [top[0] for top in rows["topk_classes"]] == logits.argmax(1).tolist()
        assert all(len(top) == 3 and top == sorted(top, reverse=True) for top in rows["topk_probs"])
    # the whole folder read back: metadata rows aligned with the rows of every level's array
    features, metadata = read_parts(out, "emb_layer2"), read_metadata(out)
    assert features.shape[0] == metadata.num_rows == 120 and features.dtype == np.float32
    assert metadata.column("key").to_pylist()[40] == cache.read("digits-0001", 0, 1).keys[0]
    assert "layer 2: pooled" in result.output and "logits and top-k" in result.output


def _part_files(out: Path) -> list[Path]:
    """Every part's files (not the manifest, not the lock file)."""
    return sorted(p.relative_to(out) for p in out.glob("*/*") if p.is_file())


def test_embed_resumes_after_kill_9_with_identical_outputs(tmp_path: Path, tiny_student: Path) -> None:
    shards = write_digit_shards(tmp_path / "in", count=320, per_shard=40, size=32)
    args = ["embed", *shards, "--student", tiny_student, "--tokens", "--batch-size", "8", "--loader-workers", "0"]
    reference, killed = tmp_path / "ref", tmp_path / "killed"
    assert run_subprocess(*args, "--out", reference).returncode == 0
    kill_midway([*args, "--out", killed], killed / "metadata" / "digits-0001.parquet")
    assert len(_manifest(killed)["parts"]) < 8, "the kill came too late to test anything"
    result = run_subprocess(*args, "--out", killed)
    assert result.returncode == 0, result.stderr
    files = _part_files(reference)
    assert files == _part_files(killed) and len([f for f in files if f.parent.name == "tokens_layer2"]) == 8
    assert not list(killed.rglob(".*.tmp"))
    for name in files:
        assert (reference / name).read_bytes() == (killed / name).read_bytes(), name
    assert _manifest(reference)["parts"] == _manifest(killed)["parts"]


def test_rerun_skips_complete_parts_and_refuses_changed_options(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_student: Path, digit_shards: list[str]
) -> None:
    out = tmp_path / "emb"
    first = run_main(capsys, "embed", digit_shards[0], "--student", tiny_student, "--out", out, *QUICK)
    assert first.returncode == 0, first.stderr
    written = (out / "emb_layer2" / "digits-0000.npy").stat().st_mtime_ns
    more = run_main(capsys, "embed", *digit_shards[:2], "--student", tiny_student, "--out", out, *QUICK)
    assert more.returncode == 0 and "1 done, 1 already complete" in more.stdout
    assert (out / "emb_layer2" / "digits-0000.npy").stat().st_mtime_ns == written
    assert list(_manifest(out)["parts"]) == ["digits-0000", "digits-0001"]
    other = write_digit_shards(tmp_path / "other", count=8, start=500, size=32)[0]  # another digits-0000.tar
    refused = run_main(capsys, "embed", other, "--student", tiny_student, "--out", out, *QUICK)
    assert refused.returncode == 2 and "already holds shard 'digits-0000' made from" in refused.stderr
    for option, message in (
        (["--feature", "mean-patch"], "--feature mean-patch (run: pooled)"),
        (["--dtype", "float32"], "--dtype float32 (run: float16)"),
        (["--tokens"], "--tokens True (run: False)"),
        (["--head-cache", tmp_path / "nowhere.zarr"], "--head-cache"),
    ):
        refused = run_main(capsys, "embed", digit_shards[0], "--student", tiny_student, "--out", out, *option, *QUICK)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_samples_in_the_ledger_failed_part_folder_pipe_and_no_head(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_student: Path, tiny_cache: Path, digit_shards: list[str]
) -> None:
    images, _ = digit_images(32, "L")
    with tarfile.open(tmp_path / "mixed.tar", "w") as tar:
        for name, data in {"a.png": _png(images[0]), "a.cls": b"3", "b.png": b"\x89PNG broken", "c.cls": b"2"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    whole = Path(digit_shards[0]).read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2])
    folder = tmp_path / "photos"
    for cls, index in (("one", 1), ("zero", 0)):
        (folder / cls).mkdir(parents=True)
        images[index].save(folder / cls / f"img{index}.png")
    # a student whose training cache is gone: no teacher head opens
    weights, metadata = load_student(tiny_student)
    metadata["train_config"]["caches"] = [str(tmp_path / "gone.zarr")]
    save_file(weights, str(tmp_path / "student.safetensors"), {k: json.dumps(v) for k, v in metadata.items()})
    out = tmp_path / "emb"
    sources = [tmp_path / "mixed.tar", tmp_path / "cut.tar", f"pipe:cat {digit_shards[1]}", folder]
    result = run_main(capsys, "embed", *sources, "--student", tmp_path / "student.safetensors", "--out", out, *QUICK)
    assert result.returncode == 1, result.stderr
    assert "skipped mixed/b: undecodable image" in result.stderr and "skipped mixed/c: no image field" in result.stderr
    assert "failed part cut" in result.stderr and "embedded without logits" in result.stdout
    manifest = _manifest(out)
    assert list(manifest["parts"]) == ["digits-0001", "mixed", "photos-00000"] and "cut" in manifest["failed"]
    assert [key for key, _ in manifest["parts"]["mixed"]["skipped"]] == ["b", "c"]
    assert manifest["head"]["cache"] is None and "gone.zarr" in manifest["head"]["reason"]
    assert [lv["feature"] for lv in manifest["levels"]] == ["cls", "cls"] and manifest["classes"] == ["one", "zero"]
    assert not (out / "logits").exists()
    mixed = pq.read_table(out / "metadata" / "mixed.parquet")
    assert mixed.column_names == ["key", "label", "part", "row", "source"] and mixed.column("key").to_pylist() == ["a"]
    assert np.load(out / "emb_layer1" / "mixed.npy").shape == (1, 192)
    photos = pq.read_table(out / "metadata" / "photos-00000.parquet").to_pydict()
    assert photos["key"] == ["one/img1", "zero/img0"] and photos["label"] == [0, 1]
    # the training cache is back: a rerun would add parts with logits beside parts without, and is refused
    shutil.copytree(tiny_cache, tmp_path / "gone.zarr")
    result = run_main(capsys, "embed", *sources, "--student", tmp_path / "student.safetensors", "--out", out, *QUICK)
    assert result.returncode == 2 and "the teacher head of" in result.stderr and "(run: none: " in result.stderr


def test_a_killed_manifest_write_leaves_no_temporary(
    tmp_path: Path, tiny_student: Path, digit_shards: list[str]
) -> None:
    out = tmp_path / "emb"
    assert run_subprocess("embed", digit_shards[0], "--student", tiny_student, "--out", out, *QUICK).returncode == 0
    (out / ".manifest.json.x1.tmp").write_text("{")  # as kill -9 leaves it during the manifest's atomic write
    (out / "emb_layer2" / ".digits-0001.npy.tmp").write_bytes(b"")  # and during a part file's
    assert run_subprocess("embed", *digit_shards[:2], "--student", tiny_student, "--out", out, *QUICK).returncode == 0
    assert not list(out.rglob(".*.tmp"))
