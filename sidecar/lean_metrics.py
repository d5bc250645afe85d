"""Counters and histograms cheap enough to update on every request, exposed by prometheus-client.

prometheus-client's own Counter and Histogram take a threading lock for every
increment, and a histogram walks its buckets in Python: with a handful of them
per request (request count, duration, overhead, upstream time, tokens) that was
about a tenth of the sidecar's CPU per request (issue 7's profile). The sidecar
updates its metrics from one event-loop thread, so the values here are plain
numbers, a bucket is found with `bisect`, and prometheus-client still does
what it is good at: the registry, `get_sample_value`, and the exposition
format, through these classes' `collect()`. The output is the same as with
prometheus-client's classes, `_created` series included.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import INF, floatToGoString


class CounterChild:
    """One label set's count."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only go up")
        self.value += amount


class HistogramChild:
    """One label set's bucket counts (not cumulative: summed when collected) and sum."""

    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # The first bound >= amount: Prometheus buckets are `le` (inclusive).
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount


class _Labelled(Collector):
    """A metric family with children per label set, registered in `registry` as a collector."""

    kind = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        self._unlabelled: Any = None if self.labelnames else self._child()
        registry.register(self)

    def _child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: Any) -> Any:
        """The child for these label values, created on first use."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
            key = tuple(str(value) for value in values)
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._child()
            self._children[values] = child
        return child

    def remove(self, *values: Any) -> None:
        """Drop a label set's series (and every alias it was looked up by)."""
        child = self._children.get(tuple(str(value) for value in values))
        if child is not None:
            for key in [key for key, found in self._children.items() if found is child]:
                del self._children[key]

    def _series(self) -> Iterator[tuple[tuple[str, ...], Any]]:
        if self._unlabelled is not None:
            yield (), self._unlabelled
            return
        seen: set[int] = set()
        for key, child in list(self._children.items()):
            # Also looked up by the raw values: report each child once, by its text labels.
            if id(child) in seen or not all(isinstance(part, str) for part in key):
                continue
            seen.add(id(child))
            yield key, child

    def describe(self) -> Iterator[Metric]:
        return iter(())


class LeanCounter(_Labelled):
    """prometheus-client's Counter, for `labels(...).inc()` and `inc()` only."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry)

    def _child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        assert self._unlabelled is not None, f"{self.name} has labels: use labels(...).inc()"
        self._unlabelled.inc(amount)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in self._series():
            family.add_metric(key, child.value, created=child.created)
        yield family


class LeanHistogram(_Labelled):
    """prometheus-client's Histogram, for `labels(...).observe()` and `observe()` only."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        bounds = sorted(float(bound) for bound in buckets)
        if not bounds or bounds[-1] != INF:
            bounds.append(INF)
        self.bounds = tuple(bounds)
        self._bound_text = [floatToGoString(bound) for bound in self.bounds]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def observe(self, amount: float) -> None:
        assert self._unlabelled is not None, f"{self.name} has labels: use labels(...).observe()"
        self._unlabelled.observe(amount)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = GaugeMetricFamily(
            f"{self.name}_created", self.documentation, labels=self.labelnames
        )
        for key, child in self._series():
            total = 0
            buckets: list[tuple[str, float]] = []
            for text, count in zip(self._bound_text, child.counts, strict=True):
                total += count
                buckets.append((text, float(total)))
            family.add_metric(key, buckets, child.sum)
            created.add_metric(key, child.created)
        yield family
        yield created
