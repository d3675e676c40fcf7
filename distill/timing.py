"""Side-by-side latency: several callables timed interleaved, round by round, in one measurement.

Why interleaved: on a shared machine load changes over seconds; timing the teacher at job start and the
student after training compares two different machines. Alternating calls in every round exposes both
to the same load, and the ratio of medians is what `speedup` reports. Why the thread count is pinned:
after a multi-process run Lightning leaves torch with cpus/devices threads, so the 'after' side would
run with fewer threads than the 'before' side did.

    from athanor.distill.timing import interleaved_latency
    ms = interleaved_latency({"teacher": lambda: t(x), "student": lambda: s(x)}, repeats=5)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` intra-op threads (None: leave as is), restoring the old count."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved_samples(calls: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                        threads: int | None = None) -> dict[str, list[float]]:
    """Milliseconds of every call of each entry, round by round: `repeats` rounds that call every entry once
    (in rotating order, so no entry always runs first), after `warmup` untimed rounds. Sample i of every entry
    comes from round i, so per-round ratios pair calls made under the same load."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: must be >= 1")
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                calls[name]()
        for round_ in range(repeats):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                _synchronize()
                start = time.perf_counter()
                calls[name]()
                _synchronize()
                samples[name].append((time.perf_counter() - start) * 1e3)
    return samples


def interleaved_latency(calls: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                        threads: int | None = None) -> dict[str, float]:
    """Median milliseconds per call of each entry, from `interleaved_samples`."""
    samples = interleaved_samples(calls, repeats=repeats, warmup=warmup, threads=threads)
    return {name: statistics.median(values) for name, values in samples.items()}
