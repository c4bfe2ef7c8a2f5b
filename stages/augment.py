"""Train-time augmentation that stays consistent with the cached teacher tokens.

A cache fixes one view per image. :func:`draw_views` draws, per sample, a horizontal flip (p = 0.5) and/or a
random resized crop (scale and aspect ranges as timm's ``RandomResizedCrop``, each side at least
``MIN_CROP_CELLS`` cells of the finest grid); :meth:`Views.images` applies them to the pixels and :meth:`Views.tokens`
to every level's token grid, each on its own grid, so the targets follow the pixels without the teacher:

- flip: the pixels' columns and the grid's columns are mirrored (row-major ``[B, prefix + h*w, D]``);
- crop: the pixels and the ``h x w`` token map are resampled over the same box (pixel units for the image, grid
  units for the tokens) with RoIAlign (``torchvision.ops.roi_align``, ``aligned=True``): the crop is resized back
  to the input size, the token map to the grid by bilinear pooling;
- prefix tokens (CLS, registers) are kept as cached.

A ViT's tokens are not exactly flip- or crop-equivariant, so the targets approximate what the teacher would
say of the augmented image (``apmpipe bench augment`` measures how well). Draws come from a generator seeded by
(seed, rank, step), like the location draws: a resumed run augments exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.ops import roi_align

from apmpipe.storage.errors import ConfigError

from .runtime import to_device

AUGMENTS = ("flip", "crop")
CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratio range (width / height), as timm's RandomResizedCrop
MIN_CROP_CELLS = 3  # a crop spans at least this many grid cells per side (a smaller one has no token map to pool)
_SALT = 0x0A06  # keeps augmentation draws apart from the location draws of the same step


def parse_augments(names: tuple[str, ...]) -> tuple[str, ...]:
    """The augmentations in canonical order (``none`` or empty: off); ConfigError for an unknown name."""
    unknown = [name for name in names if name not in (*AUGMENTS, "none")]
    if unknown:
        raise ConfigError(f"--augment {unknown[0]!r} is not one of {', '.join(AUGMENTS)}; e.g. --augment flip,crop")
    return tuple(name for name in AUGMENTS if name in names)


def check_crop_scale(scale: tuple[float, float]) -> None:
    """ConfigError unless ``scale`` is (min, max) area fractions with 0 < min <= max <= 1."""
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"--crop-scale needs MIN,MAX with 0 < MIN <= MAX <= 1, e.g. --crop-scale 0.08,1; got {scale}")


def augment_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """The generator of one step's augmentation: distinct per seed, stream (DDP rank) and step."""
    return torch.Generator().manual_seed(hash((_SALT, seed, stream, step)) & 0x7FFF_FFFF_FFFF_FFFF)


def _resample(maps: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, C, H, W]`` maps, one box ``[B, 4]`` (x0, y0, x1, y1 in map units) each -> ``[B, C, *size]``."""
    rois = torch.cat([torch.arange(len(maps), device=maps.device, dtype=torch.float32)[:, None], boxes], dim=1)
    return roi_align(maps.float(), rois, size, spatial_scale=1.0, sampling_ratio=-1, aligned=True).to(maps.dtype)


@dataclass(frozen=True)
class Views:
    """One batch's augmentation: which samples are flipped, and each sample's crop box in pixels.

    Args:
        flip: ``[B]`` bool, or None (no flips).
        boxes: ``[B, 4]`` float (x0, y0, x1, y1) within ``[0, W] x [0, H]``, or None (no crops).
        image_size: (H, W) of the images.
    """

    flip: torch.Tensor | None
    boxes: torch.Tensor | None
    image_size: tuple[int, int]

    def _apply(self, maps: torch.Tensor, boxes: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
        if boxes is not None:
            maps = _resample(maps, to_device(boxes, maps.device), size)
        if self.flip is not None:
            flip = to_device(self.flip, maps.device)[:, None, None, None]
            maps = torch.where(flip, maps.flip(-1), maps)
        return maps

    def images(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` (any affine pixel scale: raw or normalised) -> the augmented images."""
        return self._apply(images, self.boxes, self.image_size)

    def tokens(self, tokens: torch.Tensor, grid: tuple[int, int], prefix_tokens: int) -> torch.Tensor:
        """One level's tokens ``[B, prefix + h*w, D]`` on its ``grid`` (h, w) -> the tokens of the augmented image
        (the ``prefix_tokens`` kept)."""
        b, _, d = tokens.shape
        h, w = grid
        grid_boxes = None
        if self.boxes is not None:
            cell = torch.tensor(
                [w / self.image_size[1], h / self.image_size[0]] * 2, dtype=torch.float32, device=self.boxes.device
            )
            grid_boxes = self.boxes * cell
        maps = tokens[:, prefix_tokens:].transpose(1, 2).reshape(b, d, h, w)
        maps = self._apply(maps, grid_boxes, grid)
        return torch.cat([tokens[:, :prefix_tokens], maps.flatten(2).transpose(1, 2)], dim=1)


def crop_boxes(
    batch: int,
    image_size: tuple[int, int],
    grid: tuple[int, int],
    scale: tuple[float, float],
    generator: torch.Generator,
) -> torch.Tensor:
    """``[B, 4]`` random resized crop boxes (x0, y0, x1, y1) in pixels: area ``scale`` x the image's, aspect in
    ``CROP_RATIO`` (log-uniform; moved towards the image's own where the box would not fit, so area 1 is the whole
    image), each side at least ``MIN_CROP_CELLS`` grid cells."""
    height, width = image_size
    u = torch.rand(batch, 4, generator=generator, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1]).clamp(area / height**2, width**2 / area)  # fits inside
    min_w, min_h = (min(size, MIN_CROP_CELLS * size / cells) for size, cells in ((width, grid[1]), (height, grid[0])))
    w = (area * ratio).sqrt().clamp(min_w, width)
    h = (area / ratio).sqrt().clamp(min_h, height)
    x0, y0 = u[:, 2] * (width - w), u[:, 3] * (height - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1).float()


def draw_views(
    augments: tuple[str, ...],
    batch: int,
    image_size: tuple[int, int],
    grid: tuple[int, int],
    generator: torch.Generator,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> Views:
    """One batch's :class:`Views` for ``augments`` (names from :data:`AUGMENTS`), drawn from ``generator``; crops
    span at least ``MIN_CROP_CELLS`` cells of ``grid`` (the finest grid)."""
    flip = torch.rand(batch, generator=generator) < 0.5 if "flip" in augments else None
    boxes = crop_boxes(batch, image_size, grid, crop_scale, generator) if "crop" in augments else None
    return Views(flip, boxes, image_size)
