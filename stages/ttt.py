"""Test-time training (TTT) as the paper means it: per test sample, adapt the student to that one sample's
cached teacher representation for N steps, measure, then reset (episodic: weights, optimiser state and
location draws never carry over from one sample to the next).

Each episode starts from the trained student (or fresh weights with ``start="scratch"``), minimises the
training objective (tokens, plus the KL through the teacher's stored head when the cache has one) with
locations drawn from a generator seeded by (seed, sample, step), and is timed on its adaptation steps alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .apm import APM
from .objectives import (
    LossConfig,
    distillation_losses,
    location_generator,
    locations_to,
    sample_level_locations,
    whole_levels,
)
from .train import adamw, train_step

TTT_START = ("trained", "scratch")


@dataclass(frozen=True)
class TTTConfig:
    """Options of test-time training."""

    steps: int = 0
    lr: float = 1e-4
    locations: int = 0
    start: str = "trained"
    seed: int = 0


@dataclass
class Episode:
    """One sample's adaptation: predicted tokens per level before and after, seconds spent in adaptation steps."""

    before: list[torch.Tensor]
    after: list[torch.Tensor]
    seconds: float
    loss_before: float
    loss_after: float


class EpisodicTTT:
    """Adapts a student to one sample at a time, restoring its starting weights before every sample."""

    def __init__(
        self, model: APM, loss: LossConfig, config: TTTConfig, head: torch.nn.Module | None = None, chunk: int = 256
    ) -> None:
        self.model, self.loss, self.config, self.head, self.chunk = model, loss, config, head, chunk
        model.drop_in_mixer(False)  # few steps on one image, like a run's first ones, where dropout slowed learning
        self.start_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def _reset(self, sample: int) -> None:
        self.model.load_state_dict(self.start_weights)
        if self.config.start == "scratch":
            self.model.reset_parameters(self.config.seed * 1_000_003 + sample)

    def adapt(
        self, sample: int, images: torch.Tensor, targets: list[torch.Tensor], logits: torch.Tensor | None
    ) -> Episode:
        """One episode on ``images`` ``[1, C, H, W]`` (normalised) and its teacher tokens/logits."""
        self._reset(sample)
        model = self.model
        whole = whole_levels(model.config, self.head if self.loss.logit_weight else None)
        before = model.eval().predict_tokens(images, self.chunk)
        loss_before = self.objective(images, targets, logits)
        optimizer = adamw(model.parameters(), images.device, lr=self.config.lr, weight_decay=0.0)
        model.train()
        start = time.perf_counter()
        for step in range(self.config.steps):
            generator = location_generator(self.config.seed, sample, step)
            where = sample_level_locations(model.config, 1, self.config.locations, generator, whole)
            where = locations_to(where, images.device)
            train_step(model, model, optimizer, None, images, targets, where, self.loss, False, 1.0, self.head, logits)
        if images.device.type == "cuda":
            torch.cuda.synchronize(images.device)
        seconds = time.perf_counter() - start
        after = model.eval().predict_tokens(images, self.chunk)
        return Episode(before, after, seconds, loss_before, self.objective(images, targets, logits))

    @torch.no_grad()
    def objective(self, images: torch.Tensor, targets: list[torch.Tensor], logits: torch.Tensor | None) -> float:
        """The training objective on every location of the sample (what the episode minimises)."""
        self.model.eval()
        out = self.model(images)
        return float(distillation_losses(self.model, out, targets, None, images, self.loss, self.head, logits).total)

    def restore(self) -> None:
        """Put the starting weights back (after the last episode)."""
        self.model.load_state_dict(self.start_weights)
