"""What every bench measures with: the machine a figure was taken on, wall time, device sync, progress lines and
the bytes training reads per sample."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def machine_line(device: torch.device) -> str:
    """One line naming the hardware a number was measured on."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of ``fn()``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so a timer stops after it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_progress(message: str) -> None:
    """One line on stderr while a benchmark measures (stdout keeps the result table)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def read_bytes_per_sample(
    cache: str, levels: tuple[int, ...] | None = None, logits: bool = False
) -> tuple[float, float]:
    """(stored, decoded) bytes per sample of what training reads: pixels, labels, the tokens (and int8 scales) of
    the trained ``levels`` (None: all), and the cached logits when the decision loss reads them. Stored bytes are
    those fetched: whole chunks, however few of their samples a block wants."""
    from apmpipe.storage.cache import FeatureCache
    from apmpipe.storage.describe import describe

    arrays = describe(FeatureCache.open(cache), sizes=True)["arrays"]
    read = {
        name: sizes
        for name, sizes in arrays.items()
        if name in ("pixels", "labels")
        or (name == "logits" and logits)
        or (name.startswith(("tokens/", "scales/")) and (levels is None or int(name.split("/")[1]) in levels))
    }
    return (
        sum(v.get("read_bytes_per_sample", 0.0) for v in read.values()),
        sum(v.get("raw_bytes_per_sample", 0.0) for v in read.values()),
    )
