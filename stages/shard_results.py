"""What happened to each input shard of a stage that writes one output per input shard (extract, embed): the
per-shard result, the run's totals over them, and the progress callbacks the CLI implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class ShardResult:
    """What happened to one input shard."""

    name: str
    status: str  # "done" | "failed" | "skipped" (already complete)
    images: int = 0
    skipped_samples: list[tuple[str, str]] = field(default_factory=list)
    error: str = ""


class ShardTotals:
    """Totals over a run summary's ``results``."""

    results: list[ShardResult]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def images(self) -> int:
        return sum(r.images for r in self.results if r.status == "done")

    @property
    def skipped_samples(self) -> list[tuple[str, str, str]]:
        return [(r.name, key, reason) for r in self.results for key, reason in r.skipped_samples]


class Progress(Protocol):
    def images(self, count: int) -> None: ...
    def shard(self, result: ShardResult) -> None: ...
