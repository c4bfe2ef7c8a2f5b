"""extract --views: each image's augmented views with the teacher's own tokens, and train drawing one per epoch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from apmpipe.pipeline.datasets import write_digit_shards
from apmpipe.stages.augment import key_views, view_parameters, view_pixels
from apmpipe.storage.cache import FeatureCache
from apmpipe.storage.checkpoint import load_student
from apmpipe.storage.format import view_order
from apmpipe.storage.sources import count_images, resolve_inputs
from apmpipe.storage.stream import StreamPlan, iter_subset, sample_subset

from .conftest import (
    FAST,
    TINY_VIT,
    TRAIN_FAST,
    kill_midway,
    run_cli,
    run_main,
    run_subprocess,
    train_killed_and_resumed,
)
from .test_extract import shard_arrays
from .test_scale import _s3_options, s3_endpoint  # noqa: F401 (the moto S3 server fixture)

TEACHER = [*TINY_VIT, "--model-arg", "patch_size=8"]  # a 4 x 4 grid: crops of 3 cells fit
# (after FAST) shards of 20 or 40 images end in a batch of none
VIEWS = ["--views", "3", "--view-augment", "crop,flip", "--view-crop-scale", "0.3,1", "--batch-size", "20"]
LOSSY = ["--dtype", "int8", "--rank", "16"]


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory: pytest.TempPathFactory, digit_shards: list[str]) -> Path:
    """The tiny ViT's float32 cache of the digit shards, 3 views per image."""
    out = tmp_path_factory.mktemp("views") / "views.zarr"
    args = ["extract", *digit_shards, "--out", out, *TEACHER, "--layers", "1,-1", "--dtype", "float32", *FAST]
    result = run_cli(*args, *VIEWS)
    assert result.exit_code == 0, result.output
    return out


def test_view_order_stores_one_view_of_a_block_as_one_run() -> None:
    # 5 images, 3 views, blocks of 2 images: arrival i * 3 + v
    assert view_order(5, 3, 2).tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11, 12, 13, 14]


def test_views_hold_the_image_then_its_drawn_views_with_their_teachers_tokens(
    tmp_path: Path, views_cache: Path, digit_shards: list[str]
) -> None:
    args = [digit_shards[0], "--out", tmp_path / "plain.zarr", *TEACHER, "--layers", "1,-1", "--dtype", "float32"]
    assert run_cli("extract", *args, *FAST).exit_code == 0
    plain = zarr.open_group(str(tmp_path / "plain.zarr"), mode="r")["shards/digits-0000"]
    group = zarr.open_group(str(views_cache), mode="r")["shards/digits-0000"]
    assert group.attrs["num_samples"] == 3 * plain.attrs["num_samples"] == 120
    view, keys, pixels = group["view"][...], group["keys"][...], group["pixels"][...]
    assert view[:24].tolist() == [0] * 8 + [1] * 8 + [2] * 8  # chunks of 8 images, view after view
    first = view == 0
    np.testing.assert_array_equal(keys[first], plain["keys"][...])
    np.testing.assert_array_equal(pixels[first], plain["pixels"][...])
    np.testing.assert_array_equal(group["tokens/2"][...][first], plain["tokens/2"][...])
    # a view's stored parameters are those its key draws, and its pixels those parameters make of the image
    images = torch.from_numpy(pixels[first][:8])
    drawn = key_views(("flip", "crop"), list(keys[first][:8]), 2, (32, 32), (4, 4), (0.3, 1.0))
    assert torch.equal(view_pixels(images, drawn), torch.from_numpy(pixels[16:24]))
    np.testing.assert_allclose(group["augment"][16:24], view_parameters(drawn, 8).numpy())
    assert len({tuple(row) for row in group["augment"][8:24]}) == 16  # every view its own draw
    # the views' tokens are the teacher's on the view: not the plain tokens resampled
    assert not np.allclose(group["tokens/2"][8:16], plain["tokens/2"][:8])
    spec = json.loads((views_cache / "zarr.json").read_text())["attributes"]["apmpipe"]["spec"]
    assert (spec["views"], spec["view_augment"], spec["view_crop_scale"]) == (3, ["flip", "crop"], [0.3, 1.0])


