"""Timing helpers: per-call samples, median/p99, and the spread across rounds."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional


@dataclass
class Result:
    """Per-call cost of one variant, in microseconds."""

    name: str
    medians: List[float]
    p99s: List[float]

    @property
    def median(self) -> float:
        return statistics.median(self.medians)

    @property
    def p99(self) -> float:
        return statistics.median(self.p99s)

    @property
    def spread(self) -> str:
        return f"{min(self.medians):.1f}–{max(self.medians):.1f}"


def measure(name: str, call: Callable[[], object], calls: int, rounds: int,
            warmup: int = 200) -> Result:
    """Time ``calls`` single calls per round, ``rounds`` times; keep each round's median/p99."""
    for _ in range(warmup):
        call()
    medians: List[float] = []
    p99s: List[float] = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        samples = []
        for _ in range(calls):
            start = clock()
            call()
            samples.append((clock() - start) / 1000.0)
        samples.sort()
        medians.append(samples[len(samples) // 2])
        p99s.append(samples[min(len(samples) - 1, int(len(samples) * 0.99))])
    return Result(name, medians, p99s)


def interleaved(variants: List[tuple], calls: int, rounds: int,  # type: ignore[type-arg]
                settle: Optional[Callable[[], object]] = None) -> List[Result]:
    """Measure several variants round by round, so machine noise hits them alike.

    ``settle`` runs, untimed, before each variant's round: the clients flush there, so
    a round measures the call that enqueues, not a queue that overflowed during an
    earlier round (which drops, and in the peer's case logs a warning per call).
    """
    results = {name: Result(name, [], []) for name, _ in variants}
    for _ in range(rounds):
        for name, call in variants:
            if settle is not None:
                settle()
            one = measure(name, call, calls, 1, warmup=50)
            results[name].medians += one.medians
            results[name].p99s += one.p99s
    return [results[name] for name, _ in variants]
