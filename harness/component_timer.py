"""Per-component decode time: where a method's time goes (draft / verify, shallow / deep / parallel, ...).

A generator wraps its phases in ``with self.timer("draft"):``. When the breakdown is on (benchmark.py
``--breakdown``, the default), each section synchronizes the device before reading the clock at both ends, so
a component's time is the device time of its kernels, not their launch time. The cost of one timed section
(two synchronizations, two clock reads, bookkeeping) is measured on the device before the first generation
and reported beside the components, so a reader sees how much the breakdown itself adds to the method's
decode time. When the breakdown is off a section is a no-op (one shared null context).

Decode time not covered by any section (stop checks, token bookkeeping, Python between sections) is reported
by the report as `other`.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Optional

OVERHEAD_SECTIONS = 200  # empty sections timed per measurement
OVERHEAD_ROUNDS = 5  # measurements; the median is kept (robust to a scheduler hiccup)
_NULL = contextlib.nullcontext()


class _Section:
    __slots__ = ("timer", "name", "t0")

    def __init__(self, timer: "ComponentTimer", name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        self.timer.sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.sync()
        t = self.timer
        t.seconds[self.name] = t.seconds.get(self.name, 0.0) + time.perf_counter() - self.t0
        t.calls[self.name] = t.calls.get(self.name, 0) + 1


class ComponentTimer:
    """Synchronized wall time per named component of one generation, and the measured cost of timing it."""

    def __init__(self, sync: Callable[[], None], enabled: bool = False):
        self.sync = sync
        self.enabled = enabled
        self.seconds: dict[str, float] = {}  # component -> seconds in this generation
        self.calls: dict[str, int] = {}  # component -> timed sections in this generation
        self.section_cost: Optional[float] = None  # seconds one empty timed section takes (measured once)

    def __call__(self, name: str):
        return _Section(self, name) if self.enabled else _NULL

    def reset(self) -> None:
        """Start a new generation (measures the section cost the first time the breakdown is used)."""
        self.seconds, self.calls = {}, {}
        if self.enabled and self.section_cost is None:
            self.section_cost = measure_section_cost(self)

    def report(self) -> Optional[dict]:
        """{components: {name: s}, calls: {name: n}, section_cost: s, overhead_seconds: s}; None when off or when
        the method timed no component (autoregressive)."""
        if not self.enabled or not self.calls:
            return None
        n = sum(self.calls.values())
        cost = self.section_cost or 0.0
        return {"components": dict(self.seconds), "calls": dict(self.calls), "section_cost": cost,
                "overhead_seconds": n * cost}


def measure_section_cost(timer: ComponentTimer) -> float:
    """Seconds an empty timed section adds to the enclosing decode time (median of several rounds)."""
    probe = ComponentTimer(timer.sync, enabled=True)
    rounds = []
    for _ in range(OVERHEAD_ROUNDS):
        timer.sync()
        t0 = time.perf_counter()
        for _ in range(OVERHEAD_SECTIONS):
            with probe("probe"):
                pass
        timer.sync()
        rounds.append((time.perf_counter() - t0) / OVERHEAD_SECTIONS)
    return statistics.median(rounds)