def test_extract_warns_when_a_cache_holds_too_few_images_and_views_to_train_on(
    capsys: pytest.CaptureFixture, tmp_path: Path, digit_shards: list[str]
) -> None:
    """Under 16,000 samples (images x views) and 32 views, extract says in one line what a student trained on the
    cache would do and how to extract it for training (measured: docs/train.md, "Few images"); enough views say
    nothing, and neither does a run with a failed shard (its image count is not the cache's)."""
    from apmpipe.stages.extract import ExtractResult, ExtractSummary
    from apmpipe.stages.extract_config import few_images_note

    base = [digit_shards[0], *TEACHER, "--layers", "-1", *FAST]
    one = run_main(capsys, "extract", *base, "--out", tmp_path / "one.zarr")
    assert one.returncode == 0, one.stderr
    (line,) = [x for x in one.stderr.splitlines() if "distinct images" in x]
    assert line.startswith("warning: 40 distinct images x 1 view(s): so few, a student learns them by heart")
    assert "extract it again into another --out with --views auto, the default" in line
    many = run_main(capsys, "extract", *base, "--out", tmp_path / "many.zarr", "--views", "32")
    assert many.returncode == 0 and "distinct images" not in many.stderr, many.stderr
    failed = ExtractResult(name="digits-0001", status="failed", error="disk full")
    summary = ExtractSummary("c.zarr", [failed], seconds=1.0, stored_bytes=1, cache_samples=40, head="none")
    assert not summary.few_images and ExtractSummary("c.zarr", [], 1.0, 1, 40, "none").few_images
    # under 16,000 renders and 32 views (4,000 x 1 view measured a gap of 0.10-0.12, 4,000 x 4 0.03)
    warned = [(40, 31), (1024, 8), (2048, 4), (3999, 4), (4000, 1), (8000, 1.5)]
    silent = [(40, 32), (1024, 16), (2048, 8), (4000, 4), (16000, 1), (100_000, 1)]
    assert all(few_images_note(*plan) for plan in warned) and not any(few_images_note(*plan) for plan in silent)


def test_views_auto_counts_the_images_and_stores_enough_views_of_few(
    capsys: pytest.CaptureFixture, tmp_path: Path, digit_shards: list[str]
) -> None:
    """``--views auto`` (the default): enough views for 32,768 samples, at most 32 and at least 1, counted before
    the cache's layout is fixed; views drawn by crop at scale 0.35-1 unless --view-augment says otherwise. A rerun
    without --views keeps the cache's views and their augmentations, where counting again would change them."""
    from apmpipe.stages.extract_config import auto_views
    from apmpipe.storage.sources import ShardSource

    counts = {40: 32, 1000: 32, 1024: 32, 1025: 32, 2048: 16, 4000: 9, 8000: 5, 16000: 3, 16384: 2, 32768: 1, 10**6: 1}
    assert {images: auto_views(images) for images in counts} == counts
    shards = resolve_inputs(digit_shards).shards
    assert count_images(shards, 32768) == 120 and count_images(shards, 50) == 50
    folder = ShardSource("block-0", "/nowhere", files=("a.png", "b.png"), labels=(0, 1))  # counted, not read
    assert count_images([folder, *shards], 32768) == 122
    auto = tmp_path / "auto.zarr"
    base = [digit_shards[0], *TEACHER, "--layers", "-1", *FAST]
    result = run_main(capsys, "extract", *base, "--out", auto, "--views", "auto")
    assert result.returncode == 0 and "distinct images" not in result.stderr, result.stderr
    assert "counting the tar shards' images for --views auto (up to 32,768; --views N skips this)" in result.stderr
    assert "32 per image, the teacher's own tokens for each (--views auto" in re.sub(r"[\s│]+", " ", result.stdout)
    spec = FeatureCache.open(str(auto)).spec
    assert (spec.views, spec.view_augment, spec.view_crop_scale) == (32, ("crop",), (0.35, 1.0))
    assert FeatureCache.open(str(auto)).sample_counts() == {"digits-0000": 40 * 32}
    far = tmp_path / "dask.zarr"  # the driver counts and decides; its workers write what it decided
    assert run_cli("extract", *base, "--out", far, "--views", "auto", "--workers", "2").exit_code == 0
    ours, theirs = shard_arrays(auto), shard_arrays(far)
    assert ours.keys() == theirs.keys() and FeatureCache.open(str(far)).spec.views == 32
    for key in ("view", "augment", "pixels", "keys", "labels"):
        np.testing.assert_array_equal(ours[f"digits-0000/{key}"], theirs[f"digits-0000/{key}"], err_msg=key)
    adopted = tmp_path / "adopted.zarr"
    assert run_main(capsys, "extract", *base, "--out", adopted, *VIEWS).returncode == 0
    more = run_main(capsys, "extract", *digit_shards[:2], *base[1:], "--out", adopted, "--views", "auto")
    assert more.returncode == 0 and "3 per image" in more.stdout and "counting" not in more.stderr, more.stderr
    spec = FeatureCache.open(str(adopted)).spec
    assert (spec.views, spec.view_augment, spec.view_crop_scale) == (3, ("flip", "crop"), (0.3, 1.0))
    assert FeatureCache.open(str(adopted)).sample_counts() == {"digits-0000": 120, "digits-0001": 120}


