"""Small trained timm teachers for when no pretrained one can be had (offline demo, tests, ablations).

A random-init teacher's tokens are smooth functions of the pixels and flatter every student, so science
defaults are judged on a *trained* one. :func:`train_reference_teacher` trains one of two kinds on labelled
grayscale images on torch's threads (the CLI's --threads or the free cores): the ViT of :class:`ReferenceRecipe`
(patch 4, one 8x8 grid; by default 2 blocks, 64 wide, about a minute on 2 idle CPU cores;
:meth:`ReferenceRecipe.harder` a 4-block, 96-wide one trained with random affine augmentation, for
native-resolution images whose tokens do not flatter a student as upscaled 8x8 digits' smooth ones do) or the
hierarchical ConvNet of :class:`ConvReferenceRecipe` (a 4-stage ConvNeXt on grids 32, 16, 8 and 4). It saves it as
a timm ``local-dir:`` folder (``config.json`` with its data config + ``model.safetensors``, written by timm's own
exporter) plus ``training.json`` (recipe, accuracy, time). :func:`trained_record` finds a folder trained with the
same recipe.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import timm
import torch
import torch.nn.functional as F

from apmpipe.storage.errors import ConfigError

MEAN, STD = 0.5, 0.5
TRAINING_FILE = "training.json"
StepCallback = Callable[[int, int, dict[str, float]], None]  # (step, total steps, {loss, epoch, samples_per_s})


@dataclass(frozen=True)
class ReferenceRecipe:
    """Architecture and schedule of the reference ViT (its identity: a different recipe retrains)."""

    kind: ClassVar[str] = "vit"
    family: ClassVar[str] = "ViT"
    architecture: ClassVar[str] = "vit_tiny_patch16_224"

    image_size: int = 32
    patch_size: int = 4
    embed_dim: int = 64
    depth: int = 2
    num_heads: int = 2
    mlp_ratio: float = 2.0
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    augment: bool = False  # a random rotation, scale and shift of every training image, drawn per step
    seed: int = 0

    @property
    def layers(self) -> tuple[int, ...]:
        """The levels worth caching, on one 8x8 grid: the middle block and the last (whose tokens the head reads)."""
        return self.depth // 2, self.depth

    @classmethod
    def harder(cls, seed: int = 0) -> ReferenceRecipe:
        """The harder teacher: twice the blocks, 1.5x the width, augmented, a few epochs over many images."""
        return cls(embed_dim=96, depth=4, num_heads=3, epochs=4, batch_size=128, augment=True, seed=seed)

    def model_args(self, num_classes: int) -> dict[str, Any]:
        return {
            "img_size": self.image_size,
            "patch_size": self.patch_size,
            "in_chans": 1,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "num_classes": num_classes,
        }

    def describe(self) -> str:
        return f"{self.depth} blocks, patch {self.patch_size}, width {self.embed_dim}"


@dataclass(frozen=True)
class ConvReferenceRecipe:
    """Architecture and schedule of the hierarchical reference teacher: timm's ConvNeXt with one block per stage, a
    patch-1 stem and small kernels, so that 32 px inputs give stages on grids 32, 16, 8 and 4 (its identity: a
    different recipe retrains)."""

    kind: ClassVar[str] = "cnn"
    family: ClassVar[str] = "ConvNeXt"
    architecture: ClassVar[str] = "convnext_atto"
    layers: ClassVar[tuple[int, ...]] = (2, 3, 4)  # the levels worth caching: grids 16, 8 and 4 (4: the head's)

    image_size: int = 32
    depths: tuple[int, ...] = (1, 1, 1, 1)
    dims: tuple[int, ...] = (16, 32, 64, 128)
    kernel_size: int = 3
    epochs: int = 15
    batch_size: int = 64
    lr: float = 5e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    augment: bool = False  # as the ViT's; off: the figures were measured without it
    seed: int = 0

    def model_args(self, num_classes: int) -> dict[str, Any]:
        return {
            "in_chans": 1,
            "depths": self.depths,
            "dims": self.dims,
            "patch_size": 1,
            "kernel_sizes": self.kernel_size,
            "num_classes": num_classes,
        }

    def describe(self) -> str:
        blocks, widths = ("/".join(map(str, values)) for values in (self.depths, self.dims))
        return f"{len(self.depths)} stages of {blocks} blocks, widths {widths}, kernel {self.kernel_size}"


Recipe = ReferenceRecipe | ConvReferenceRecipe
RECIPES: dict[str, type[Recipe]] = {recipe.kind: recipe for recipe in (ReferenceRecipe, ConvReferenceRecipe)}


def _normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W]`` -> normalised float ``[N, 1, H, W]``."""
    return (torch.from_numpy(images).float()[:, None] / 255.0 - MEAN) / STD


