"""A lean HTTP/1.1 client for the one hop to the upstream: a keep-alive pool and httptools.

Why not aiohttp's ClientSession, which the rest of the sidecar uses: measured in
bench/ (issue 7), a ClientSession round trip is more than half of what a bare
aiohttp proxy spends per request (request and response objects, URL and cookie
handling, redirect and tracing hooks, a timer per request). The sidecar talks to
one trusted, known upstream with a fixed set of paths: it needs a pool, a
request written as bytes and a response parsed by llhttp (through httptools,
the parser uvicorn uses), and nothing else. The server side stays aiohttp.

A Connection is also the response it is reading: status, end-to-end headers
and either the whole body (plain answers: the waiter wakes once, at the end)
or a buffer of body pieces the caller drains (streams: the waiter wakes at the
headers, then the caller takes what arrived). Hop-by-hop headers are dropped
here, where HTTP framing is handled; gzip/deflate bodies are decoded here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

# RFC 9110 §7.6.1 hop-by-hop headers.
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
# Response headers the client never gets as they came: framing is redone by our server.
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)
_DECODED = frozenset({b"gzip", b"x-gzip", b"deflate"})
# A stream's unread buffer above which the upstream socket stops being read (back-pressure
# from a slow client reaches the upstream), and below which reading resumes.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# Bodies at least this big are written after the head rather than copied into one buffer.
_JOIN_LIMIT = 64 * 1024

IsStream = Callable[[str | None], bool]


class UpstreamClosed(ConnectionError):
    """The connection ended before the answer was complete.

    `before_response`: no byte of the answer had arrived (on a reused
    connection this is the keep-alive race, and the request is safe to resend).
    """

    def __init__(self, message: str, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


class UpstreamProtocolError(ConnectionError):
    """The upstream answered with something that is not HTTP/1.1."""


class Unreachable(OSError):
    """No connection could be opened (refused, unresolvable, or the connect timeout)."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True, slots=True)
class Origin:
    """Where an upstream base URL points: scheme, host, port, and a path prefix."""

    host: str
    port: int
    tls: bool
    prefix: str
    host_header: str

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        parts = urlsplit(base_url)
        tls = parts.scheme == "https"
        host = parts.hostname or "127.0.0.1"
        port = parts.port or (443 if tls else 80)
        shown = f"[{host}]" if ":" in host else host
        default = 443 if tls else 80
        return cls(
            host=host,
            port=port,
            tls=tls,
            prefix=parts.path.rstrip("/"),
            host_header=shown if port == default else f"{shown}:{port}",
        )


def encode_request(
    method: str,
    target: str,
    host_header: str,
    headers: Any,
    drop: frozenset[str],
    extra: CIMultiDict[str] | None,
    body: bytes | None,
) -> bytes:
    """The request head (and a small body) as bytes.

    `headers` are the client's (a multidict), minus `drop` (lower-case names),
    minus every header the client's Connection header names, minus those
    `extra` replaces; `extra` (from policies) is added after them. The body,
    when given, is framed by Content-Length; no compression is asked for. The
    body is joined to the head when it is small or smaller than the head, so
    the caller must write it separately exactly when the result is shorter
    than the body.
    """
    connection = headers.getall("Connection", None) if headers else None
    if connection:
        # Every Connection field counts: a second one must not slip a header through.
        drop = drop | {token.strip().lower() for field in connection for token in field.split(",")}
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host_header}"]
    append = lines.append
    for name, value in headers.items():
        if name.lower() in drop or (extra and name in extra):
            continue
        append(f"{name}: {value}")
    if extra:
        for name, value in extra.items():
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
                raise ValueError(f"header {name!r} has a line break in it")
            append(f"{name}: {value}")
    append("Accept-Encoding: identity")
    if body is not None:
        append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    if body and (len(body) < _JOIN_LIMIT or len(head) >= len(body)):
        return head + body
    return head


