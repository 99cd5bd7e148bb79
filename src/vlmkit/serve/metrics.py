"""Prometheus metrics for the server: a Counter with labels, a Gauge, a Histogram and ``render()``.

Written here rather than taken from ``prometheus_client``: the server exposes a dozen series in the text
exposition format (version 0.0.4), which is a page of code, and the page costs no extra dependency (nor
prometheus_client's process-global registry, which would mix the series of two apps in one test process).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# request latencies from a few milliseconds (a refused request) to minutes (a long generation)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


INF_LE = 'le="+Inf"'


def _number(v: float) -> str:
    v = float(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape(self.help)}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A monotonically increasing count, one series per combination of label values; ``fn`` (no labels) reads
    a count kept elsewhere (the engine's) at render time instead."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (),
                 fn: Callable[[], float] | None = None):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}
        self.fn = fn

    def inc(self, amount: float = 1.0, **labels) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up (got {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        return self._values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        if self.fn is not None:
            return self.header() + [f"{self.name} {_number(self.fn())}"]
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A value that goes up and down; ``fn`` (no labels) reads it at render time instead."""

    kind = "gauge"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (),
                 fn: Callable[[], float] | None = None):
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {}
        self.fn = fn

    def set(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def lines(self) -> list[str]:
        if self.fn is not None:
            return self.header() + [f"{self.name} {_number(self.fn())}"]
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Histogram(_Metric):
    """Observations counted into cumulative ``le`` buckets (plus +Inf), with their ``_sum`` and ``_count``."""

    kind = "histogram"

    def __init__(self, name: str, help: str, labels: Iterable[str] = (),
                 buckets: Iterable[float] = LATENCY_BUCKETS):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        if not self.buckets or any(b != b or b == math.inf for b in self.buckets):
            raise ValueError(f"{self.name}: buckets must be finite numbers (+Inf is added), "
                             f"got {self.buckets}")
        # labels -> [observations per bucket (not cumulative), sum, count]
        self._series: dict[tuple[str, ...], list] = {}

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            s = self._series.setdefault(key, [[0] * len(self.buckets), 0.0, 0])
            for i, b in enumerate(self.buckets):
                if value <= b:
                    s[0][i] += 1
                    break
            s[1] += value
            s[2] += 1

    def lines(self) -> list[str]:
        with self._lock:
            items = sorted((k, ([*v[0]], v[1], v[2])) for k, v in self._series.items())
        if not items and not self.label_names:
            items = [((), ([0] * len(self.buckets), 0.0, 0))]
        out = self.header()
        for key, (counts, total, n) in items:
            running = 0
            for b, c in zip(self.buckets, counts):
                running += c
                le = f'le="{_number(b)}"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            out.append(f"{self.name}_bucket{_labels(self.label_names, key, INF_LE)} {n}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {n}")
        return out


def render(metrics: Iterable[_Metric]) -> str:
    """The text exposition format of ``metrics``: each one's HELP and TYPE lines, then its samples."""
    return "\n".join(line for m in metrics for line in m.lines()) + "\n"


__all__ = ["CONTENT_TYPE", "Counter", "Gauge", "Histogram", "LATENCY_BUCKETS", "render"]
