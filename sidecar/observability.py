"""Logs and metrics: structlog JSON lines on stdout, Prometheus metrics on /metrics.

Each app instance owns its own CollectorRegistry, so several sidecars in one
process (the tests) never share counters, and a reload can ask for a metric it
registered before and get the same one back.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TypeVar

import orjson
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

PREFIX = "ollama_sidecar_"

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Latency buckets: the sidecar's own overhead lives in the sub-millisecond range,
# generations in seconds to minutes.
OVERHEAD_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)

_MetricT = TypeVar("_MetricT", bound=MetricWrapperBase)


def _serialise(value: Any, **_: Any) -> bytes:
    return orjson.dumps(value, default=str)


def configure_logging(level: str = "info") -> None:
    """JSON lines on stdout for structlog and for the stdlib loggers aiohttp uses."""
    numeric = _LEVELS.get(level, logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_serialise),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.BytesLoggerFactory(file=sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(
                    serializer=lambda v, **_: orjson.dumps(v, default=str).decode()
                ),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))


class Metrics:
    """The sidecar's Prometheus metrics, and a get-or-create door for policies' own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._by_name: dict[str, MetricWrapperBase] = {}
        self.requests = self.counter(
            "requests_total",
            "Requests answered, by route, method and status.",
            ("route", "method", "status"),
        )
        self.duration = self.histogram(
            "request_duration_seconds",
            "Time from request to the last byte of the answer.",
            ("route",),
            LATENCY_BUCKETS,
        )
        self.upstream_ttfb = self.histogram(
            "upstream_ttfb_seconds",
            "Time from sending upstream to its response headers.",
            ("route",),
            LATENCY_BUCKETS,
        )
        self.overhead = self.histogram(
            "overhead_seconds",
            "Time the sidecar itself added: total minus time waiting on the upstream.",
            ("route",),
            OVERHEAD_BUCKETS,
        )
        self.in_flight = self.gauge("in_flight_requests", "Requests being handled now.", ())
        self.upstream_errors = self.counter(
            "upstream_errors_total",
            "Upstream failures before the first byte, by reason.",
            ("reason",),
        )
        self.stream_interruptions = self.counter(
            "stream_interruptions_total",
            "Streams that broke after the first byte, by reason.",
            ("route", "reason"),
        )
        self.keepalive_resends = self.counter(
            "upstream_keepalive_resends_total",
            "Requests sent again on a fresh connection after a stale pooled one closed.",
            (),
        )

    def counter(self, name: str, documentation: str, labels: tuple[str, ...]) -> Counter:
        return self._get_or_create(Counter, name, documentation, labels)

    def gauge(self, name: str, documentation: str, labels: tuple[str, ...]) -> Gauge:
        return self._get_or_create(Gauge, name, documentation, labels)

    def histogram(
        self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> Histogram:
        return self._get_or_create(Histogram, name, documentation, labels, buckets=buckets)

    def _get_or_create(
        self,
        kind: type[_MetricT],
        name: str,
        documentation: str,
        labels: tuple[str, ...],
        **extra: Any,
    ) -> _MetricT:
        full_name = PREFIX + name
        existing = self._by_name.get(full_name)
        if existing is not None:
            if not isinstance(existing, kind):
                raise ValueError(f"metric {full_name} exists with another type")
            return existing
        metric = kind(full_name, documentation, labels, registry=self.registry, **extra)
        self._by_name[full_name] = metric
        return metric

    def render(self) -> bytes:
        return generate_latest(self.registry)
