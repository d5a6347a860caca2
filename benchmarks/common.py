"""Timing helpers shared by the benchmark scripts.

Shared CPUs are noisy, so every comparison runs its candidates *interleaved* (A B C A B C ...)
in the same process and reports medians: a burst of load from another process then hits every
candidate alike instead of biasing one of them.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch


# The clock used for samples. ``time.perf_counter`` (wall time) by default; ``use_cpu_clock()``
# switches to ``time.process_time`` (CPU time of this process), which is far less sensitive to
# other processes stealing the CPU, and equals wall time for single-threaded work on an idle box.
_clock = time.perf_counter


def use_cpu_clock(on: bool = True) -> None:
    global _clock
    _clock = time.process_time if on else time.perf_counter


def calibrate(fn: Callable[[], object], target_s: float) -> int:
    """How many back-to-back calls of ``fn`` take about ``target_s`` seconds (at least 1).

    The first call is a warm-up (allocator, lazy init, first-call dispatch); slow functions
    (one call >= ``target_s``) cost just two calls here.
    """
    fn()
    n = 1
    while True:
        t0 = _clock()
        for _ in range(n):
            fn()
        elapsed = _clock() - t0
        if elapsed >= target_s / 4 or n >= 1 << 16:
            break
        n *= 4
    return max(1, min(1 << 16, round(target_s * n / elapsed)))


def interleaved(fns: dict[str, Callable[[], object]], reps: int = 7, target_s: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each function; samples are taken round-robin.

    Each sample is ``n`` back-to-back calls (``n`` chosen per function so that a sample lasts
    about ``target_s``), so microsecond calls are not drowned in timer noise. The order of the
    functions alternates between rounds.
    """
    inner = {name: calibrate(fn, target_s) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            names = list(fns) if r % 2 == 0 else list(reversed(fns))
            for name in names:
                fn, n = fns[name], inner[name]
                t0 = _clock()
                for _ in range(n):
                    fn()
                samples[name].append((_clock() - t0) / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: statistics.median(s) for name, s in samples.items()}


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