class Connection(asyncio.Protocol):
    """One keep-alive connection, and the response currently being read on it."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.reused = False
        self.idle_since = 0.0
        self.closed = False
        self._busy = False
        self._ready: asyncio.Future[Connection] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._informational = False
        self._head_only = False
        self._got_bytes = False
        self._framed = False
        self._keep_alive = True
        self._decoder: Any = None
        self._paused = False
        # Set while a stream's reader waits (UpstreamChunks): a piece it takes (returns
        # True) is handed on in this callback, never buffered, and wakes nobody.
        self.sink: Callable[[bytes], bool] | None = None
        self.status = 0
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_type: str | None = None
        self.streaming = False
        self.complete = False
        self.error: BaseException | None = None
        self._pieces: list[bytes] = []
        self._buffered = 0

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if not self._busy:
            # Bytes nobody asked for (on an idle connection): it cannot be trusted again.
            self.close()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamProtocolError(f"the upstream's answer is not valid HTTP: {exc}"))
            self.close()
        except httptools.HttpParserUpgrade:
            # A 101 (or Connection: upgrade): not an HTTP/1.1 answer this client reads.
            self._fail(UpstreamProtocolError("the upstream switched protocols"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._busy and not self.complete:
            if (
                exc is None
                and self.status
                and not self._framed
                and not self._informational
                and self.error is None
            ):
                # No Content-Length and not chunked: the body ends where the connection does
                # (a clean close only: a reset may have cut it short).
                self._keep_alive = False
                self.on_message_complete()
            else:
                self._fail(
                    UpstreamClosed(
                        "the upstream closed the connection"
                        + (f" ({exc})" if exc else "")
                        + ("" if self._got_bytes else " before answering"),
                        before_response=not self._got_bytes,
                    )
                )
        self._pool._forget(self)

    # -- httptools callbacks ---------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:
            # A second answer to one request: the connection is out of step; never reuse it.
            self._keep_alive = False
            return
        status = self._parser.get_status_code()
        if status < 200:
            # 1xx (Expect is never sent, but a server may still say 100 or 103): skip it.
            self._informational = True
            self._raw_headers = []
            return
        self.status = status
        self._keep_alive = self._parser.should_keep_alive()
        headers: CIMultiDict[str] = CIMultiDict()
        named: set[bytes] | None = None
        encoding: bytes | None = None
        for name, value in self._raw_headers:
            lower = name.lower()
            if lower in _FRAMING:
                self._framed = True
                continue
            if lower in _HOP_BY_HOP_BYTES:
                if lower == b"connection":  # every Connection field counts, not the last
                    named = named or set()
                    named.update(token.strip().lower() for token in value.split(b","))
                continue
            if lower == b"content-encoding" and value.strip().lower() in _DECODED:
                encoding = value.strip().lower()
                continue
            text = value.decode("utf-8", "surrogateescape")
            if lower == b"content-type":
                self.content_type = text
            headers.add(name.decode("latin-1"), text)
        if named:
            for token in named:
                headers.popall(token.decode("latin-1"), None)
        self._raw_headers = []
        self.headers = headers
        if encoding is not None:
            self._decoder = zlib.decompressobj(wbits=47 if encoding != b"deflate" else 15)
        if self._head_only or status in (204, 304):
            self._keep_alive = self._keep_alive and not self._head_only
            self.on_message_complete()
            return
        self.streaming = self._pool.is_stream(self.content_type)
        if self.streaming:
            ready = self._ready
            if ready is not None and not ready.done():
                ready.set_result(self)

    def on_body(self, body: bytes) -> None:
        if self.complete:  # the rest of a HEAD answer's announced body, say
            return
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error as exc:
                self._fail(UpstreamProtocolError(f"the upstream's compressed body is bad: {exc}"))
                self.close()
                return
            if not body:
                return
        if self.streaming:
            sink = self.sink
            if sink is not None and not self._pieces and sink(body):
                return
        self._pieces.append(body)
        if self.streaming:
            self._buffered += len(body)
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if self._buffered > HIGH_WATER and not self._paused and self._transport is not None:
                self._paused = True
                self._transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self.complete:
            return
        if self._decoder is not None:
            rest = self._decoder.flush()
            if rest:
                self._pieces.append(rest)
            self._decoder = None
        self.complete = True
        if self._head_only:
            self._keep_alive = False
        if self.streaming:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        else:
            ready = self._ready
            if ready is not None and not ready.done():
                ready.set_result(self)

    # -- use ---------------------------------------------------------------------

    def send(
        self, request: bytes, body: bytes | None, head_only: bool
    ) -> asyncio.Future[Connection]:
        """Write the request; the future gives this connection once the answer is readable.

        `body` is written separately when `encode_request` did not join it
        (large bodies are not copied into the head's buffer).
        """
        assert self._transport is not None
        self._ready = ready = self._pool.loop.create_future()
        self._busy = True
        self._head_only = head_only
        self._got_bytes = False
        self._framed = False
        self.status = 0
        self.content_type = None
        self.streaming = False
        self.complete = False
        self.error = None
        self._pieces = []
        self._buffered = 0
        if self.closed:
            self._fail(UpstreamClosed("the upstream closed the connection", before_response=True))
            return ready
        self._transport.write(request)
        if body is not None:
            self._transport.write(body)
        return ready

    @property
    def body(self) -> bytes:
        """A plain answer's whole body (after the ready future)."""
        pieces = self._pieces
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read_nowait(self) -> bytes:
        """What a stream has received and nobody took yet; b"" if nothing (raises if broken)."""
        pieces = self._pieces
        if not pieces:
            if self.error is not None:
                raise self.error
            return b""
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._buffered = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    @property
    def has_data(self) -> bool:
        """Something to read now: body pieces, or an error to raise."""
        return bool(self._pieces) or self.error is not None

    @property
    def at_eof(self) -> bool:
        return self.complete and not self._pieces

    def wait(self) -> asyncio.Future[None]:
        """Done when the stream has more, ends, or breaks: await it.

        A future, not a coroutine: a relayed chunk wakes one frame fewer.
        """
        waiter: asyncio.Future[None] = self._pool.loop.create_future()
        if self._pieces or self.complete or self.error is not None:
            waiter.set_result(None)
        else:
            self._waiter = waiter
        return waiter

    def wake(self) -> None:
        """Finish the pending `wait()` now (a sink failed and its reader must learn it)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def reusable(self) -> bool:
        return self.complete and self._keep_alive and not self.closed and self.error is None

    def close(self) -> None:
        """Drop the connection (an abandoned stream: the upstream sees it and stops)."""
        if self._transport is not None and not self.closed:
            self._transport.close()
        self.closed = True

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_exception(error)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Pool:
    """Keep-alive connections to one origin, at most `limit` open, idle ones closed after `keepalive`."""

    def __init__(
        self,
        origin: Origin,
        limit: int,
        keepalive: float,
        is_stream: IsStream,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.origin = origin
        self.is_stream = is_stream
        self.loop = loop
        self._limit = limit
        self._keepalive = keepalive
        self._idle: deque[Connection] = deque()
        self._open: set[Connection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if origin.tls else None
        self._closed = False

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def open_count(self) -> int:
        return len(self._open) + self._connecting

    async def acquire(self, connect_timeout: float, fresh: bool = False) -> Connection:
        """A connection to send one request on: the most recently idle one, or a new one."""
        while True:
            if self._closed:
                raise Unreachable("the upstream client is closed")
            if not fresh:
                idle = self._idle
                while idle:
                    connection = idle.pop()
                    if not connection.closed:
                        connection.reused = True
                        return connection
            if len(self._open) + self._connecting < self._limit:
                return await self._connect(connect_timeout)
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    async def _connect(self, connect_timeout: float) -> Connection:
        origin = self.origin
        self._connecting += 1
        try:
            async with asyncio.timeout(connect_timeout):
                _, connection = await self.loop.create_connection(
                    lambda: Connection(self),
                    origin.host,
                    origin.port,
                    ssl=self._ssl,
                    server_hostname=origin.host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise Unreachable(
                f"no connection within the connect timeout ({connect_timeout:g}s)", timed_out=True
            ) from None
        except OSError as exc:
            raise Unreachable(exc.strerror or str(exc) or exc.__class__.__name__) from None
        finally:
            self._connecting -= 1
            self._wake()
        self._open.add(connection)
        return connection

    def release(self, connection: Connection) -> None:
        """Hand back a connection whose answer was read to the end (or drop it if it can't stay)."""
        connection._busy = False
        if self._closed or self._keepalive <= 0 or not connection.reusable:
            connection.close()
            return
        connection.idle_since = self.loop.time()
        connection.reused = True
        self._idle.append(connection)
        if self._sweep is None:
            self._sweep = self.loop.call_later(self._keepalive, self._close_stale)
        self._wake()

    def _forget(self, connection: Connection) -> None:
        """Called by a connection as it closes: it no longer counts, and a waiter may connect."""
        if connection in self._open:
            self._open.discard(connection)
            with contextlib.suppress(ValueError):
                self._idle.remove(connection)
            self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
                return

    def _close_stale(self) -> None:
        self._sweep = None
        cutoff = self.loop.time() - self._keepalive
        idle = self._idle
        while idle and idle[0].idle_since <= cutoff:
            idle.popleft().close()
        if idle:
            delay = idle[0].idle_since + self._keepalive - self.loop.time()
            self._sweep = self.loop.call_later(max(delay, 0.01), self._close_stale)

    def close(self) -> None:
        """Close every connection; requests still reading lose theirs."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
