"""Wall-clock time per named phase (load / encode / score / metrics), for the evaluation's log line.

On CUDA the device is synchronised at every phase boundary, so that a kernel's time is
counted in the phase that launched it, not in the next one that waits for it. That costs
the overlap of a batch's loading with the previous batch's kernels, which is why a
Stopwatch is only made where the breakdown is printed.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch


class Stopwatch:
    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the `with` block to `name`."""
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - t0

    def add(self, other: "Stopwatch") -> None:
        for name, value in other.seconds.items():
            self.seconds[name] += value

    def line(self, names: tuple[str, ...], total: float | None = None) -> str:
        """"load 1.2 s | encode 4.0 s | ..." in `names` order; with `total`, the time not in any
        phase is shown as "other" and the total last, so the parts add up to it."""
        parts = [f"{n} {self.seconds.get(n, 0.0):.2f} s" for n in names]
        if total is not None:
            other = total - sum(self.seconds.get(n, 0.0) for n in names)
            parts += [f"other {other:.2f} s", f"total {total:.2f} s"]
        return " | ".join(parts)


def timed_iter(iterable, watch: Stopwatch | None, name: str) -> Iterator:
    """Iterate `iterable`, adding the time spent waiting for each item to `watch`'s `name`."""
    it = iter(iterable)
    while True:
        if watch is None:
            item = next(it, _END)
        else:
            with watch.phase(name):
                item = next(it, _END)
        if item is _END:
            return
        yield item


_END = object()
_IMPORTED = time.perf_counter()


def process_seconds() -> float:
    """Wall seconds since this process started (Linux: from /proc, so the interpreter's start and
    every import count; elsewhere: since this module was imported)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # Field 22, after the parenthesised command name (which may hold spaces).
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED
