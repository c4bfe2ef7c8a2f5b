"""``train --augment``: pixels and token grids transformed alike, boxes in the image, seeded draws, resume identity."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from apmpipe.pipeline.bench.augment import augment_fidelity
from apmpipe.stages.augment import MIN_CROP_CELLS, augment_generator, crop_boxes, draw_views
from apmpipe.storage.checkpoint import load_student

from .conftest import TRAIN_FAST, run_cli, run_main, train_killed_and_resumed

SIZE, CELL, PREFIX = (32, 48), 4, 1
GRID = (SIZE[0] // CELL, SIZE[1] // CELL)


def pooling_teacher(images: torch.Tensor) -> torch.Tensor:
    """A "teacher" whose grid tokens are its cells' mean pixels and whose CLS token is the image mean:
    ``[B, C, H, W]`` -> ``[B, 1 + h*w, C]``, row-major like a ViT."""
    cells = F.avg_pool2d(images, CELL).flatten(2).transpose(1, 2)
    return torch.cat([images.mean((2, 3))[:, None], cells], dim=1)


def test_flipped_tokens_are_the_tokens_of_the_flipped_image() -> None:
    images = torch.randint(0, 256, (16, 3, *SIZE), generator=torch.Generator().manual_seed(0)).float()
    views = draw_views(("flip",), 16, SIZE, GRID, augment_generator(0, 0, 0))
    assert 0 < int(views.flip.sum()) < 16  # per-sample flips: some of each
    expected = pooling_teacher(views.images(images))
    assert torch.equal(
        views.tokens(pooling_teacher(images), GRID, PREFIX), expected
    )  # integer pixels: cell means are exact
    assert torch.equal(views.images(images)[~views.flip], images[~views.flip])


def test_cropped_tokens_follow_the_cropped_image() -> None:
    rows, cols = torch.meshgrid(torch.arange(SIZE[0]).float(), torch.arange(SIZE[1]).float(), indexing="ij")
    smooth = 3 * cols + 2 * rows + 10 * torch.sin(cols / 6) + 5 * torch.cos(rows / 5)  # smooth: pooling ~ sampling
    images = torch.stack([smooth + 7 * k for k in range(8)])[:, None]
    views = draw_views(("flip", "crop"), 8, SIZE, GRID, augment_generator(0, 0, 3))
    truth = pooling_teacher(views.images(images))[:, PREFIX:]
    error = (views.tokens(pooling_teacher(images), GRID, PREFIX)[:, PREFIX:] - truth).abs().mean() / truth.abs().mean()
    unaugmented = (pooling_teacher(images)[:, PREFIX:] - truth).abs().mean() / truth.abs().mean()
    assert error < 0.01 and unaugmented > 0.05, (error, unaugmented)
    assert torch.equal(
        views.tokens(pooling_teacher(images), GRID, PREFIX)[:, :PREFIX], pooling_teacher(images)[:, :PREFIX]
    )


def test_whole_image_crop_is_the_identity() -> None:
    tokens, images = torch.randn(2, PREFIX + GRID[0] * GRID[1], 5), torch.randn(2, 3, *SIZE)
    views = draw_views(("crop",), 2, SIZE, GRID, augment_generator(0, 0, 0), crop_scale=(1.0, 1.0))
    assert torch.allclose(views.boxes, torch.tensor([[0.0, 0.0, SIZE[1], SIZE[0]]] * 2))
    assert torch.allclose(views.tokens(tokens, GRID, PREFIX), tokens, atol=1e-5)
    assert torch.allclose(views.images(images), images, atol=1e-5)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.5, 1.0)])
def test_crop_boxes_stay_inside_the_image_and_span_a_few_cells(scale: tuple[float, float]) -> None:
    boxes = crop_boxes(4000, SIZE, GRID, scale, torch.Generator().manual_seed(1))
    x0, y0, x1, y1 = boxes.unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= SIZE[1] + 1e-4).all() and (y1 <= SIZE[0] + 1e-4).all()
    assert ((x1 - x0) >= MIN_CROP_CELLS * CELL - 1e-4).all() and ((y1 - y0) >= MIN_CROP_CELLS * CELL - 1e-4).all()
    area = (x1 - x0) * (y1 - y0) / (SIZE[0] * SIZE[1])
    assert area.min() >= scale[0] - 1e-5 and area.max() <= 1 + 1e-5 and area.std() > 0.1
    ratio, image_ratio = (x1 - x0) / (y1 - y0), SIZE[1] / SIZE[0]  # timm's range, widened to the image's own
    assert ratio.min() >= min(3 / 4, image_ratio) - 1e-4 and ratio.max() <= max(4 / 3, image_ratio) + 1e-4


def test_draws_are_seeded_by_seed_rank_and_step() -> None:
    def draw(seed: int, rank: int, step: int):
        return draw_views(("flip", "crop"), 32, SIZE, GRID, augment_generator(seed, rank, step))

    first, again = draw(0, 0, 5), draw(0, 0, 5)
    assert torch.equal(first.flip, again.flip) and torch.equal(first.boxes, again.boxes)
    for other in (draw(1, 0, 5), draw(0, 1, 5), draw(0, 0, 6)):
        assert not torch.equal(first.boxes, other.boxes)


def test_resume_after_sigkill_with_augment_gives_identical_weights(tmp_path: Path, tiny_cache: Path) -> None:
    args = ["train", str(tiny_cache), *TRAIN_FAST, "--loader-workers", "1", "--max-steps", "30"]
    args += ["--checkpoint-every", "4", "--warmup-steps", "3", "--locations", "3", "--echo", "2"]
    plain = tmp_path / "plain"
    assert run_cli(*args, "--out", plain).exit_code == 0
    augmented = [*args, "--augment", "flip,crop", "--crop-scale", "0.3,1"]
    reference, killed = train_killed_and_resumed(augmented, tmp_path)
    (ref, meta), (got, _), (without, _) = load_student(reference), load_student(killed), load_student(plain)
    assert meta["train_config"]["augment"] == ["flip", "crop"]
    assert all(ref[key].equal(got[key]) for key in ref)
    assert not all(ref[key].equal(without[key]) for key in ref), "--augment changed nothing"
    changed = run_cli(*args, "--augment", "flip", "--out", killed, "--resume")
    assert changed.exit_code == 2 and "--augment flip (run: flip,crop)" in changed.output, changed.output


def test_unknown_augment_and_bad_crop_scale_are_one_line_errors(
    capsys: pytest.CaptureFixture, tmp_path: Path, tiny_cache: Path
) -> None:
    for option, value, words in (
        ("--augment", "flip,rotate", ("'rotate'", "flip, crop")),
        ("--crop-scale", "0,1", ("--crop-scale", "0 < MIN <= MAX <= 1")),
        ("--crop-scale", "half,1", ("--crop-scale", "comma-separated list of numbers")),
    ):
        result = run_main(capsys, "train", tiny_cache, "--out", tmp_path / "run", option, value)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
        assert all(word in lines[0] for word in words), lines[0]
        assert not (tmp_path / "run").exists()


def test_augment_fidelity_compares_targets_with_the_teacher_on_augmented_images(tiny_cache: Path) -> None:
    flip, crop = augment_fidelity(str(tiny_cache), crop_scale=(1.0, 1.0))  # whole-image crops: targets are exact
    assert (flip.augment, crop.augment) == ("flip", "crop")
    for layer, parts in crop.cosine.items():
        assert min(parts.values()) > 0.999 and min(crop.baseline[layer].values()) > 0.999, crop
    assert crop.agreement == {"head": 1.0, "cached": 1.0} and crop.top1["augmented"] == crop.top1["original"]
    # a ViT with learned positions is not flip-equivariant: flipped cached tokens only approximate the real ones
    assert all(parts["patch"] < 0.999 for parts in flip.cosine.values()), flip
    assert all(flip.cosine[layer]["prefix"] == flip.baseline[layer]["prefix"] for layer in flip.cosine)
    shown = run_cli("bench", "augment", "--cache", tiny_cache, "--crop-scale", "1,1")
    assert shown.exit_code == 0, shown.output
    assert "patch 1.000 | baseline 1.000" in shown.output and "flip L2" in shown.output, shown.output


def test_augment_options_from_a_config_file(tmp_path: Path, tiny_cache: Path) -> None:
    config = tmp_path / "train.toml"
    config.write_text('augment = ["crop", "flip"]\ncrop_scale = [0.5, 1]\n')
    run = tmp_path / "run"
    result = run_cli("train", tiny_cache, "--out", run, *TRAIN_FAST, "--config", config, "--max-steps", "2")
    assert result.exit_code == 0, result.output
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["augment"] == ["flip", "crop"] and saved["crop_scale"] == [0.5, 1.0], saved
