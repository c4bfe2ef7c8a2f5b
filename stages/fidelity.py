"""How close predicted tokens are to the teacher's, always beside the constant baseline.

:class:`TokenFidelity` accumulates, per level and for prefix (CLS, registers) and grid tokens apart, the cosine
and mean squared error of the prediction and of the trivial predictor (the training cache's mean token per
location), and reports the explained variance R^2 = 1 - MSE(prediction) / MSE(baseline). A cosine alone
flatters: the mean token already scores a high one. (The worst-case token cosine that extraction records for lossy
storage is :func:`apmpipe.stages.token_metrics.min_token_cosine`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PARTS = ("patch", "prefix")


@dataclass
class TokenFidelity:
    """Running sums per level; ``prefixes``: each level's prefix token count; ``baselines``: the mean token per
    location ``[T_l, D_l]`` per level (or None)."""

    prefixes: tuple[int, ...]
    baselines: list[torch.Tensor] | None = None
    sums: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, index: int, layer: int, pred: torch.Tensor, target: torch.Tensor) -> None:
        """One batch of level ``index`` (cache layer ``layer``): predicted and teacher tokens ``[B, T_l, D_l]`` on that
        level's own grid."""
        stats = self.sums.setdefault(str(layer), {})
        baseline = None if self.baselines is None else self.baselines[index].to(target.device)
        prefix = self.prefixes[index]
        for part, sl in (("patch", slice(prefix, None)), ("prefix", slice(0, prefix))):
            t = target[:, sl].float()
            if t.shape[1] == 0:
                continue
            candidates = {"": pred[:, sl].float()}
            if baseline is not None:
                candidates["baseline_"] = baseline[sl].expand_as(t)
            for name, p in candidates.items():
                _accumulate(stats, f"{part}_{name}cosine", float(F.cosine_similarity(p, t, dim=-1).sum()))
                _accumulate(stats, f"{part}_{name}sq", float(((p - t) ** 2).sum()))
            _accumulate(stats, f"{part}_tokens", t.shape[0] * t.shape[1])
            stats[f"{part}_dim"] = t.shape[2]

    def report(self) -> dict[str, dict[str, float]]:
        """Per layer: ``{part}_cosine``, ``{part}_mse`` and, with baselines, ``{part}_baseline_cosine``,
        ``{part}_baseline_mse`` and ``{part}_r2``, for part in patch, prefix."""
        out: dict[str, dict[str, float]] = {}
        for layer, s in self.sums.items():
            row = out.setdefault(layer, {})
            for part in PARTS:
                tokens = s.get(f"{part}_tokens")
                if not tokens:
                    continue
                values = tokens * s[f"{part}_dim"]
                for name in ("", "baseline_") if f"{part}_baseline_sq" in s else ("",):
                    row[f"{part}_{name}cosine"] = s[f"{part}_{name}cosine"] / tokens
                    row[f"{part}_{name}mse"] = s[f"{part}_{name}sq"] / values
                if f"{part}_baseline_sq" in s:
                    row[f"{part}_r2"] = 1.0 - s[f"{part}_sq"] / max(s[f"{part}_baseline_sq"], 1e-30)
        return out


def _accumulate(stats: dict[str, float], key: str, value: float) -> None:
    stats[key] = stats.get(key, 0.0) + value
