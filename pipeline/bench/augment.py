"""``apmpipe bench augment``: how well ``--augment``'s resampled targets stand for the teacher's tokens on the really
augmented images."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apmpipe.storage.redact import redact_url

from .measure import bench_progress


@dataclass
class AugmentRow:
    """How well ``--augment``'s resampled targets stand for the teacher's tokens on the really augmented images.

    ``cosine[layer][part]``: mean cosine of target and real tokens (``part``: ``patch`` or ``prefix``);
    ``baseline[layer][part]``: the same for the un-augmented cached tokens. ``top1``: the teacher's own top-1 on the
    ``augmented`` and ``original`` images; ``agreement``: how often the argmax of a KL target (``head``: the stored
    head on the augmented tokens; ``cached``: the cached logits) is the teacher's on the augmented image.
    """

    augment: str
    cosine: dict[int, dict[str, float]]
    baseline: dict[int, dict[str, float]]
    top1: dict[str, float]
    agreement: dict[str, float]


def bench_augment(
    workdir: Path, seed: int = 0, crop_scale: tuple[float, float] = (0.08, 1.0), cache: str | None = None
) -> tuple[str, list[AugmentRow]]:
    """:func:`augment_fidelity` on ``cache`` or else on the demo's trained teacher and its held-out (val) cache;
    returns a line naming the teacher, and the rows."""
    from ..demo import DemoPlan, prepare_digit_caches

    if cache:
        made = f"the teacher that made {redact_url(cache)} (rebuilt from the cache)"
        return made, augment_fidelity(cache, seed, crop_scale)
    data = prepare_digit_caches(workdir, DemoPlan.of(False, seed), seed)
    teacher = f"{data.teacher['folder']}: val top-1 {data.teacher['val_top1']:.3f} ({data.teacher['data']})"
    return teacher, augment_fidelity(data.val, seed, crop_scale)


def augment_fidelity(url: str, seed: int = 0, crop_scale: tuple[float, float] = (0.08, 1.0)) -> list[AugmentRow]:
    """The targets ``--augment`` builds from a cache's tokens (every sample flipped; every sample cropped with
    ``crop_scale``) beside the cache's teacher (rebuilt) run on the augmented pixels, per level, patch and prefix
    tokens apart; baseline: the un-augmented cached tokens. The cache needs a stored head."""
    from apmpipe.stages.head import TeacherHead
    from apmpipe.stages.verify import rebuild_teacher
    from apmpipe.storage.cache import FeatureCache
    from apmpipe.storage.errors import CacheError
    from apmpipe.storage.stream import iter_subset, sample_subset

    cache = FeatureCache.open(url)
    stored = cache.head()
    if stored is None:
        raise CacheError(
            f"cache {redact_url(url)!r} stores no teacher head; bench augment needs a teacher with a classifier"
        )
    probe = _AugmentProbe(rebuild_teacher(cache, device="cpu"), TeacherHead(*stored), cache.spec, seed, crop_scale)
    bench_progress("the teacher on every held-out image flipped, and cropped")
    with torch.inference_mode():
        for index, batch in enumerate(iter_subset(cache, sample_subset(cache, 0, 0), 64)):
            probe.measure(index, batch)
    return probe.rows()


def _token_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[B, T, D]`` x 2 -> per-sample mean cosine ``[B]``."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean(1)


@dataclass
class _AugmentProbe:
    """Per-sample measurements of the flipped and cropped targets beside the teacher, batch by batch."""

    teacher: Any
    head: Any
    spec: Any
    seed: int
    crop_scale: tuple[float, float]
    values: dict[str, dict[str, list[torch.Tensor]]] = field(
        default_factory=lambda: {"flip": defaultdict(list), "crop": defaultdict(list)}
    )

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(level.layer for level in self.spec.levels)

    @property
    def parts(self) -> dict[str, slice]:
        """The token ranges measured apart: patch tokens, and the prefix tokens when the teacher has some."""
        prefix = self.spec.levels[-1].prefix_tokens
        return {"patch": slice(prefix, None)} | ({"prefix": slice(0, prefix)} if prefix else {})

    def measure(self, index: int, batch: Any) -> None:
        """Batch ``index`` of the cache, every sample flipped and every sample cropped (boxes drawn from the seed)."""
        from apmpipe.stages.augment import Views, augment_generator, crop_boxes

        pixels, labels = torch.from_numpy(batch.pixels).float(), torch.from_numpy(batch.labels)
        cached = [torch.from_numpy(t) for t in batch.tokens]
        size, count = (pixels.shape[-2], pixels.shape[-1]), len(pixels)
        grid = self.spec.levels[-1].grid
        boxes = crop_boxes(count, size, grid, self.crop_scale, augment_generator(self.seed, 0, index))
        views = {"flip": Views(torch.ones(count, dtype=torch.bool), None, size), "crop": Views(None, boxes, size)}
        original = self.teacher.forward(pixels)[1].argmax(1)
        for name, view in views.items():
            self._measure_view(self.values[name], view, pixels, labels, cached, original, batch.logits)

    def _measure_view(
        self,
        out: dict[str, list[torch.Tensor]],
        view: Any,
        pixels: torch.Tensor,
        labels: torch.Tensor,
        cached: list[torch.Tensor],
        original: torch.Tensor,
        logits: Any,
    ) -> None:
        """Cosines of targets and cached tokens to the teacher's on the augmented images; top-1s and agreements."""
        real, teacher_logits = self.teacher.forward(view.images(pixels))
        levels = self.spec.levels
        targets = [view.tokens(t, lv.grid, lv.prefix_tokens) for t, lv in zip(cached, levels, strict=True)]
        for layer, target, unaugmented, truth in zip(self.layers, targets, cached, real, strict=True):
            for part, cut in self.parts.items():
                out[f"{layer}/{part}/target"].append(_token_cosine(target[:, cut], truth[:, cut]))
                out[f"{layer}/{part}/baseline"].append(_token_cosine(unaugmented[:, cut], truth[:, cut]))
        decided = teacher_logits.argmax(1)
        out["top1/augmented"].append((decided == labels).float())
        out["top1/original"].append((original == labels).float())
        out["agree/head"].append((self.head(targets[-1]).argmax(1) == decided).float())
        out["agree/cached"].append((torch.from_numpy(logits).argmax(1) == decided).float())

    def rows(self) -> list[AugmentRow]:
        """One row per augmentation: the means over every sample."""
        rows = []
        for name, out in self.values.items():
            mean = {key: float(torch.cat(v).mean()) for key, v in out.items()}
            cosine, baseline = (
                {layer: {part: mean[f"{layer}/{part}/{kind}"] for part in self.parts} for layer in self.layers}
                for kind in ("target", "baseline")
            )
            top1, agreement = (
                {k.split("/")[1]: v for k, v in mean.items() if k.startswith(kind)} for kind in ("top1/", "agree/")
            )
            rows.append(AugmentRow(name, cosine, baseline, top1, agreement))
        return rows
