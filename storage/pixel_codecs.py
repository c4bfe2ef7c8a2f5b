"""The stored form of cached pixels (``--pixel-codec``): uint8 ``[C, H, W]`` as they are (``raw``) or, for C = 1
or 3, one PNG, WebP or JPEG image per sample, and back.

Pure (bytes in, arrays out). PNG and lossless WebP decode to the identical pixels; JPEG (quality
``JPEG_QUALITY``, Pillow's default 4:2:0 chroma subsampling for colour) is lossy and its cost is measured by
:func:`psnr`. ``storage/format.py`` decides where the bytes live.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from .errors import CacheError

IMAGE_CODECS = ("png", "webp", "jpeg")
PIXEL_CODECS = ("raw", *IMAGE_CODECS)
LOSSY_CODECS = ("jpeg",)
IMAGE_CHANNELS = (1, 3)
JPEG_QUALITY = 90
_SAVE = {
    "png": {"format": "PNG"},
    "webp": {"format": "WEBP", "lossless": True},
    "jpeg": {"format": "JPEG", "quality": JPEG_QUALITY},
}


def _mode(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def encode_images(pixels: np.ndarray, codec: str) -> np.ndarray:
    """uint8 ``[B, C, H, W]`` -> object array ``[B]`` of encoded ``bytes``."""
    out = np.empty(len(pixels), dtype=object)
    for i, image in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(image[0] if len(image) == 1 else image.transpose(1, 2, 0), _mode(len(image))).save(
            buffer, **_SAVE[codec]
        )
        out[i] = buffer.getvalue()
    return out


def decode_images(encoded: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Object array ``[B]`` of encoded bytes -> uint8 ``[B, C, H, W]`` of ``shape`` ``(C, H, W)``."""
    channels, height, width = shape
    out = np.empty((len(encoded), *shape), dtype=np.uint8)
    for i, data in enumerate(encoded):
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert(_mode(channels)) if image.mode != _mode(channels) else image
            array = np.asarray(image)
        if array.shape[:2] != (height, width):
            raise CacheError(
                f"a stored image decodes to {array.shape[1]}x{array.shape[0]} pixels, not "
                f"{width}x{height}; the shard is damaged: re-extract it"
            )
        out[i] = array[None] if channels == 1 else array.transpose(2, 0, 1)
    return out


def encode_pixels(pixels: np.ndarray, codec: str) -> np.ndarray:
    """uint8 pixels ``[B, C, H, W]`` in the stored form of ``--pixel-codec``: as they are for ``raw``, else one
    encoded image (``bytes``) per sample, an object array ``[B]``."""
    return pixels if codec == "raw" else encode_images(pixels, codec)


def decode_pixels(stored: np.ndarray, codec: str, shape: tuple[int, int, int]) -> np.ndarray:
    """Stored pixels (see :func:`encode_pixels`) back to uint8 ``[B, C, H, W]``."""
    return stored if codec == "raw" else decode_images(stored, shape)


def psnr(squared_error: float, count: int) -> float:
    """Peak signal-to-noise ratio in dB of 8-bit pixels from the summed squared error over ``count`` values
    (capped at 100 dB: identical pixels, kept finite for JSON attributes)."""
    mse = squared_error / max(count, 1)
    return 100.0 if mse <= 1e-10 else min(100.0, 10 * math.log10(255.0**2 / mse))
