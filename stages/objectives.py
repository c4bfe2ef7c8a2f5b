"""What the student is trained to match, shared by training, evaluation and test-time training.

* Location sampling: every step queries all prefix tokens (CLS, registers: the tokens a head reads) plus
  ``K`` random grid locations per image, drawn from a generator seeded by (seed, rank or sample, step). Levels
  on their own grids each draw their own locations (see :func:`sample_level_locations`).
* Token loss per level, on standardised targets (``apm.TargetScale``): MSE over grid tokens plus
  ``prefix_weight`` x MSE over prefix tokens, plus optionally ``cosine_weight`` x (1 - cosine) in teacher units.
* Decision loss: KL divergence at temperature ``kd_temperature`` between the teacher's frozen head applied to
  the student's final-level tokens and the teacher's cached logits (the teacher itself is never built).
* Pixel loss: MSE of the predicted pixels of the queried grid cells (the paper's f_rgb).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from apmpipe.storage.errors import NON_NEGATIVE, POSITIVE, ConfigError, Range, check_ranges

from .apm import APM, APMConfig, Locations, patch_pixels
from .runtime import step_seed, to_device


@dataclass(frozen=True)
class LossConfig:
    """Weights of the training objective (saved with the student, reused by test-time training).

    Args:
        mse_weight: MSE on standardised tokens, per level.
        prefix_weight: extra weight of the prefix tokens' MSE (they are 1 query in ``1 + K``).
        cosine_weight: 1 - cosine in teacher units, per level.
        logit_weight: KL through the teacher's stored head (0 disables; ignored when the cache has no head).
        kd_temperature: temperature of that KL (the loss is scaled by T^2, as in Hinton et al.).
        rgb_weight: MSE of the queried cells' pixels.
    """

    mse_weight: float = 1.0
    prefix_weight: float = 1.0
    cosine_weight: float = 0.0
    logit_weight: float = 1.0
    kd_temperature: float = 2.0
    rgb_weight: float = 0.1

    RANGES: ClassVar[dict[str, Range]] = {
        "mse_weight": NON_NEGATIVE,
        "prefix_weight": NON_NEGATIVE,
        "cosine_weight": NON_NEGATIVE,
        "logit_weight": NON_NEGATIVE,
        "kd_temperature": POSITIVE,
        "rgb_weight": NON_NEGATIVE,
    }

    def __post_init__(self) -> None:
        check_ranges(vars(self), self.RANGES)
        if self.mse_weight + self.cosine_weight + self.logit_weight == 0:
            raise ConfigError("nothing to learn: set --mse-weight, --cosine-weight or --logit-weight above 0")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossConfig:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def location_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """A generator for one step's locations: distinct per seed, per stream (DDP rank or TTT sample) and step."""
    return torch.Generator().manual_seed(step_seed(seed, stream, step))


def sample_locations(
    batch: int, prefix_tokens: int, grid_tokens: int, count: int, generator: torch.Generator
) -> torch.Tensor | None:
    """``[B, prefix + count]`` token indices: every prefix token, then ``count`` random grid locations per image.

    None (query everything) when ``count`` is 0 or covers the grid.
    """
    if not count or count >= grid_tokens:
        return None
    grid = torch.rand(batch, grid_tokens, generator=generator).argsort(dim=1)[:, :count] + prefix_tokens
    prefix = torch.arange(prefix_tokens).expand(batch, -1)
    return torch.cat([prefix, grid], dim=1)


def sample_level_locations(
    config: APMConfig, batch: int, count: int, generator: torch.Generator, whole: Collection[int] = ()
) -> Locations:
    """One step's locations for a student: :func:`sample_locations` on the shared grid (one-grid students), or one
    draw per level on that level's grid, in level order from the same ``generator``: ``count`` locations on every
    level (all of a level whose grid has no more), which trained better than ``count`` in units of the finest grid
    (held-out R^2 higher on every level of a 3-grid ResNet cache; docs/train.md). Levels in ``whole`` (see
    :func:`whole_levels`) are queried whole."""
    if config.one_grid:
        return sample_locations(batch, config.prefix_tokens, config.num_tokens - config.prefix_tokens, count, generator)
    return [
        sample_locations(batch, prefix, h * w, 0 if level in whole else count, generator)
        for level, (prefix, (h, w)) in enumerate(zip(config.prefixes, config.grids, strict=True))
    ]


def whole_levels(config: APMConfig, head: nn.Module | None) -> tuple[int, ...]:
    """Levels a student on several grids queries whole every step: the final level when the teacher head that the
    decision loss runs (None: off) reads its whole map (a ConvNet's), so that loss is never skipped."""
    if config.one_grid or head is None or not head.needs_full_grid:
        return ()
    return (len(config.level_dims) - 1,)


