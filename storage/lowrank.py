"""Low-rank token storage: a PCA basis per level, fitted once, and the projection to and from its coefficients.

Pure numpy, no storage: ``storage/format.py`` decides where a basis lives in the cache, ``storage/token_codecs.py``
when it is applied.
A token ``x`` (``[D]``) is stored as ``c = (x - mean) · componentsᵀ`` (``[K]``) and read back as
``mean + c · components``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenBasis:
    """One level's basis: ``mean`` float32 ``[D]`` and ``components`` float32 ``[K, D]`` (orthonormal rows, by
    decreasing variance)."""

    mean: np.ndarray
    components: np.ndarray

    @property
    def rank(self) -> int:
        return int(self.components.shape[0])

    def project(self, tokens: np.ndarray) -> np.ndarray:
        """Coefficients float32 ``[..., K]`` of tokens ``[..., D]``."""
        flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float32, copy=False) - self.mean
        return (flat @ self.components.T).reshape(*tokens.shape[:-1], self.rank)

    def reconstruct(self, coefficients: np.ndarray, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """Tokens ``[..., D]`` in ``dtype`` from coefficients ``[..., K]`` (one BLAS product over all tokens)."""
        flat = coefficients.reshape(-1, self.rank).astype(np.float32, copy=False) @ self.components
        flat += self.mean
        return flat.reshape(*coefficients.shape[:-1], self.mean.shape[0]).astype(dtype, copy=False)


class BasisFit:
    """Accumulates the mean and covariance of tokens (float64) batch by batch, then gives the top-``rank`` basis."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.sums = np.zeros(dim)
        self.products = np.zeros((dim, dim))

    def add(self, tokens: np.ndarray) -> None:
        """Add tokens ``[..., D]`` (every token, prefix tokens included, weighs the same)."""
        flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
        self.count += len(flat)
        self.sums += flat.sum(0)
        self.products += flat.T @ flat

    def basis(self, rank: int) -> tuple[TokenBasis, float]:
        """The ``rank`` principal directions and the fraction of the token variance they explain.

        Signs are fixed (each component's largest-magnitude entry is positive), so equal inputs give equal bases.
        """
        assert 0 < rank <= len(self.sums) and self.count > 0, (rank, self.count)
        mean = self.sums / self.count
        covariance = self.products / self.count - np.outer(mean, mean)
        values, vectors = np.linalg.eigh(covariance)  # ascending
        top = vectors[:, ::-1][:, :rank].T  # [K, D]
        signs = np.sign(top[np.arange(rank), np.abs(top).argmax(1)])
        top = top * np.where(signs == 0, 1.0, signs)[:, None]
        total = float(np.clip(values, 0, None).sum())
        explained = float(np.clip(values[::-1][:rank], 0, None).sum()) / total if total > 0 else 1.0
        return TokenBasis(mean.astype(np.float32), np.ascontiguousarray(top, dtype=np.float32)), explained