def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def _augmented(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``images`` ``[B, 1, H, W]`` each rotated by up to 10 degrees, scaled by 0.9..1.1, shifted by up to 5 %."""
    count = len(images)
    angle = (torch.rand(count, generator=generator) * 2 - 1) * np.deg2rad(10)
    scale = 0.9 + 0.2 * torch.rand(count, generator=generator)
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * 0.1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def _fit(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    on_step: StepCallback | None = None,
) -> None:
    """AdamW, one-cycle schedule, label smoothing; a seeded sample order (and augmentation, when the recipe asks).
    ``on_step`` follows every step."""
    steps_per_epoch = len(labels) // recipe.batch_size
    total, start = recipe.epochs * steps_per_epoch, time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, recipe.lr, total_steps=recipe.epochs * steps_per_epoch, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            inputs = _augmented(images[batch], generator) if recipe.augment else images[batch]
            loss = F.cross_entropy(model(inputs), labels[batch], label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if on_step:
                done = epoch * steps_per_epoch + step + 1
                rate = done * recipe.batch_size / max(time.perf_counter() - start, 1e-9)
                on_step(done, total, {"loss": loss.item(), "epoch": epoch, "samples_per_s": rate})


def train_reference_teacher(
    out_dir: str | Path,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    recipe: Recipe = ReferenceRecipe(),
    data_note: str = "",
    on_step: StepCallback | None = None,
) -> dict[str, Any]:
    """Train the reference teacher of ``recipe`` on ``train`` (uint8 ``[N, H, W]`` images, int labels), save it to
    ``out_dir``; ``on_step(step, total, record)`` follows the training.

    Returns the contents of ``training.json`` (recipe, train/val top-1, seconds, threads, data note).
    """
    images, labels = train
    if images.ndim != 3 or images.shape[1:] != (recipe.image_size, recipe.image_size):
        raise ConfigError(
            f"the reference teacher trains on {recipe.image_size}x{recipe.image_size} grayscale images, "
            f"got {images.shape[1:]}"
        )
    num_classes = int(max(labels.max(), val[1].max())) + 1
    start = time.perf_counter()
    model, record = _train(images, labels, val, recipe, num_classes, on_step)
    record.update(
        {
            "data": data_note,
            "seconds": time.perf_counter() - start,
            "torch": torch.__version__,
            "timm": timm.__version__,
        }
    )
    _save(model, Path(out_dir), recipe, record)
    return record


def _train(
    images: np.ndarray,
    labels: np.ndarray,
    val: tuple[np.ndarray, np.ndarray],
    recipe: Recipe,
    num_classes: int,
    on_step: StepCallback | None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained model and its record (recipe, train/val top-1, the threads it trained on: float sums, and so the
    exact weights, depend on them)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = timm.create_model(recipe.architecture, pretrained=False, **recipe.model_args(num_classes))
        train_x, train_y = _normalise(images), torch.from_numpy(labels).long()
        _fit(model, train_x, train_y, recipe, on_step)
    return model, {
        "architecture": recipe.architecture,
        "kind": recipe.kind,
        "recipe": asdict(recipe),
        "num_classes": num_classes,
        "train_top1": _accuracy(model, train_x, train_y),
        "val_top1": _accuracy(model, _normalise(val[0]), torch.from_numpy(val[1]).long()),
        "train_images": int(len(labels)),
        "val_images": int(len(val[1])),
        "threads": torch.get_num_threads(),
    }


def _save(model: torch.nn.Module, out_dir: Path, recipe: Recipe, record: dict[str, Any]) -> None:
    """Write the folder next to ``out_dir`` and rename it into place (a killed run leaves no half folder)."""
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    data_config = {
        "input_size": (1, recipe.image_size, recipe.image_size),
        "mean": (MEAN,),
        "std": (STD,),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
    }
    identity = {"pretrained_cfg": {"tag": "apmpipe-reference", "license": "apache-2.0"}}
    timm.models.save_for_hf(
        model,
        str(staging),
        model_config=identity,
        model_args=recipe.model_args(record["num_classes"]),
        safe_serialization=True,
        data_config=data_config,
    )
    (staging / TRAINING_FILE).write_text(json.dumps(record, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)


def trained_record(out_dir: str | Path, recipe: Recipe = ReferenceRecipe()) -> dict[str, Any] | None:
    """``training.json`` of a finished reference teacher in ``out_dir`` made with ``recipe``, else None."""
    path = Path(out_dir) / TRAINING_FILE
    if not (path.is_file() and (Path(out_dir) / "model.safetensors").is_file()):
        return None
    record = json.loads(path.read_text())
    return record if record.get("recipe") == json.loads(json.dumps(asdict(recipe))) else None