def test_scores_read_each_image_once_from_a_views_cache(
    tmp_path: Path, views_cache: Path, digit_shards: list[str]
) -> None:
    """eval, its TTT and islands read view 0 of a cache with views (the image itself): the same report and picture
    as on the same images extracted with one view. A view is a training sample, not another held-out image."""
    plain = tmp_path / "plain.zarr"
    args = ["extract", *digit_shards, "--out", plain, *TEACHER, "--layers", "1,-1", "--dtype", "float32", *FAST]
    assert run_cli(*args).exit_code == 0
    run = tmp_path / "run"
    assert run_cli("train", plain, "--out", run, *TRAIN_FAST, "--max-steps", "4").exit_code == 0
    reports = []
    for cache in (plain, views_cache):
        out = tmp_path / f"eval-{cache.stem}"
        options = ["--ttt-steps", "2", "--ttt-samples", "3", "--max-samples", "50", "--batch-size", "16"]
        result = run_cli("eval", cache, "--student", run, "--out", out, *options)
        assert result.exit_code == 0, result.output
        report = json.loads((out / "eval.json").read_text())
        timings = ("ms_per_step", "ms_per_sample")
        report["ttt"] = {key: value for key, value in report["ttt"].items() if key not in timings}
        reports.append({key: report[key] for key in ("samples", "fidelity", "classification", "ttt")})
        result = run_cli("islands", cache, "--student", run, "--out", out / "i.png", "--images", "20", "--panel", "32")
        assert result.exit_code == 0, result.output
    assert reports[0]["samples"] == 50 and reports[1] == reports[0]
    cache, reads = FeatureCache.open(str(views_cache)), []
    read = cache.read
    cache.read = lambda name, start, stop, **options: reads.append(stop - start) or read(name, start, stop, **options)
    batches = list(iter_subset(cache, sample_subset(cache, 0, 0), 64))
    assert sum(len(b.labels) for b in batches) == sum(reads) == 120  # view 0's chunks alone, of 360 samples
    pictures = [np.asarray(Image.open(tmp_path / f"eval-{c.stem}" / "i.png")) for c in (plain, views_cache)]
    np.testing.assert_array_equal(pictures[0], pictures[1])


def test_verify_and_info_on_views(views_cache: Path) -> None:
    result = run_cli("verify", views_cache, "--samples", "16")
    assert result.exit_code == 0 and "PASS" in result.output, result.output
    result = run_cli("verify", views_cache, "--integrity")
    assert result.exit_code == 0 and "PASS" in result.output, result.output
    info = json.loads(run_cli("info", views_cache, "--json").output)
    assert info["samples"] == 360 and info["spec"]["views"] == 3


def test_views_refused_when_they_differ_or_lack_an_augmentation(
    capsys: pytest.CaptureFixture, views_cache: Path, digit_shards: list[str]
) -> None:
    args = ["extract", digit_shards[0], "--out", views_cache, *TEACHER, "--layers", "1,-1", "--dtype", "float32"]
    result = run_main(capsys, *args, *FAST, "--views", "2", "--view-augment", "crop,flip", "--view-crop-scale", "0.3,1")
    assert (
        result.returncode == 2
        and result.stderr
        == f"error: cache {str(views_cache)!r} was written with views 3, not 2; use another --out or the same options\n"
    )
    result = run_main(capsys, *args, *FAST, "--views", "3", "--view-crop-scale", "0.3,1")  # the default view_augment
    assert result.returncode == 2 and "was written with view_augment ['flip', 'crop'], not ['crop']" in result.stderr
    result = run_main(capsys, *args, "--views", "3", "--view-augment", "rotate")
    assert result.returncode == 2 and "--view-augment 'rotate' is not one of flip, crop" in result.stderr
    result = run_main(capsys, *args, "--views", "1", "--view-augment", "flip")
    assert result.returncode == 2 and result.stderr == (
        "error: --view-augment draws views 1..N-1, and --views 1 stores the image alone; pass --views N (N > 1) or "
        "--views auto\n"
    )
    result = run_main(capsys, *args, "--views", "x")
    assert result.stderr == "error: --views 'x' is neither a count nor auto; e.g. --views 4 or --views auto\n"
    result = run_main(capsys, *args, "--views", "0")
    assert result.returncode == 2 and result.stderr == "error: --views must be at least 1, got 0\n"


