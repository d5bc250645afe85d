"""The lean counters and histograms expose exactly what prometheus-client's own would."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from sidecar.lean_metrics import LeanCounter, LeanHistogram

BUCKETS = (0.0001, 0.001, 0.01, 1.0, 5)
OBSERVED = (0.0, 0.0001, 0.00011, 0.001, 0.5, 1.0, 4.9, 5.0, 7.0, 1e9)


def exposition(registry: CollectorRegistry) -> str:
    """The text format, with the creation times (which differ by construction) masked."""
    text = generate_latest(registry).decode()
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 T", text)


def test_same_exposition_as_prometheus_client() -> None:
    reference, lean = CollectorRegistry(), CollectorRegistry()
    counters = (
        Counter("x_requests_total", "Requests.", ("route", "status"), registry=reference),
        LeanCounter("x_requests_total", "Requests.", ("route", "status"), registry=lean),
    )
    plain = (
        Counter("x_resends_total", "Resends.", (), registry=reference),
        LeanCounter("x_resends_total", "Resends.", (), registry=lean),
    )
    histograms = (
        Histogram("x_seconds", "Time.", ("route",), registry=reference, buckets=BUCKETS),
        LeanHistogram("x_seconds", "Time.", ("route",), registry=lean, buckets=BUCKETS),
    )
    for counter in counters:
        counter.labels("/v1/chat", "200").inc()
        counter.labels("/v1/chat", 200).inc(2.5)  # non-string label values: the same series
        counter.labels("/api/chat", "429").inc()
    for resends in plain:
        resends.inc()
    for histogram in histograms:
        for value in OBSERVED:
            histogram.labels("/v1/chat").observe(value)
        histogram.labels("/api/embed").observe(0.002)
    assert exposition(lean) == exposition(reference)
    assert lean.get_sample_value(
        "x_requests_total", {"route": "/v1/chat", "status": "200"}
    ) == pytest.approx(3.5)
    assert lean.get_sample_value("x_seconds_bucket", {"route": "/v1/chat", "le": "0.0001"}) == 2
    assert lean.get_sample_value("x_seconds_count", {"route": "/v1/chat"}) == len(OBSERVED)


def test_remove_drops_a_series_and_its_aliases() -> None:
    reference, lean = CollectorRegistry(), CollectorRegistry()
    for counter in (
        Counter("y_total", "Y.", ("name",), registry=reference),
        LeanCounter("y_total", "Y.", ("name",), registry=lean),
    ):
        counter.labels(7).inc()
        counter.labels("8").inc()
        counter.remove("7")
    assert exposition(lean) == exposition(reference)
    assert lean.get_sample_value("y_total", {"name": "7"}) is None


def test_misuse_is_refused_as_prometheus_client_does() -> None:
    registry = CollectorRegistry()
    counter = LeanCounter("z_total", "Z.", ("a",), registry=registry)
    with pytest.raises(ValueError):
        counter.labels("one", "two")
    with pytest.raises(ValueError):
        counter.labels("one").inc(-1)
