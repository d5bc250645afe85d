"""Writes a Reply to the client: whole bodies at once, streams chunk by chunk.

The bytes of an answer (status line, headers, chunk framing) are written here,
the way aiohttp's own response classes write them; aiohttp runs the connection.

Each chunk is written as it arrives and awaited (back-pressure), with nothing
added, nothing buffered and no parsing. When the upstream breaks after the
first byte the client gets an explicit error event, never a clean-looking end.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion, HttpVersion10, HttpVersion11
from multidict import CIMultiDict

from sidecar.errors import StreamInterrupted, stream_error_event
from sidecar.exchange import Exchange, Reply
from sidecar.replies import Layer, PushSource, WatchedChunks

log = structlog.get_logger("sidecar.relay")


class RelayedStream(web.StreamResponse):
    """aiohttp's streamed answer, for the streams StreamedResponse does not take
    (HEAD, bodiless statuses): aiohttp knows to send no body there.

    Its head waits for the first chunk or the end rather than going out alone at
    `prepare`.
    """

    _send_headers_immediately = False


class WholeResponse(web.StreamResponse):
    """A whole answer written as one buffer when aiohttp prepares it.

    `web.Response` gets there through a copy of the headers, a payload writer and
    four coroutines, which cost about a twentieth of a relayed request; this
    writes the same bytes (status line, the headers with Content-Length, Date,
    Server and Connection as aiohttp sets them, the body) in one call. Only for
    the plain case: a body to send, no Transfer-Encoding; HEAD, 1xx, 204 and
    304 answers go through `web.Response`.
    """

    @staticmethod
    def fits(method: str, status: int, headers: CIMultiDict[str]) -> bool:
        return (
            method != "HEAD"
            and status >= 200
            and status not in (204, 304)
            and "Transfer-Encoding" not in headers
        )

    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        super().__init__(status=status)
        self._headers = headers  # the reply's own, not copied
        self._whole = body

    async def prepare(self, request: web.BaseRequest) -> None:
        self.send(request)

    def send(self, request: web.BaseRequest) -> None:
        """Write the whole answer now (once; later calls do nothing)."""
        if self._eof_sent:
            return
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        body = self._whole
        head = _serialized_head(
            request.version, self.status, self.reason, self._headers, keep_alive, body
        )
        transport.write(head + body)
        self._eof_sent = True
        self._body_length = len(body)


class StreamedResponse(web.StreamResponse):
    """A relayed stream whose head goes out with its first chunk, in one write, framed here.

    aiohttp's StreamResponse sends the head at `prepare` (or buffers it in its
    payload writer) and goes through two coroutines and several calls per
    write; the relay frames its chunks itself anyway. HTTP/1.1 clients get
    chunked encoding; HTTP/1.0 clients get the bytes until the connection
    closes, as aiohttp does. Back-pressure is aiohttp's: `drain` waits while the
    server's protocol has paused writing. Only where WholeResponse.fits (a
    status with a body, no HEAD); elsewhere RelayedStream.
    """

    def __init__(self, status: int, headers: CIMultiDict[str]) -> None:
        super().__init__(status=status)
        self._headers = headers  # the reply's own, not copied
        self._head: bytes | None = None  # serialized at prepare, written with the first bytes
        self._transport: Any = None
        self._writer: Any = None

    async def prepare(self, request: web.BaseRequest) -> None:
        if self._eof_sent or self._transport is not None:
            return
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        if request.version >= HttpVersion11:
            self._chunked = True
            keep_alive = request.keep_alive if self._keep_alive is None else self._keep_alive
        else:
            keep_alive = False  # no length: the body ends when the connection does
        self._keep_alive = keep_alive
        self._head = _serialized_head(
            request.version, self.status, self.reason, self._headers, keep_alive, None
        )
        self._transport = transport
        # `prepared` and aiohttp's own checks read these; the writing is done here.
        self._writer = self._payload_writer = request._payload_writer
        self._req = request

    def send_nowait(self, chunk: bytes) -> bool:
        """Frame and write `chunk` (with the head, the first time); True if the client lags
        (bytes wait in the socket buffer: `await drain()` before the next)."""
        transport = self._transport
        if transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        data = _framed(chunk, self._chunked)
        head = self._head
        if head is not None:
            self._head = None
            data = head + data
        transport.write(data)
        return bool(transport.get_write_buffer_size())

    def end_nowait(self, rest: bytes = b"") -> None:
        """Write `rest` and the end of the answer now (the stream ended well); write_eof
        is then a no-op."""
        if self._eof_sent:
            return
        end = b"0\r\n\r\n" if self._chunked else b""
        if rest:
            end = _framed(rest, self._chunked) + end
        head = self._head
        if head is not None:
            self._head = None
            end = head + end
        if end:
            self._transport.write(end)
        self._eof_sent = True
        self._req = None
        self._payload_writer = None

    async def drain(self) -> None:
        """Wait while the server's protocol has paused writing (the client's buffer is full)."""
        await self._writer.drain()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if data and self.send_nowait(bytes(data)):
            await self.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        if data:
            await self.write(data)
        if self._transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self.end_nowait()
        await self._writer.drain()


def _framed(chunk: bytes, chunked: bool) -> bytes:
    """`chunk` as one HTTP/1.1 chunk, or as it is for a body that ends with the connection."""
    return b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk


def _serialized_head(
    version: HttpVersion,
    status: int,
    reason: str,
    headers: CIMultiDict[str],
    keep_alive: bool,
    body: bytes | None,
) -> bytes:
    """Status line and headers as aiohttp's Response writes them: Content-Length (a whole
    `body`) or chunked (HTTP/1.1 stream), Content-Type, Date, Server, Connection."""
    lines = [f"HTTP/{version[0]}.{version[1]} {status} {reason}"]
    append = lines.append
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} has a line break in it")
        append(f"{name}: {value}")
    if body is None:
        if version >= HttpVersion11:
            append("Transfer-Encoding: chunked")
        if "Content-Type" not in headers:
            append("Content-Type: application/octet-stream")
    else:
        if "Content-Length" not in headers:
            append(f"Content-Length: {len(body)}")
        if body and "Content-Type" not in headers:
            append("Content-Type: application/octet-stream")
    if "Date" not in headers:
        append(f"Date: {rfc822_formatted_time()}")
    if "Server" not in headers:
        append(f"Server: {SERVER_SOFTWARE}")
    if "Connection" not in headers:
        if keep_alive:
            if version == HttpVersion10:
                append("Connection: keep-alive")
        elif version == HttpVersion11:
            append("Connection: close")
    append("\r\n")
    return "\r\n".join(lines).encode("utf-8")


async def relay(
    request: web.BaseRequest, reply: Reply, exchange: Exchange, closing: bool = False
) -> web.StreamResponse:
    """Send `reply` to the client and return the (finished or prepared) response.

    A whole answer is written here and now, not when aiohttp prepares the
    returned response after the handler: the request's bookkeeping (metrics,
    the access line) then runs after the client has its answer, not before.
    `closing` (the sidecar is draining) ends the connection after the answer,
    and says so in its `Connection` header.

    A client that goes away mid-stream is noted as `facts["client_gone"]`; the
    upstream stream is closed either way.
    """
    headers = reply.headers
    if exchange.response_headers:
        headers.update(exchange.response_headers)
    chunks = reply.chunks
    if chunks is None:
        exchange.facts["bytes_out"] = len(reply.body)
        whole: web.StreamResponse
        if WholeResponse.fits(request.method, reply.status, headers):
            whole = WholeResponse(reply.status, headers, reply.body)
        else:  # HEAD, bodiless statuses: aiohttp's own, written after the handler
            whole = web.Response(status=reply.status, body=reply.body, headers=headers)
        if closing:
            whole.force_close()
        if isinstance(whole, WholeResponse):
            try:
                whole.send(request)
            except ConnectionError:
                # Gone before its answer: aiohttp's own prepare meets the closed
                # connection again and ends quietly, as with any answer.
                exchange.facts["client_gone"] = True
        return whole

    headers["X-Accel-Buffering"] = "no"
    headers.setdefault("Cache-Control", "no-cache")
    response: StreamedResponse | RelayedStream
    if WholeResponse.fits(request.method, reply.status, headers):
        response = StreamedResponse(reply.status, headers)
    else:
        response = RelayedStream(status=reply.status, headers=headers)
        if request.version >= (1, 1):
            # Said outright (aiohttp would choose it anyway): the fast path below frames
            # chunks itself and must know. HTTP/1.0 clients get the body until the close.
            response.enable_chunked_encoding()
    if closing:
        response.force_close()
    out = _Written()
    source: PushSource | None = None
    try:
        await response.prepare(request)
        transport = request.transport
        chunked = response.chunked
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                if out.sent and transport is not None and not transport.get_write_buffer_size():
                    # The head went out with the first chunk and the client keeps up
                    # (nothing waits in the socket buffer): frame the chunk and hand it
                    # to the transport. aiohttp's write path is two coroutines and
                    # several calls per chunk, a fifth of what relaying a chunk costs.
                    if transport.is_closing():
                        raise ConnectionResetError("the client closed the connection")
                    transport.write(_framed(chunk, chunked))
                else:
                    # The first chunk (with the head), and any chunk for a client that
                    # reads slowly: aiohttp's path, with its back-pressure.
                    await response.write(chunk)
                out.sent += len(chunk)
                out.last = chunk
                if source is None and transport is not None:
                    # From the second chunk on, chunks that arrive while this loop waits
                    # go to the client from the upstream's callback (PushSource).
                    pipeline = chunks.push_pipeline() if isinstance(chunks, WatchedChunks) else None
                    if pipeline is not None:
                        source, layers = pipeline
                        ender = response if isinstance(response, StreamedResponse) else None
                        source.push_to(_ClientSink(transport, chunked, layers, out, ender))
        except StreamInterrupted as broken:
            exchange.facts["stream_error"] = broken.code
            await _write_error_event(response, reply, out, broken.message, broken.code, source)
            source = None
        except ConnectionError:
            raise
        except Exception:
            # A bug mid-stream (in a policy's layer, say): the head is out, so the
            # client learns it from the stream's last event; a handler error now
            # would leave it waiting for the rest of a chunked body.
            log.exception("stream_internal_error", route=exchange.route.name)
            exchange.facts["stream_error"] = "internal_error"
            await _write_error_event(
                response,
                reply,
                out,
                "internal error in the sidecar; its log has the details",
                "internal_error",
                source,
            )
            source = None
        await response.write_eof()
    except ConnectionError:
        # The client went away mid-answer. Hand the response back as it is:
        # aiohttp sees the closed connection itself and ends quietly, where an
        # exception would be logged as a server error and answered with a 500.
        exchange.facts["client_gone"] = True
    finally:
        if source is not None:
            source.push_to(None)
        exchange.facts["bytes_out"] = out.sent
        await chunks.aclose()
    return response


async def _write_error_event(
    response: web.StreamResponse,
    reply: Reply,
    out: _Written,
    message: str,
    code: str,
    source: PushSource | None,
) -> None:
    """The stream's error event after what the client got, on a line of its own."""
    if source is not None:
        source.push_to(None)
    stream_format = reply.stream_format or "sse"
    end = b"\n\n" if stream_format == "sse" else b"\n"
    prefix = b"" if out.last.endswith(end) else end
    await response.write(prefix + stream_error_event(message, code, stream_format))


