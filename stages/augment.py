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

import hashlib
import math
from dataclasses import dataclass

import torch
from torchvision.ops import roi_align

from apmpipe.storage.format import AUGMENTS, check_crop_scale, parse_augments

__all__ = ["AUGMENTS", "check_crop_scale", "parse_augments"]  # the names live with the cache's view_augment

from .runtime import step_seed, to_device

CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratio range (width / height), as timm's RandomResizedCrop
MIN_CROP_CELLS = 3  # a crop spans at least this many grid cells per side (a smaller one has no token map to pool)
_SALT = 0x0A06  # keeps augmentation draws apart from the location draws of the same step


def augment_generator(seed: int, stream: int, step: int) -> torch.Generator:
    """The generator of one step's augmentation: distinct per seed, stream (DDP rank) and step."""
    return torch.Generator().manual_seed(step_seed(_SALT, seed, stream, step))


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


def view_generator(key: str, view: int) -> torch.Generator:
    """The generator of view ``view`` of the image stored under ``key`` at extraction (``extract --views``): a
    function of the two alone, so a rerun, another batch size or another worker draws the same view."""
    digest = hashlib.sha256(f"apmpipe-view/{key}/{view}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


def key_views(
    augments: tuple[str, ...],
    keys: list[str],
    view: int,
    image_size: tuple[int, int],
    grid: tuple[int, int],
    crop_scale: tuple[float, float],
) -> Views:
    """View ``view`` of each image, drawn from :func:`view_generator` of its key (one generator per image)."""
    drawn = [draw_views(augments, 1, image_size, grid, view_generator(key, view), crop_scale) for key in keys]
    flip = torch.cat([d.flip for d in drawn]) if "flip" in augments else None
    boxes = torch.cat([d.boxes for d in drawn]) if "crop" in augments else None
    return Views(flip, boxes, image_size)


def view_parameters(views: Views, batch: int) -> torch.Tensor:
    """``[B, 5]`` float32 per image: flip (0 or 1), then the crop box x0, y0, x1, y1 in pixels (the whole image
    when there is no crop): what ``extract --views`` stores beside each view."""
    height, width = views.image_size
    flip = torch.zeros(batch) if views.flip is None else views.flip.float()
    boxes = torch.tensor([[0.0, 0.0, width, height]]).expand(batch, 4) if views.boxes is None else views.boxes
    return torch.cat([flip[:, None], boxes.float()], dim=1)


def view_pixels(pixels: torch.Tensor, views: Views) -> torch.Tensor:
    """uint8 images ``[B, C, H, W]`` -> the uint8 images of ``views`` (rounded: what the teacher sees is stored)."""
    return views.images(pixels.float()).round().clamp(0, 255).to(torch.uint8)
