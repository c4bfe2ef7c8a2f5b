"""The teacher's input normalisation, from a cache's data config: the one place uint8 pixels become model input.

Used by the teacher at extraction and by the student everywhere after (training, evaluation, islands, embed),
so both see exactly the same numbers. No timm import: stage two never loads teacher code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class PixelNormalizer(nn.Module):
    """uint8 pixels ``[B, C, H, W]`` -> ``(pixels / 255 - mean) / std`` per channel (float32)."""

    def __init__(self, data_config: dict[str, Any]) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(data_config["mean"], dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(data_config["std"], dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return (pixels.to(self.mean.device, non_blocking=True).float() / 255.0 - self.mean) / self.std
