"""Logs and metrics: structlog JSON lines on stdout, Prometheus metrics on /metrics.

Each app instance owns its own CollectorRegistry, so several sidecars in one
process (the tests) never share counters, and a reload can ask for a metric it
registered before and get the same one back.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any, BinaryIO, TypeVar

import orjson
import structlog
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from sidecar.lean_metrics import LeanCounter, LeanHistogram

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

_MetricT = TypeVar("_MetricT", LeanCounter, LeanHistogram, Gauge)


class IsoTimestamp:
    """structlog's `TimeStamper(fmt="iso", utc=True)`, with the date and time cached per second.

    Formatting a datetime for every access line is measurable on the hot path;
    only the microseconds change within a second.
    """

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, method: str, event: Any) -> Any:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event


def _serialise(value: Any, **_: Any) -> bytes:
    return orjson.dumps(value, default=str)


class BatchedLines:
    """Lines buffered and written in batches: every `interval`, at `max_bytes`, on `flush`.

    A write (and an event-loop turn to make it) per line costs more than the line
    itself; batching them, as nginx's `access_log ... flush=` does, writes at most
    every `interval`. Outside a running loop every line is written at once. The
    cost: a crash can lose the last `interval` of lines. Subclasses say where a
    batch goes (`_write_batch`).
    """

    def __init__(self, interval: float, max_bytes: int) -> None:
        self._interval = interval
        self._max_bytes = max_bytes
        # Lines are copied into one buffer at once rather than kept as objects:
        # keeping hundreds of small objects alive until the flush measurably
        # slowed every request (fresh memory instead of the blocks just freed).
        self._buffer = bytearray()
        self._lines = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, line: bytes) -> None:
        buffer = self._buffer
        buffer += line
        buffer += b"\n"
        self._lines += 1
        if len(buffer) >= self._max_bytes:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._timer = loop.call_later(self._interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        data, lines = bytes(self._buffer), self._lines
        del self._buffer[:]
        self._lines = 0
        self._write_batch(data, lines)

    def _write_batch(self, data: bytes, lines: int) -> None:
        raise NotImplementedError


class CoalescingLineWriter(BatchedLines):
    """structlog's output: info lines go out in batches, warnings and errors at once."""

    def __init__(self, stream: BinaryIO, interval: float = 0.1, max_bytes: int = 64 * 1024) -> None:
        super().__init__(interval, max_bytes)
        self._stream = stream

    def msg(self, message: bytes) -> None:
        self.add(message)

    def msg_now(self, message: bytes) -> None:
        self.add(message)
        self.flush()

    log = debug = info = msg
    warn = warning = error = err = critical = exception = fatal = msg_now

    def _write_batch(self, data: bytes, lines: int) -> None:
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):
            # A closed or broken stdout must not take requests down with it.
            pass


_writer: CoalescingLineWriter | None = None


def flush_logs() -> None:
    """Write out the lines still waiting in the batch (on shutdown, in tests)."""
    if _writer is not None:
        _writer.flush()


def reset_logging() -> None:
    """Back to structlog's defaults, as before configure_logging (tests)."""
    global _writer, _access_logger, _access_stamp
    flush_logs()
    _writer = None
    _access_stamp = None
    structlog.reset_defaults()
    _access_logger = structlog.get_logger("sidecar.access")
    logging.getLogger().handlers.clear()


# Until configure_logging runs (tests, embedding) the access line goes through
# structlog's default logger; after, it is rendered directly into the writer.
_access_logger: Any = structlog.get_logger("sidecar.access")


_access_stamp: IsoTimestamp | None = None


def write_access_line(fields: dict[str, Any]) -> None:
    """The one access line per request, shaped as every other log line."""
    writer = _writer
    if writer is None or _access_stamp is None:
        _access_logger.info("request", **fields)
        return
    fields["event"] = "request"
    fields["level"] = "info"
    _access_stamp(None, "info", fields)
    writer.msg(orjson.dumps(fields, default=str))


def configure_logging(level: str = "info", stream: BinaryIO | None = None) -> None:
    """JSON lines on stdout for structlog and for the stdlib loggers aiohttp uses.

    The access line skips structlog's processor chain (context-var merge,
    exception formatting): it carries its request id explicitly, never has an
    exception, and is the one line written for every request; it comes out in
    the same shape as every other line.
    """
    global _writer, _access_stamp
    numeric = _LEVELS.get(level, logging.INFO)
    _access_stamp = IsoTimestamp() if numeric <= logging.INFO else None
    writer = _writer = CoalescingLineWriter(stream or sys.stdout.buffer)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        IsoTimestamp(),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_serialise),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *_: writer,
        # Not cached: the hot access line bypasses these loggers, and a module-level
        # logger cached before configure_logging ran would keep the old output.
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stdout if stream is None else _TextOver(stream))
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


class _TextOver:
    """A text view of a binary stream, for the stdlib handler in tests."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def write(self, text: str) -> None:
        self._stream.write(text.encode())

    def flush(self) -> None:
        self._stream.flush()


class RouteMetrics:
    """One route's labelled children, looked up once instead of on every request."""

    __slots__ = ("_counts", "_requests", "_route", "duration", "overhead", "ttfb")

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._route = route
        self._requests = metrics.requests
        self._counts: dict[tuple[str, int], Any] = {}
        self.duration = metrics.duration.labels(route)
        self.ttfb = metrics.upstream_ttfb.labels(route)
        self.overhead = metrics.overhead.labels(route)

    def count(self, method: str, status: int) -> None:
        child = self._counts.get((method, status))
        if child is None:
            child = self._requests.labels(self._route, method, str(status))
            self._counts[(method, status)] = child
        child.inc()


class Metrics:
    """The sidecar's Prometheus metrics, and a get-or-create door for policies' own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._by_name: dict[str, LeanCounter | LeanHistogram | Gauge] = {}
        self._routes: dict[str, RouteMetrics] = {}
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

    def for_route(self, route: str) -> RouteMetrics:
        """The children of the per-route metrics; routes are a fixed, small set."""
        found = self._routes.get(route)
        if found is None:
            found = self._routes[route] = RouteMetrics(self, route)
        return found

    def counter(self, name: str, documentation: str, labels: tuple[str, ...]) -> LeanCounter:
        return self._get_or_create(LeanCounter, name, documentation, labels)

    def gauge(self, name: str, documentation: str, labels: tuple[str, ...]) -> Gauge:
        return self._get_or_create(Gauge, name, documentation, labels)

    def histogram(
        self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> LeanHistogram:
        return self._get_or_create(LeanHistogram, name, documentation, labels, buckets=buckets)

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
