"""The trained reference teachers: the ViT's recipe as it was; the ConvNeXt's three levels on three grids."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from apmpipe.pipeline.cli.demo import TeacherKind
from apmpipe.pipeline.datasets import digit_images
from apmpipe.stages.head import TeacherHead
from apmpipe.stages.reference_teacher import (
    RECIPES,
    ConvReferenceRecipe,
    ReferenceRecipe,
    train_reference_teacher,
    trained_record,
)
from apmpipe.storage.cache import FeatureCache
from apmpipe.storage.stream import iter_subset, sample_subset

from .conftest import FAST, one_error_line, run_cli, run_main


def test_vit_recipe_is_the_one_the_science_defaults_were_chosen_on() -> None:
    """Its numbers are its identity: a change retrains every demo teacher and moves every measured figure."""
    recipe = ReferenceRecipe()
    assert (recipe.architecture, recipe.layers, recipe.epochs, recipe.lr, recipe.batch_size) == (
        "vit_tiny_patch16_224",
        (1, 2),
        60,
        2e-3,
        64,
    )
    assert recipe.model_args(10) == {
        "img_size": 32,
        "patch_size": 4,
        "in_chans": 1,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
        "mlp_ratio": 2.0,
        "num_classes": 10,
    }
    assert sorted(RECIPES) == sorted(kind.value for kind in TeacherKind)  # every kind the demo offers exists


@pytest.fixture(scope="module")
def conv_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The ConvNeXt reference teacher trained briefly (2 epochs on 256 digits): its layout, not its accuracy."""
    images, labels = digit_images(32, "L")
    pixels = np.stack([np.asarray(image) for image in images])
    folder = tmp_path_factory.mktemp("conv") / "teacher"
    recipe = replace(ConvReferenceRecipe(), epochs=2)
    record = train_reference_teacher(folder, (pixels[:256], labels[:256]), (pixels[256:384], labels[256:384]), recipe)
    return folder, record


def test_conv_teacher_is_a_timm_folder_known_by_its_recipe(conv_teacher: tuple[Path, dict]) -> None:
    folder, record = conv_teacher
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "convnext_atto" and config["model_args"]["dims"] == [16, 32, 64, 128]
    assert record["kind"] == "cnn" and 0 <= record["val_top1"] <= 1 and record["val_images"] == 128
    assert trained_record(folder, replace(ConvReferenceRecipe(), epochs=2)) == json.loads(json.dumps(record))
    assert trained_record(folder, ConvReferenceRecipe()) is None and trained_record(folder, ReferenceRecipe()) is None


def test_conv_teacher_caches_three_levels_on_three_grids_with_its_head(
    tmp_path: Path, digit_shards: list[str], conv_teacher: tuple[Path, dict]
) -> None:
    """The demo's --layers 2,3,4: 16x16, 8x8 and 4x4 maps stored as tokens; the head, rebuilt from the recorded ops
    of the final level, gives the teacher's own logits."""
    folder, _ = conv_teacher
    out = tmp_path / "conv.zarr"
    layers = ",".join(map(str, ConvReferenceRecipe.layers))
    result = run_cli(
        "extract", *digit_shards, "--out", out, "--teacher", f"local-dir:{folder}", "--layers", layers,
        "--dtype", "float32", *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    cache = FeatureCache.open(str(out))
    assert [(level.layer, level.grid, level.dim, level.prefix_tokens) for level in cache.spec.levels] == [
        (2, (16, 16), 32, 0),
        (3, (8, 8), 64, 0),
        (4, (4, 4), 128, 0),
    ]
    head = TeacherHead(*cache.head())
    assert head.needs_full_grid and [op["type"] for op in head.ops] == ["pool", "layernorm", "flatten", "linear"]
    samples = 0
    for data in iter_subset(cache, sample_subset(cache, 0, 0), 40):
        assert [tokens.shape[1:] for tokens in data.tokens] == [(256, 32), (64, 64), (16, 128)]
        np.testing.assert_allclose(head(torch.from_numpy(data.tokens[-1])).numpy(), data.logits, atol=1e-4, rtol=1e-4)
        samples += len(data.logits)
    assert samples == 120


def test_demo_refuses_a_folder_of_the_other_teacher_kind(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    (out / "teacher").mkdir(parents=True)
    (out / "teacher" / "training.json").write_text(json.dumps({"architecture": ReferenceRecipe.architecture}))
    result = run_main(capsys, "demo", "--teacher-kind", "cnn", "--out", out)
    assert result.returncode == 2
    assert "--teacher-kind cnn" in one_error_line(result.stderr) and "another --out" in result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["teacher"]  # refused before writing anything
