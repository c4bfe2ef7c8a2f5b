"""The teacher's geometric preprocessing, from timm's eval transform (no model is built)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import MaybePILToTensor, MaybeToTensor, ToTensor
from torchvision import transforms as T


def pixel_transform(data_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval transform without ToTensor/Normalize: PIL image -> uint8 ``[C, H, W]`` the teacher sees."""
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    full = create_transform(**cfg, is_training=False)
    geometric = [
        t
        for t in full.transforms
        if not isinstance(t, (ToTensor, MaybeToTensor, MaybePILToTensor, T.ToTensor, T.Normalize))
    ]
    return T.Compose([*geometric, T.PILToTensor()])