def locations_to(locations: Locations, device: torch.device) -> Locations:
    """``locations`` (one tensor, one per level, or None) on ``device``."""
    if isinstance(locations, list):
        return [None if where is None else to_device(where, device) for where in locations]
    return None if locations is None else to_device(locations, device)


def gather_tokens(tokens: torch.Tensor, locations: torch.Tensor | None) -> torch.Tensor:
    """``[B, T, D]`` -> ``[B, L, D]`` at per-image ``locations`` ``[B, L]`` (None: unchanged)."""
    if locations is None:
        return tokens
    return torch.gather(tokens, 1, locations[..., None].expand(-1, -1, tokens.shape[-1]))


def _split_mse(pred: torch.Tensor, target: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grid MSE, prefix MSE or None) of ``[B, L, D]`` tensors whose first ``prefix`` positions are prefix tokens."""
    squared = (pred.float() - target) ** 2
    grid = squared[:, prefix:].mean() if squared.shape[1] > prefix else squared.new_zeros(())
    return grid, squared[:, :prefix].mean() if prefix else None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at ``temperature``, times T^2 (gradient scale independent of T)."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


@dataclass
class Losses:
    """One step's loss terms (``total`` is what is minimised); per-level entries are token losses."""

    total: torch.Tensor
    levels: list[torch.Tensor]
    logits: torch.Tensor | None = None
    rgb: torch.Tensor | None = None

    def record(self, layers: list[int]) -> dict[str, float]:
        """Plain floats for logging."""
        out = {
            "loss": float(self.total.detach()),
            **{f"loss_level_{layer}": float(v.detach()) for layer, v in zip(layers, self.levels, strict=True)},
        }
        if self.logits is not None:
            out["loss_logits"] = float(self.logits.detach())
        if self.rgb is not None:
            out["loss_rgb"] = float(self.rgb.detach())
        return out


def distillation_losses(
    model: APM,
    out: dict[str, Any],
    targets: list[torch.Tensor],
    locations: Locations,
    images: torch.Tensor,
    config: LossConfig,
    head: nn.Module | None = None,
    teacher_logits: torch.Tensor | None = None,
) -> Losses:
    """The objective for one batch.

    Args:
        model: the (unwrapped) student, for its target scales and cell size.
        out: ``model(images, locations)``.
        targets: the teacher's tokens per level at its ``locations`` ``[B, L_l, D_l]`` (teacher units).
        locations: ``[B, L]`` with the prefix tokens first (see :func:`sample_locations`), or None for all; one
            per level for a student on several grids.
        images: the normalised images (rgb target).
        head: the teacher's frozen head (final level tokens -> logits); with ``teacher_logits`` enables the KL. A
            token head (ViT) pools the queried grid tokens; a map head (ConvNet) needs every location queried.
    """
    per_level = model.level_locations(locations)
    levels = []
    for scale, z, tokens, target, where, prefix in zip(
        model.scales, out["standardized"], out["tokens"], targets, per_level, model.config.prefixes, strict=True
    ):
        grid_mse, prefix_mse = _split_mse(z, scale.standardize(target, where), prefix)
        loss = config.mse_weight * (grid_mse + (config.prefix_weight * prefix_mse if prefix_mse is not None else 0.0))
        if config.cosine_weight:
            loss = (
                loss + config.cosine_weight * (1 - F.cosine_similarity(tokens.float(), target.float(), dim=-1)).mean()
            )
        levels.append(loss)
    total = sum(levels)
    logits = None
    if (
        config.logit_weight
        and head is not None
        and teacher_logits is not None
        and (per_level[-1] is None or not head.needs_full_grid)
    ):
        logits = kd_loss(head(out["tokens"][-1]), teacher_logits, config.kd_temperature)
        total = total + config.logit_weight * logits
    rgb = None
    if config.rgb_weight and out["rgb"] is not None:
        rgb = rgb_loss(model, out["rgb"], images, per_level[model.config.finest_level])
        total = total + config.rgb_weight * rgb
    return Losses(total, levels, logits, rgb)


def rgb_loss(model: APM, rgb: torch.Tensor, images: torch.Tensor, locations: torch.Tensor | None) -> torch.Tensor:
    """MSE between predicted and true (normalised) pixels of the queried cells of the finest grid (``locations``:
    that level's); prefix tokens have none."""
    cfg = model.config
    images = model.fit_input(images)
    if locations is None:
        return F.mse_loss(rgb[:, cfg.prefix_tokens :].float(), patch_pixels(images, cfg.patch_size))
    grid = locations[:, cfg.prefix_tokens :] - cfg.prefix_tokens  # prefix tokens come first
    return F.mse_loss(rgb[:, cfg.prefix_tokens :].float(), patch_pixels(images, cfg.patch_size, grid))
