"""Per-location token moments of one cache level (:class:`TokenMoments`): what a student standardises its targets
with and its constant baseline, summed over shard groups without reading tokens. Pure numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenMoments:
    """First and second moments of one level's tokens per location over ``count`` samples (float64 ``[T, D]``).

    Stored per shard group (``moments/<layer>``, shape ``[2, T, D]``: sums, sums of squares) so that any set of
    complete shards can be summed without reading tokens: the student's target standardisation and the
    constant baseline (the mean token per location) come from here.
    """

    count: int
    sums: np.ndarray
    squares: np.ndarray

    @classmethod
    def of(cls, tokens: np.ndarray) -> TokenMoments:
        """Moments of float tokens ``[B, T, D]``."""
        values = tokens.astype(np.float64)
        return cls(len(values), values.sum(0), np.square(values).sum(0))

    def __add__(self, other: TokenMoments) -> TokenMoments:
        return TokenMoments(self.count + other.count, self.sums + other.sums, self.squares + other.squares)

    @property
    def mean(self) -> np.ndarray:
        """The mean token per location ``[T, D]`` (the constant baseline predictor)."""
        return self.sums / max(self.count, 1)

    @property
    def variance(self) -> np.ndarray:
        """Per-location, per-channel variance ``[T, D]`` (population, clipped at 0)."""
        return np.maximum(self.squares / max(self.count, 1) - np.square(self.mean), 0.0)
