"""Latency measurement shared by the benchmark scripts: same input, interleaved rounds, percentiles.

Each contender is a name and a zero-argument callable that runs one inference on an input
prepared beforehand. Contenders are run in interleaved rounds so that a slow minute of a
shared machine hits all of them alike.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Timing:
    """Latency percentiles of one contender, in milliseconds."""

    name: str
    samples: list[float]

    @property
    def median(self) -> float:
        """p50 in ms."""
        return float(np.percentile(self.samples, 50))

    @property
    def p90(self) -> float:
        """p90 in ms."""
        return float(np.percentile(self.samples, 90))

    @property
    def p99(self) -> float:
        """p99 in ms."""
        return float(np.percentile(self.samples, 99))


def measure(contenders: dict[str, Callable[[], object]], *, iters: int = 200, warmup: int = 20,
            rounds: int = 5, progress: bool = True) -> dict[str, Timing]:
    """Time each contender ``iters`` times in total, in ``rounds`` interleaved rounds, after a warm-up."""
    from edgeport.progress import progress as bar

    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    per_round = max(1, iters // rounds)
    pb = bar(None, "timing", total=per_round * rounds * len(contenders)) if progress else None
    names = list(contenders)
    for r in range(rounds):
        # Rotate the order each round: whoever runs after a runtime that leaves threads spinning pays.
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = contenders[name]
            for _ in range(per_round):
                t = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t) * 1000.0)
                if pb is not None:
                    pb.update(1)
    if pb is not None:
        pb.close()
    return {name: Timing(name, s) for name, s in samples.items()}


def table(timings: dict[str, Timing], baseline: str) -> str:
    """Markdown table: median, p90, p99 and speed-up over ``baseline`` (by median)."""
    base = timings[baseline].median
    lines = ["| runtime | median ms | p90 ms | p99 ms | speed-up vs " + baseline + " |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for t in timings.values():
        lines.append(f"| {t.name} | {t.median:.3f} | {t.p90:.3f} | {t.p99:.3f} | {base / t.median:.2f}x |")
    return "\n".join(lines)
