"""The terminal: the stderr console, progress bars, number formatting, and stop requests (Ctrl-C, SIGTERM)
shared by every command."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from apmpipe.storage.redact import redact_url

err_console = Console(stderr=True)
out_console = Console()


MISSING = "–"  # a figure that does not exist: a class absent from the samples, an accuracy without labels


def shown(value: float | None, spec: str = ".3f") -> str:
    """``value`` formatted with ``spec``; ``MISSING`` for None or NaN."""
    return MISSING if value is None or value != value else format(value, spec)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def counted(count: int, noun: str) -> str:
    """``1 thread``, ``2 threads``: a count with its noun in the right number."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


class ShardProgress:
    """Progress of a command over input shards (extract, embed): shards done of total (with ETA) and images with
    their rate; ``done`` says what an already finished shard is (``cached``, ``embedded``)."""

    def __init__(self, command: str = "extract", done: str = "cached") -> None:
        self._command, self._done = command, done
        self._bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[images]} img"),
            TextColumn("{task.fields[rate]:.1f} img/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        self._task = self._bar.add_task(command, total=None, images=0, rate=0.0)
        self._images = 0
        self._started = False

    def plan(self, total: int, todo: int) -> None:
        """Called once the work is known: the bar appears only then, not before a one-line error."""
        self._bar.start()
        self._started = True
        self._bar.update(
            self._task,
            total=todo,
            description=f"{self._command} ({total - todo} of {total} shards already {self._done})"
            if total > todo
            else self._command,
        )

    def images(self, count: int) -> None:
        self._images += count
        elapsed = self._bar.tasks[0].elapsed or 0.0
        self._bar.update(self._task, images=self._images, rate=self._images / elapsed if elapsed else 0.0)

    def shard(self, result: object) -> None:
        self._bar.advance(self._task)

    def __enter__(self) -> ShardProgress:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._started:
            self._bar.stop()


class _DetailProgress(Progress):
    """A progress bar with one line of detail under it (what does not fit beside the bar at 80 columns)."""

    detail: str = ""

    def get_renderables(self) -> Iterator[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        if self.detail:
            yield Text(self.detail, no_wrap=True, overflow="ellipsis")


class TrainProgress:
    """Progress of training (the student, or the demo's ``teacher``): step/total, epoch, ETA and elapsed time first
    (they fit 80 columns); the loss, its per-level terms and samples/s on the line below."""

    def __init__(self, label: str = "train") -> None:
        self._bar = _DetailProgress(
            TextColumn(f"[bold]{label}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=err_console,
        )
        self._task = self._bar.add_task(label, total=None, epoch="-")
        self._started = False
        self._resumed = 0
        self._loss, self._rate = "", ""  # the last step record's losses and samples/s
        self._held_out = ""  # the last held-out score (train --val), shown between the two

    def resumed(self, step: int, total: int, run_dir: str) -> None:
        """A checkpoint was loaded: say so (or that the run is already trained), and start the bar at ``step``."""
        self._resumed = step
        what = f"already trained: step {step} of {total}" if step >= total else f"resuming from step {step} of {total}"
        err_console.print(f"{what} ({redact_url(run_dir)})", highlight=False)

    def start(self, total: int) -> None:
        self._bar.start()
        self._started = True
        self._bar.update(self._task, total=total, completed=self._resumed)

    def step(self, step: int, total: int, record: dict) -> None:
        """A step's record (``loss``, ``epoch``, ``samples_per_s``, per-level ``loss_level_N``, ``loss_rgb``), or a
        held-out score's (``val_r2``, ``val_best``); the bar starts at the first one when :meth:`start` was not
        called."""
        if not self._started:
            self.start(total)
        if "val_r2" in record:
            self._held_out = f"; held-out {record['val_r2']:.3f} (best {record['val_best']:.3f})"
        else:
            terms = [f"L{k.rsplit('_', 1)[1]} {v:.4f}" for k, v in record.items() if k.startswith("loss_level_")]
            terms += [f"rgb {record['loss_rgb']:.4f}"] if "loss_rgb" in record else []
            parts = f" ({', '.join(terms)})" if terms else ""
            self._loss, self._rate = f"  loss {record['loss']:.4f}{parts}", f", {record['samples_per_s']:.0f} samples/s"
            self._bar.update(self._task, completed=step, epoch=int(record.get("epoch", 0)) + 1)
        self._bar.detail = self._loss + self._held_out + self._rate  # a narrow terminal cuts the rate first

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._started:  # a bar never started must not leave an empty line before an error message
            self._bar.stop()


@contextmanager
def stop_requests() -> Iterator[Callable[[], int]]:
    """While open, the first SIGINT (Ctrl-C) or SIGTERM (what cluster schedulers send before they kill) is only
    recorded: the yielded function returns its number (0 before), so a long loop can save and stop cleanly. A
    second signal acts as it normally does. Outside the main thread nothing is caught; forked children (loader
    workers, which a terminal's Ctrl-C reaches too) ignore the signal: their parent stops them."""
    received: list[int] = []
    owner = os.getpid()
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def record(signum: int, frame: Any) -> None:
        if os.getpid() != owner:
            return
        received.append(signum)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        err_console.print(
            f"{signal.Signals(signum).name}: stopping after this step's checkpoint (again to stop at once)",
            highlight=False,
        )

    for sig in previous:
        signal.signal(sig, record)
    try:
        yield lambda: received[0] if received else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
