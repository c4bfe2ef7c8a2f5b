"""Held-out fidelity while a student trains (``apmpipe train --val CACHE``).

Every ``--val-every`` steps :class:`HeldOut` scores the student on a seeded subset of a held-out cache of the same
teacher: R^2 of every level's patch and prefix tokens against the mean-token baseline (the training cache's mean
token per location, held by the student), as ``apmpipe eval`` reports them. :class:`Selection` keeps the weights of
the best score, which the run exports, and says when ``--patience`` scores in a row did not beat it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from apmpipe.storage.cache import FeatureCache
from apmpipe.storage.errors import ModelError
from apmpipe.storage.redact import redact_url
from apmpipe.storage.stream import iter_subset, sample_subset

from .apm import APM
from .fidelity import PARTS, TokenFidelity
from .inputs import PixelNormalizer
from .student import cache_for_student

SCORE = "val_r2"  # the metric a held-out score is ranked by: the mean of its levels' patch and prefix R^2


@dataclass
class HeldOut:
    """A held-out cache's subset (read anew at every score: it is never held in memory) and how to score on it."""

    cache: FeatureCache
    subset: dict[str, np.ndarray]
    normalize: PixelNormalizer
    batch_size: int = 64

    @classmethod
    def open(
        cls, url: str, layout: dict[str, Any], samples: int, seed: int, storage_options: dict[str, Any]
    ) -> HeldOut:
        """The ``--val`` cache, refused when it is unfinished or holds another teacher's tokens (``layout``: the
        training caches' layout, ``--levels`` applied)."""
        cache = FeatureCache.open(url, storage_options=storage_options)
        if not cache.complete_shards():
            raise ModelError(f"--val cache {redact_url(url)!r} has no complete shard; finish it with apmpipe extract")
        cache = cache_for_student({"layout": layout}, cache, "--val cache")
        return cls(cache, sample_subset(cache, samples, seed), PixelNormalizer(cache.spec.data_config))

    @torch.no_grad()
    def score(self, model: APM, device: torch.device) -> dict[str, float]:
        """``model``'s held-out R^2 per level and part (``val_{part}_r2_L{layer}``) and their mean (:data:`SCORE`)."""
        fidelity = TokenFidelity(model.config.prefixes, [scale.baseline for scale in model.scales])
        normalize, training = self.normalize.to(device), model.training
        model.eval()
        for data in iter_subset(self.cache, self.subset, self.batch_size):
            predicted = model.predict_tokens(normalize(torch.from_numpy(data.pixels).to(device)))
            for index, (level, p, t) in enumerate(zip(self.cache.spec.levels, predicted, data.tokens, strict=True)):
                fidelity.add(index, level.layer, p, torch.from_numpy(t).to(device))
        model.train(training)
        scores = {
            f"val_{part}_r2_L{layer}": row[f"{part}_r2"]
            for layer, row in fidelity.report().items()
            for part in PARTS
            if f"{part}_r2" in row
        }
        return {SCORE: float(np.mean(list(scores.values()))), **scores}


@dataclass
class Selection:
    """The best held-out score so far, its step and weights (CPU copies), and the scores since that did not beat it;
    saved in checkpoints so a resumed run selects as an unbroken one would."""

    patience: int = 0
    best: float = float("-inf")
    best_step: int = 0
    since_best: int = 0
    last: float = float("nan")
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def add(self, step: int, score: float, weights: dict[str, torch.Tensor]) -> None:
        """One held-out score of the weights after ``step``."""
        self.last = score
        if score > self.best:
            self.best, self.best_step, self.since_best = score, step, 0
            self.weights = {name: value.detach().to("cpu", copy=True) for name, value in weights.items()}
        else:
            self.since_best += 1

    @property
    def stalled(self) -> bool:
        """``patience`` scores in a row did not beat the best (never with patience 0)."""
        return 0 < self.patience <= self.since_best

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "since_best": self.since_best,
            "last": self.last,
            "weights": self.weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = float(state["best"]), int(state["best_step"])
        self.since_best, self.last, self.weights = int(state["since_best"]), float(state["last"]), state["weights"]

    def summary(self) -> dict[str, Any]:
        """What the run's summary and the exported student's metadata say of the selection."""
        return {"best": self.best, "best_step": self.best_step, "last": self.last, "stopped_early": self.stalled}
