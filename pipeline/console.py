"""Terminal output: the stderr console, progress bars and number formatting shared by every command."""
from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err_console = Console(stderr=True)
out_console = Console()


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


class ExtractProgress:
    """Progress of an extraction: shards done of total (with ETA) and images with their rate."""

    def __init__(self) -> None:
        self._bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[images]} img"), TextColumn("{task.fields[rate]:.1f} img/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console, transient=False,
        )
        self._task = self._bar.add_task("extract", total=None, images=0, rate=0.0)
        self._images = 0
        self._started = False

    def plan(self, total: int, todo: int) -> None:
        """Called once the work is known: the bar appears only then, not before a one-line error."""
        self._bar.start()
        self._started = True
        self._bar.update(self._task, total=todo, description=f"extract ({total - todo} of {total} shards already cached)" if total > todo else "extract")

    def images(self, count: int) -> None:
        self._images += count
        elapsed = self._bar.tasks[0].elapsed or 0.0
        self._bar.update(self._task, images=self._images, rate=self._images / elapsed if elapsed else 0.0)

    def shard(self, result: object) -> None:
        self._bar.advance(self._task)

    def __enter__(self) -> "ExtractProgress":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._started:
            self._bar.stop()


class TrainProgress:
    """Progress of training: steps of total with ETA, samples/s and the latest loss per level."""

    def __init__(self) -> None:
        self._bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console,
        )
        self._task = self._bar.add_task("train", total=None, info="")

    def start(self, total: int, done: int) -> None:
        self._bar.start()
        self._bar.update(self._task, total=total, completed=done)

    def step(self, step: int, total: int, record: dict) -> None:
        levels = " ".join(f"L{k.rsplit('_', 1)[1]} {v:.4f}" for k, v in record.items() if k.startswith("loss_level_"))
        rgb = f" rgb {record['loss_rgb']:.4f}" if "loss_rgb" in record else ""
        self._bar.update(self._task, completed=step, info=f"{record['samples_per_s']:.0f} samples/s loss {record['loss']:.4f} ({levels}{rgb})")

    def __enter__(self) -> "TrainProgress":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._bar.stop()
