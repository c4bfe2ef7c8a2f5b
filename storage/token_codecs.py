"""The stored form of teacher tokens: float32, float16, or int8 with one float32 scale per token (``--dtype``),
optionally as the coefficients of a low-rank basis (``--rank``, see ``storage/lowrank.py``), and back to floats.

Pure numpy: ``storage/format.py`` decides which arrays hold the values and scales.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import CacheError
from .lowrank import TokenBasis

TOKEN_DTYPES = ("float32", "float16", "int8")
INT8_MAX = 127.0


@dataclass(frozen=True)
class EncodedTokens:
    """Tokens (or, with a basis, their coefficients) in the storage dtype; ``scale`` (float32 ``[B, T]``) only for
    int8."""

    values: np.ndarray
    scale: np.ndarray | None = None


def encode_tokens(tokens: np.ndarray, dtype: str, basis: TokenBasis | None = None) -> EncodedTokens:
    """Encode float32 tokens ``[B, T, D]`` in the storage dtype, as ``[B, T, K]`` coefficients of ``basis`` when
    given; int8 is symmetric per token with a scale.

    Raises CacheError when a value is not finite after encoding (e.g. float16 overflow).
    """
    if basis is not None:
        tokens = basis.project(tokens)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is detected and reported below
        encoded = _encode(tokens, dtype)
    if not _finite(tokens, encoded):
        hint = (
            "use --dtype float32"
            if dtype != "float32"
            else "the teacher itself produced inf/nan; check its weights and inputs"
        )
        raise CacheError(
            f"teacher tokens are not finite in {dtype} (max |x| = {np.nanmax(np.abs(tokens)):.3g}); {hint}"
        )
    return encoded


def _encode(tokens: np.ndarray, dtype: str) -> EncodedTokens:
    if dtype == "int8":
        absmax = np.abs(tokens).max(axis=-1)
        scale = (np.where(absmax > 0, absmax, 1.0) / INT8_MAX).astype(np.float32)
        values = np.clip(np.rint(tokens / scale[..., None]), -INT8_MAX, INT8_MAX).astype(np.int8)
        return EncodedTokens(values, scale)
    return EncodedTokens(tokens.astype(dtype))


def _finite(tokens: np.ndarray, encoded: EncodedTokens) -> bool:
    if encoded.scale is not None:
        return bool(np.isfinite(encoded.scale).all() and np.isfinite(tokens).all())
    return bool(np.isfinite(encoded.values).all())


def decode_tokens(
    values: np.ndarray, scale: np.ndarray | None = None, dtype: Any = np.float32, basis: TokenBasis | None = None
) -> np.ndarray:
    """Stored tokens back to floats ``[B, T, D]`` (float32 by default; float16 halves loader memory), reconstructed
    from their coefficients when stored with ``basis``."""
    if scale is not None:
        values = values.astype(np.float32) * scale[..., None].astype(np.float32)
    if basis is not None:
        return basis.reconstruct(values, dtype)
    return values.astype(dtype, copy=False)