def test_an_epoch_draws_one_view_of_every_image(views_cache: Path) -> None:
    cache = FeatureCache.open(str(views_cache))
    plan = StreamPlan.of([cache], unit=8, window_samples=32, seed=0, rank=0, world_size=1)
    assert plan.units_per_rank(0) == 15  # 120 images, not 360 samples
    drawn = []
    for epoch in range(6):
        blocks = plan.rank_blocks(epoch)[0]
        views = {(b.shard, b.start // 24): (b.start % 24) // 8 for b in blocks}
        assert len(blocks) == len(views) == 15 and all(b.size == 8 for b in blocks)
        drawn.append(views)
    assert {v for views in drawn for v in views.values()} == {0, 1, 2}
    assert drawn[0] != drawn[1]
    again = StreamPlan.of([cache], unit=8, window_samples=32, seed=0, rank=0, world_size=1)
    assert again.rank_blocks(3) == plan.rank_blocks(3)  # a pure function of seed and epoch: resume reads alike


def test_train_on_views_resumes_exactly(tmp_path: Path, views_cache: Path) -> None:
    args = ["train", views_cache, *TRAIN_FAST, "--max-steps", "40", "--checkpoint-every", "4", "--locations", "3"]
    reference, killed = train_killed_and_resumed(args, tmp_path)
    ref, meta = load_student(reference)
    got, _ = load_student(killed)
    assert meta["step"] == 40
    for key in ref:
        assert ref[key].equal(got[key]), key


def test_lossy_views_resume_after_sigkill_and_on_dask_alike(tmp_path: Path) -> None:
    shards = write_digit_shards(tmp_path / "in", count=160, per_shard=20, size=32)
    args = [*shards, *TEACHER, "--layers", "1,-1", *FAST, *VIEWS, *LOSSY]
    reference = tmp_path / "ref.zarr"
    assert run_subprocess("extract", *args, "--out", reference).returncode == 0
    killed = tmp_path / "killed.zarr"
    kill_midway(["extract", *args, "--out", killed], killed / "shards/digits-0002/tokens/2")
    statuses = [json.loads(p.read_text())["attributes"].get("status") for p in killed.glob("shards/*/zarr.json")]
    assert len([s for s in statuses if s == "complete"]) < 8, "the kill came too late to test anything"
    assert run_subprocess("extract", *args, "--out", killed).returncode == 0
    dask = tmp_path / "dask.zarr"
    assert run_cli("extract", *args, "--out", dask, "--workers", "2").exit_code == 0
    ref, got, far = shard_arrays(reference), shard_arrays(killed), shard_arrays(dask)
    assert ref.keys() == got.keys() == far.keys() and len({key.split("/")[0] for key in ref}) == 8
    for key in ref:
        np.testing.assert_array_equal(ref[key], got[key], err_msg=key)
        if ref[key].dtype.kind != "f" and ref[key].dtype != np.int8:
            np.testing.assert_array_equal(ref[key], far[key], err_msg=key)
        else:  # a dask worker's BLAS threads may round the basis projection's last bit otherwise
            atol = 1 if ref[key].dtype == np.int8 else 1e-5  # an int8 value on a rounding boundary; sums near 0
            np.testing.assert_allclose(ref[key].astype(float), far[key], rtol=1e-5, atol=atol, err_msg=key)
    result = run_cli("verify", reference, "--samples", "16")
    assert result.exit_code == 0 and "PASS" in result.output, result.output


def test_views_on_s3_equal_the_local_cache(
    tmp_path: Path,
    s3_endpoint: str,  # noqa: F811
    digit_shards: list[str],
    views_cache: Path,
) -> None:
    import s3fs

    s3fs.S3FileSystem(key="test", secret="test", client_kwargs={"endpoint_url": s3_endpoint}).mkdir("apm-views")
    cache = "s3://apm-views/cache.zarr"
    args = ["extract", *digit_shards, "--out", cache, *TEACHER, "--layers", "1,-1", "--dtype", "float32", *FAST]
    result = run_cli(*args, *VIEWS, *_s3_options(s3_endpoint))
    assert result.exit_code == 0, result.output
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": s3_endpoint}}
    remote = zarr.open_group(cache, mode="r", storage_options=options)["shards/digits-0001"]
    s3fs.S3FileSystem(**options).put(digit_shards[0], "apm-views/in/digits-0000.tar")  # --views auto counts there
    assert count_images(resolve_inputs(["s3://apm-views/in/"], storage_options=options).shards, 32768, options) == 40
    local = zarr.open_group(str(views_cache), mode="r")["shards/digits-0001"]
    for name in ("view", "augment", "pixels", "tokens/2", "logits"):
        np.testing.assert_array_equal(remote[name][...], local[name][...], err_msg=name)