class _Written:
    """What reached the client so far, by either path."""

    __slots__ = ("last", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self.last = b"\n\n"


class _ClientSink:
    """The client's socket as a ChunkSink: the fast path above, run from the source's callback."""

    __slots__ = ("_chunked", "_ender", "_layers", "_out", "_transforms", "_transport")

    def __init__(
        self,
        transport: asyncio.Transport | asyncio.BaseTransport,
        chunked: bool,
        layers: list[Layer],
        out: _Written,
        ender: StreamedResponse | None,
    ) -> None:
        self._transport: Any = transport
        self._chunked = chunked
        self._layers = layers
        self._transforms = [transform for transform, _ in layers]
        self._out = out
        self._ender = ender

    def accepts(self) -> bool:
        # Nothing waiting in the socket buffer, and the client still there: otherwise the
        # chunk waits for the relay loop, which has back-pressure and notices a close.
        transport = self._transport
        return not transport.get_write_buffer_size() and not transport.is_closing()

    def take(self, chunk: bytes) -> None:
        for transform in self._transforms:
            chunk = transform(chunk)
            if not chunk:
                return
        self._transport.write(_framed(chunk, self._chunked))
        out = self._out
        out.sent += len(chunk)
        out.last = chunk

    def end(self) -> None:
        # Only a response this module frames can be ended here; with any other the
        # held-back bytes stay where they are, for the relay loop.
        ender = self._ender
        if ender is None or self._transport.is_closing():
            return
        rest = b""
        for transform, flush in self._layers:
            rest = (transform(rest) if rest else b"") + flush()
        if rest:
            self._out.sent += len(rest)
            self._out.last = rest
        ender.end_nowait(rest)
