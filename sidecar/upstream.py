"""The client to Ollama: the innermost step of the chain.

Requests go out over sidecar/http1.py's keep-alive pools (one per upstream base
URL). A request that dies on a reused connection before any answer byte (the
upstream closed an idle keep-alive connection just as the request went out, so
nothing was processed) is sent once more on a connection opened for it alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from time import perf_counter
from typing import Any

import orjson
import structlog

from sidecar.config import TimeoutSettings, UpstreamSettings
from sidecar.deadlines import DeadlineWatch
from sidecar.errors import SidecarError, StreamInterrupted, UpstreamError
from sidecar.exchange import AttemptEnd, AttemptObserver, Exchange, Reply, StreamFormat
from sidecar.http1 import (
    HOP_BY_HOP,
    Connection,
    Origin,
    Pool,
    Unreachable,
    UpstreamClosed,
    UpstreamProtocolError,
    encode_request,
)
from sidecar.observability import Metrics
from sidecar.replies import ChunkSink, Layer, PushSource, StreamEnd, WatchedChunks
from sidecar.streams import end_check, stream_format_of

log = structlog.get_logger("sidecar.upstream")

_NOT_FORWARDED_UP = HOP_BY_HOP | {
    "host",
    "content-length",
    "content-encoding",
    "accept-encoding",
    "expect",
}
_NOT_FORWARDED_UP_NOR_AUTH = _NOT_FORWARDED_UP | {"authorization"}


def _is_stream(content_type: str | None) -> bool:
    return stream_format_of(content_type) is not None


class Upstream:
    """Sends an Exchange to the upstream and returns its Reply, body unread for streams."""

    def __init__(
        self, settings: UpstreamSettings, metrics: Metrics, deadlines: DeadlineWatch
    ) -> None:
        self.settings = settings
        self.base_url = settings.url
        self._metrics = metrics
        self._deadlines = deadlines
        self._pools: dict[str, Pool] = {}
        self._timeouts = {route: settings.timeouts_for(route) for route in settings.route_timeouts}
        self._drop = (
            _NOT_FORWARDED_UP if settings.forward_authorization else _NOT_FORWARDED_UP_NOR_AUTH
        )
        self._started = False

    async def start(self) -> None:
        """Pools open lazily, one per upstream base URL; this only marks the client usable."""
        self._started = True

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def _pool(self, base: str) -> Pool:
        pool = self._pools.get(base)
        if pool is None:
            pool = self._pools[base] = Pool(
                Origin.parse(base),
                self.settings.max_connections,
                self.settings.keepalive,
                _is_stream,
                asyncio.get_running_loop(),
            )
        return pool

    def send(self, exchange: Exchange) -> Awaitable[Reply]:
        """Relay `exchange`; raise UpstreamError when no answer could be had.

        Each call is one upstream attempt; `exchange.attempt_observers` (tracing)
        hear of its start, before the headers are built, and of its end: at the
        reply for a plain body, at the stream's end for a stream. A plain
        function handing out the attempt's coroutine, so the common case (no
        observers) costs no coroutine frame of its own.
        """
        if not exchange.attempt_observers:
            return self._send(exchange, None)
        return self._observed_send(exchange, exchange.attempt_observers)

    async def _observed_send(self, exchange: Exchange, observers: list[AttemptObserver]) -> Reply:
        finish: AttemptEnd
        if len(observers) == 1:  # the usual case (tracing): its end is the attempt's end
            finish = observers[0](exchange)
        else:
            ends = [observe(exchange) for observe in observers]

            def finish(status: int | None, error: BaseException | None) -> None:
                for end in ends:
                    end(status, error)

        try:
            reply = await self._send(exchange, finish)
        except BaseException as error:
            finish(None, error)
            raise
        if reply.chunks is None:
            finish(reply.status, None)
        return reply

    async def _send(self, exchange: Exchange, finish: AttemptEnd | None) -> Reply:
        """One attempt. One deadline, armed for `first_byte`, covers the whole exchange up to
        the reply: Ollama sends a plain body's headers only once the answer is ready,
        and the body right after them. The body must be a JSON object before it
        leaves: if no policy has parsed it yet, it is parsed here, once.
        """
        assert self._started, "start() first"
        if exchange.route.json_body:
            exchange.json  # noqa: B018 - raises the 400 for a body that is not a JSON object
        loop = asyncio.get_running_loop()
        timeouts = self._timeouts.get(exchange.route.name, self.settings.timeouts)
        deadline = exchange.started_at + timeouts.total
        first_byte_deadline = min(loop.time() + timeouts.first_byte, deadline)
        pool = self._pool(exchange.target or self.base_url)
        method = exchange.method
        body = exchange.body if exchange.body or method not in ("GET", "HEAD") else None
        target = pool.origin.prefix + exchange.path
        if exchange.query_string:
            target = f"{target}?{exchange.query_string}"
        try:
            request = encode_request(
                method,
                target,
                pool.origin.host_header,
                exchange.headers,
                self._drop,
                exchange.upstream_headers,
                body,
            )
        except ValueError as exc:
            # A policy's fault, not the upstream's: not retried, not held against a breaker.
            raise SidecarError(
                500, f"cannot send the request upstream: {exc}", code="invalid_upstream_header"
            ) from None
        rest = body if body is not None and len(request) < len(body) else None
        facts = exchange.facts
        sent_at = perf_counter()
        try:
            with self._deadlines.deadline(first_byte_deadline):
                connection = await self._roundtrip(
                    pool, request, rest, method == "HEAD", timeouts.connect
                )
        except TimeoutError:
            limit = "total" if deadline <= first_byte_deadline else "first_byte"
            raise self._failure(
                exchange,
                504,
                "timeout",
                "upstream_timeout",
                f"did not answer in time ({limit} timeout)",
            ) from None
        except Unreachable as exc:
            raise self._failure(
                exchange, 502, "unreachable", "upstream_unreachable", f"cannot be reached: {exc}"
            ) from None
        except UpstreamProtocolError as exc:
            raise self._failure(
                exchange, 502, "disconnected", "upstream_disconnected", f"answered badly: {exc}"
            ) from None
        except ConnectionError as exc:
            raise self._failure(
                exchange,
                502,
                "disconnected",
                "upstream_disconnected",
                f"closed the connection before its answer was complete: {exc.__class__.__name__}",
            ) from None
        ttfb = perf_counter() - sent_at
        facts["upstream_ttfb"] = ttfb
        self._metrics.for_route(exchange.route.name).ttfb.observe(ttfb)
        if not connection.streaming:
            reply_body = connection.body
            pool.release(connection)
            facts["upstream_time"] = facts.get("upstream_time", 0.0) + perf_counter() - sent_at
            return Reply(connection.status, connection.headers, body=reply_body)
        stream_format: Any = stream_format_of(connection.content_type)
        return Reply(
            connection.status,
            connection.headers,
            chunks=UpstreamChunks(
                self, pool, connection, exchange, stream_format, deadline, sent_at, finish
            ),
            stream_format=stream_format,
        )

    async def _roundtrip(
        self,
        pool: Pool,
        request: bytes,
        body: bytes | None,
        head_only: bool,
        connect_timeout: float,
    ) -> Connection:
        """Send on a pooled connection; resend once, fresh, if a reused one was already dead."""
        connection = await pool.acquire(connect_timeout)
        try:
            return await connection.send(request, body, head_only)
        except UpstreamClosed as exc:
            if not (connection.reused and exc.before_response):
                raise
            reason = exc.__class__.__name__
        except BaseException:
            # Cancelled or timed out with the request out: its answer must never be read
            # as the answer to the next request on this connection.
            connection.close()
            pool.release(connection)
            raise
        # The keep-alive race: the pooled connection was closed by the upstream
        # as the request went out, so nothing was processed. Once more, fresh.
        self._metrics.keepalive_resends.inc()
        log.info("upstream_resend_fresh_connection", reason=reason)
        connection = await pool.acquire(connect_timeout, fresh=True)
        try:
            return await connection.send(request, body, head_only)
        except BaseException:
            connection.close()
            pool.release(connection)
            raise

    def timeouts_for(self, route: str) -> TimeoutSettings:
        return self._timeouts.get(route, self.settings.timeouts)

    def _failure(
        self, exchange: Exchange, status: int, reason: str, code: str, what: str
    ) -> UpstreamError:
        self._metrics.upstream_errors.labels(reason).inc()
        base = exchange.target or self.base_url
        return UpstreamError(status, f"the upstream at {base} {what}", code=code)

    async def probe(self, within: float) -> str:
        """Check that the upstream answers at all; Ollama's version when it tells it.

        Any answer below 500 counts as reachable, so an OpenAI-compatible server
        without Ollama's /api/version (llama.cpp's, say) still makes the pod ready.
        """
        assert self._started, "start() first"
        pool = self._pool(self.base_url)
        request = encode_request(
            "GET",
            pool.origin.prefix + "/api/version",
            pool.origin.host_header,
            {},
            self._drop,
            None,
            None,
        )
        async with asyncio.timeout(within):
            connection = await self._roundtrip(
                pool, request, None, False, self.settings.timeouts.connect
            )
            if connection.streaming:  # not what /api/version answers; do not read on
                connection.close()
                pool.release(connection)
                return "unknown"
            status, body = connection.status, connection.body
            pool.release(connection)
        if status >= 500:
            raise UpstreamError(502, f"GET /api/version answered {status}")
        if status != 200:
            return "unknown"
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return "unknown"
        version = document.get("version") if isinstance(document, dict) else None
        return str(version or "unknown")


class UpstreamChunks(WatchedChunks):
    """The upstream's stream chunk by chunk, raising StreamInterrupted unless it ends well.

    Read straight off the connection (not through an `async def` generator
    wrapped in a watcher: one layer per chunk fewer), and watched like any
    stream: policies that watch it add themselves here. However it ends, the
    attempt is reported and the connection goes back to the pool (complete) or
    is closed (anything else; a client gone makes Ollama stop generating).
    The idle deadline is checked only while waiting for data, and moving it
    costs nothing, so a busy stream pays no timer per chunk.
    """

    __slots__ = (
        "_check",
        "_connection",
        "_deadline",
        "_idle",
        "_loop",
        "_push_error",
        "_sink",
        "_waiting",
    )

    def __init__(
        self,
        upstream: Upstream,
        pool: Pool,
        connection: Connection,
        exchange: Exchange,
        stream_format: StreamFormat,
        deadline: float,
        sent_at: float,
        finish: AttemptEnd | None,
    ) -> None:
        def ended(how: StreamEnd, error: StreamInterrupted | None) -> None:
            if finish is not None:
                finish(connection.status, error)
            facts = exchange.facts
            facts["upstream_time"] = facts.get("upstream_time", 0.0) + perf_counter() - sent_at
            if how != "complete":
                connection.close()
            pool.release(connection)

        super().__init__(None, ended)
        self._connection = connection
        self._loop = asyncio.get_running_loop()
        self._idle = upstream.timeouts_for(exchange.route.name).idle
        self._deadline = deadline
        self._waiting = upstream._deadlines.deadline(deadline)
        self._check = end_check(exchange.route.stream_end, stream_format)
        self._sink: ChunkSink | None = None
        self._push_error: BaseException | None = None

    async def asend(self, value: None) -> bytes:
        # WatchedChunks.asend with the read inlined: per relayed chunk, the frames
        # that wake are this one and whoever awaits it, nothing in between.
        if self._first is not None:
            chunk, self._first = self._first, None
        else:
            try:
                chunk = await self._read() if self._must_wait() else self._take()
            except BaseException as error:
                self._ended_by(error)
                raise
        if self._on_first is not None:
            on_first, self._on_first = self._on_first, None
            on_first()
        return chunk

    def push_pipeline(self) -> tuple[PushSource, list[Layer]] | None:
        if self._first is not None or self._on_first is not None:
            return None
        return self, []

    def push_to(self, sink: ChunkSink | None) -> None:
        """While the reader waits, hand arriving chunks to `sink` (None: stop)."""
        self._sink = sink

    def _pushed(self, chunk: bytes) -> bool:
        """The connection's callback for a piece that arrived while the reader waits."""
        sink = self._sink
        if sink is None or not sink.accepts():
            return False  # buffered; the reader wakes and takes it the usual way
        if self._check is not None:
            self._check.feed(chunk)
        self._idle_from_now()  # the reader is still waiting: each chunk counts as activity
        try:
            sink.take(chunk)
        except BaseException as error:  # never into the protocol: the reader raises it
            self._sink = None
            self._push_error = error
            self._connection.wake()
        return True

    def _idle_from_now(self) -> None:
        """The wait's deadline: `idle` from now, never past the total deadline."""
        self._waiting.move(min(self._loop.time() + self._idle, self._deadline))

    def _must_wait(self) -> bool:
        connection = self._connection
        return not connection.has_data and not connection.at_eof

    def _take(self) -> bytes:
        """What has arrived (there is something, or the end): StopAsyncIteration at a good end."""
        try:
            chunk = self._connection.read_nowait()
        except ConnectionError as exc:
            raise _broken(exc) from None
        if not chunk:
            check = self._check
            if check is not None and not check.complete():
                raise StreamInterrupted(
                    "the upstream stream ended before its final event",
                    code="upstream_stream_incomplete",
                )
            if self._sink is not None:
                # The client's answer ends now; the watchers' bookkeeping comes after.
                sink, self._sink = self._sink, None
                sink.end()
            raise StopAsyncIteration
        if self._check is not None:
            self._check.feed(chunk)
        return chunk

    async def _read(self) -> bytes:
        """Wait for the next piece (the idle and total deadlines apply only here), then take it."""
        loop = self._loop
        waiting = self._waiting
        connection = self._connection
        self._idle_from_now()
        if self._sink is not None:
            connection.sink = self._pushed
        try:
            with waiting:
                await connection.wait()
        except TimeoutError:
            reason = "total" if loop.time() >= self._deadline else "idle"
            raise StreamInterrupted(
                f"the upstream stream stalled ({reason} timeout)", code="upstream_timeout"
            ) from None
        finally:
            connection.sink = None
        if self._push_error is not None:
            error, self._push_error = self._push_error, None
            raise error
        return self._take()


def _broken(exc: BaseException) -> StreamInterrupted:
    return StreamInterrupted(f"the upstream connection broke mid-stream: {exc.__class__.__name__}")
