"""Token metrics shared by the stages that compare stored or recomputed tokens with the teacher's: extraction
records :func:`min_token_cosine` for lossy storage (float16, int8, low rank) and ``verify`` checks recomputed
tokens against it. Pure numpy."""

from __future__ import annotations

import numpy as np


def min_token_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest cosine between matching tokens of ``[..., D]`` arrays (1 where a token is all zeros)."""
    dot = (a * b).sum(-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float(np.where(norms > 0, dot / np.maximum(norms, 1e-30), 1.0).min())
