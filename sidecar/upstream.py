"""The pooled client to Ollama: the innermost step of the chain.

One long-lived ClientSession keeps connections alive between requests. A
request that dies on a pooled connection before any response byte (the
upstream closed an idle keep-alive connection just as the request went out)
is sent once more on a connection opened for it alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from time import perf_counter
from typing import Any

import aiohttp
import structlog
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.config import UpstreamSettings
from sidecar.deadlines import DeadlineWatch
from sidecar.errors import StreamInterrupted, UpstreamError
from sidecar.exchange import AttemptEnd, AttemptObserver, Exchange, Reply, StreamFormat
from sidecar.observability import Metrics
from sidecar.replies import StreamEnd, WatchedChunks
from sidecar.streams import end_check, stream_format_of

log = structlog.get_logger("sidecar.upstream")

# RFC 9110 §7.6.1 hop-by-hop headers, plus what the sidecar sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED_UP = HOP_BY_HOP | {
    "host",
    "content-length",
    "content-encoding",
    "accept-encoding",
    "expect",
}
_NOT_FORWARDED_UP_NOR_AUTH = _NOT_FORWARDED_UP | {"authorization"}
_NOT_FORWARDED_DOWN = HOP_BY_HOP | {"content-length", "content-encoding"}


def _drop(headers: CIMultiDict[str], names: frozenset[str]) -> None:
    """Remove `names`, and every header the Connection header names (RFC 9110 §7.6.1)."""
    connection = headers.get("Connection")
    for name in names:
        if name in headers:
            del headers[name]
    if connection:
        for token in connection.split(","):
            headers.popall(token.strip(), None)


def outgoing_headers(
    client_headers: CIMultiDictProxy[str], extra: CIMultiDict[str], forward_authorization: bool
) -> CIMultiDict[str]:
    """The client's end-to-end headers for the upstream, plus what policies added.

    Copied whole and trimmed (a C-level copy and a few lookups) rather than
    filtered header by header in Python.
    """
    headers = CIMultiDict(client_headers)
    _drop(headers, _NOT_FORWARDED_UP if forward_authorization else _NOT_FORWARDED_UP_NOR_AUTH)
    # No compression inside the pod: it costs CPU on both sides and would hide
    # the bytes from policies that watch them.
    headers["Accept-Encoding"] = "identity"
    if extra:
        headers.update(extra)
    return headers


def incoming_headers(upstream_headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The upstream's end-to-end response headers for the client."""
    headers = CIMultiDict(upstream_headers)
    _drop(headers, _NOT_FORWARDED_DOWN)
    return headers


class Upstream:
    """Sends an Exchange to the upstream and returns its Reply, body unread for streams."""

    def __init__(
        self, settings: UpstreamSettings, metrics: Metrics, deadlines: DeadlineWatch
    ) -> None:
        self.settings = settings
        self.base_url = settings.url
        self._metrics = metrics
        self._session: aiohttp.ClientSession | None = None
        self._fresh_session: aiohttp.ClientSession | None = None
        self._deadlines = deadlines
        self._urls: dict[str, URL] = {}
        self._timeouts = {route: settings.timeouts_for(route) for route in settings.route_timeouts}
        self._connect_timeouts = {
            route: aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect)
            for route, timeouts in self._timeouts.items()
        }
        self._default_connect_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.timeouts.connect
        )

    async def start(self) -> None:
        """Open the pools; needs the running loop, hence not in __init__."""
        timeouts = self.settings.timeouts
        client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.settings.max_connections,
                limit_per_host=0,
                keepalive_timeout=self.settings.keepalive or None,
                enable_cleanup_closed=False,
            ),
            timeout=client_timeout,
            # Cookies from one client's answer must never ride on another client's request.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=True,
            skip_auto_headers=("User-Agent",),
        )
        self._fresh_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            timeout=client_timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        for session in (self._session, self._fresh_session):
            if session is not None:
                await session.close()

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
        """One attempt. One timer, armed for `first_byte`, covers the whole exchange up to the
        reply: Ollama sends a plain body's headers only once the answer is ready,
        and the body right after them. The body must be a JSON object before it
        leaves: if no policy has parsed it yet, it is parsed here, once.
        """
        assert self._session is not None and self._fresh_session is not None, "start() first"
        if exchange.route.json_body:
            exchange.json  # noqa: B018 - raises the 400 for a body that is not a JSON object
        loop = asyncio.get_running_loop()
        timeouts = self._timeouts.get(exchange.route.name, self.settings.timeouts)
        deadline = exchange.started_at + timeouts.total
        first_byte_deadline = min(loop.time() + timeouts.first_byte, deadline)
        url = self._url(exchange.target or self.base_url, exchange.path, exchange.query_string)
        headers = outgoing_headers(
            exchange.headers, exchange.upstream_headers, self.settings.forward_authorization
        )
        data = exchange.body if exchange.body or exchange.method not in ("GET", "HEAD") else None
        facts = exchange.facts
        sent_at = perf_counter()
        response: aiohttp.ClientResponse | None = None
        try:
            with self._deadlines.deadline(first_byte_deadline):
                response = await self._request(
                    exchange.method,
                    url,
                    headers,
                    data,
                    self._connect_timeouts.get(exchange.route.name, self._default_connect_timeout),
                )
                ttfb = perf_counter() - sent_at
                facts["upstream_ttfb"] = ttfb
                self._metrics.for_route(exchange.route.name).ttfb.observe(ttfb)
                stream_format: Any = stream_format_of(response.headers.get("Content-Type"))
                if stream_format is None:
                    body = await response.read()
        except TimeoutError:
            if response is not None:
                response.close()
            limit = "total" if deadline <= first_byte_deadline else "first_byte"
            raise self._failure(
                exchange,
                504,
                "timeout",
                "upstream_timeout",
                f"did not answer in time ({limit} timeout)",
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise self._failure(
                exchange,
                502,
                "unreachable",
                "upstream_unreachable",
                f"cannot be reached: {exc.strerror or exc}",
            ) from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            if response is not None:
                response.close()
            raise self._failure(
                exchange,
                502,
                "disconnected",
                "upstream_disconnected",
                f"closed the connection before its answer was complete: {exc.__class__.__name__}",
            ) from None
        reply_headers = incoming_headers(response.headers)
        if stream_format is None:
            response.release()
            facts["upstream_time"] = facts.get("upstream_time", 0.0) + perf_counter() - sent_at
            return Reply(response.status, reply_headers, body=body)
        started = [False]
        stream = self._stream(response, exchange, stream_format, deadline, sent_at, finish, started)

        def closed_early(how: StreamEnd, error: StreamInterrupted | None) -> None:
            # Only matters when the stream is closed before its first read: then
            # the generator's own `finally` never runs and would leave these undone.
            if how == "abandoned" and not started[0]:
                response.close()
                if finish is not None:
                    finish(response.status, None)

        return Reply(
            response.status,
            reply_headers,
            chunks=WatchedChunks(stream, closed_early),
            stream_format=stream_format,
        )

    def _url(self, base: str, path: str, query_string: str) -> URL:
        """The upstream URL; the few route paths are parsed once, not per request."""
        if query_string:
            return URL(f"{base}{path}?{query_string}", encoded=True)
        key = base + path
        url = self._urls.get(key)
        if url is None:
            url = URL(key, encoded=True)
            if len(self._urls) < 1024:  # /v1/models/{id} paths are open-ended
                self._urls[key] = url
        return url

    def _failure(
        self, exchange: Exchange, status: int, reason: str, code: str, what: str
    ) -> UpstreamError:
        self._metrics.upstream_errors.labels(reason).inc()
        base = exchange.target or self.base_url
        return UpstreamError(status, f"the upstream at {base} {what}", code=code)

    async def _request(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        data: bytes | None,
        connect_timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        assert self._session is not None and self._fresh_session is not None

        def through(session: aiohttp.ClientSession) -> Awaitable[aiohttp.ClientResponse]:
            return session.request(
                method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=connect_timeout,
            )

        try:
            return await through(self._session)
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            # The keep-alive race: the pooled connection was closed by the upstream
            # as the request went out, so nothing was processed. Once more, fresh.
            self._metrics.keepalive_resends.inc()
            log.info("upstream_resend_fresh_connection", reason=exc.__class__.__name__)
            return await through(self._fresh_session)

    async def _stream(
        self,
        response: aiohttp.ClientResponse,
        exchange: Exchange,
        stream_format: StreamFormat,
        deadline: float,
        sent_at: float,
        finish: AttemptEnd | None,
        started: list[bool],
    ) -> AsyncGenerator[bytes, None]:
        """The upstream's stream chunk by chunk, raising StreamInterrupted unless it ends well.

        The idle deadline is checked only while waiting for data, and moving it
        costs nothing, so a busy stream pays no timer per chunk. Closing this
        generator (client gone) closes the upstream connection at once, which
        makes Ollama stop generating.
        """
        loop = asyncio.get_running_loop()
        idle = self._timeouts.get(exchange.route.name, self.settings.timeouts).idle
        content = response.content
        check = end_check(exchange.route.stream_end, stream_format)
        waiting = self._deadlines.deadline(deadline)
        finished = False
        broken: StreamInterrupted | None = None
        started[0] = True
        try:
            while True:
                chunk = content.read_nowait(-1)
                if not chunk:
                    if content.at_eof():
                        break
                    waiting.move(min(loop.time() + idle, deadline))
                    try:
                        with waiting:
                            chunk = await content.readany()
                    except TimeoutError:
                        reason = "total" if loop.time() >= deadline else "idle"
                        raise StreamInterrupted(
                            f"the upstream stream stalled ({reason} timeout)",
                            code="upstream_timeout",
                        ) from None
                    except (aiohttp.ClientError, ConnectionError) as exc:
                        raise StreamInterrupted(
                            f"the upstream connection broke mid-stream: {exc.__class__.__name__}"
                        ) from None
                    if not chunk:
                        break
                if check is not None:
                    check.feed(chunk)
                yield chunk
            if check is not None and not check.complete():
                raise StreamInterrupted(
                    "the upstream stream ended before its final event",
                    code="upstream_stream_incomplete",
                )
            finished = True
        except StreamInterrupted as error:
            broken = error
            raise
        finally:
            if finish is not None:
                finish(response.status, broken)
            exchange.facts["upstream_time"] = (
                exchange.facts.get("upstream_time", 0.0) + perf_counter() - sent_at
            )
            if finished:
                response.release()
            else:
                response.close()

    async def probe(self, within: float) -> str:
        """Check that the upstream answers at all; Ollama's version when it tells it.

        Any answer below 500 counts as reachable, so an OpenAI-compatible server
        without Ollama's /api/version (llama.cpp's, say) still makes the pod ready.
        """
        assert self._session is not None, "start() first"
        async with asyncio.timeout(within):
            async with self._session.get(self.base_url + "/api/version") as response:
                if response.status >= 500:
                    raise UpstreamError(502, f"GET /api/version answered {response.status}")
                if response.status != 200:
                    return "unknown"
                document = await response.json(content_type=None)
        version = document.get("version") if isinstance(document, dict) else None
        return str(version or "unknown")
