"""Writes a Reply to the client: whole bodies at once, streams chunk by chunk.

Each chunk is written as it arrives and awaited (back-pressure), with nothing
added, nothing buffered and no parsing. When the upstream breaks after the
first byte the client gets an explicit error event, never a clean-looking end.
"""

from __future__ import annotations

from aiohttp import web

from sidecar.errors import StreamInterrupted, stream_error_event
from sidecar.exchange import Exchange, Reply


class RelayedStream(web.StreamResponse):
    """A streamed answer whose head goes out with its first chunk, in one write.

    aiohttp's StreamResponse sends the head at `prepare`, on its own; the
    sidecar prepares once the upstream answered, when the first chunk is
    already there or follows at once (Ollama sends its head with the first
    chunk too), so a separate write of the head is a syscall per stream for
    nothing. A stream that ends with no chunk sends its head with the end.
    """

    _send_headers_immediately = False


async def relay(request: web.BaseRequest, reply: Reply, exchange: Exchange) -> web.StreamResponse:
    """Send `reply` to the client and return the (finished or prepared) response.

    A client that goes away mid-stream is noted as `facts["client_gone"]`; the
    upstream stream is closed either way.
    """
    headers = reply.headers
    if exchange.response_headers:
        headers.update(exchange.response_headers)
    chunks = reply.chunks
    if chunks is None:
        exchange.facts["bytes_out"] = len(reply.body)
        return web.Response(status=reply.status, body=reply.body, headers=headers)

    headers["X-Accel-Buffering"] = "no"
    headers.setdefault("Cache-Control", "no-cache")
    response = RelayedStream(status=reply.status, headers=headers)
    if request.version >= (1, 1):
        # Said outright (aiohttp would choose it anyway): the fast path below frames
        # chunks itself and must know. HTTP/1.0 clients get the body until the close.
        response.enable_chunked_encoding()
    sent = 0
    last = b"\n\n"
    try:
        await response.prepare(request)
        transport = request.transport
        chunked = response.chunked
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                if sent and transport is not None and not transport.get_write_buffer_size():
                    # The head went out with the first chunk and the client keeps up
                    # (nothing waits in the socket buffer): frame the chunk and hand it
                    # to the transport. aiohttp's write path is two coroutines and
                    # several calls per chunk, a fifth of what relaying a chunk costs.
                    if transport.is_closing():
                        raise ConnectionResetError("the client closed the connection")
                    transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                else:
                    # The first chunk (with the head), and any chunk for a client that
                    # reads slowly: aiohttp's path, with its back-pressure.
                    await response.write(chunk)
                sent += len(chunk)
                last = chunk
        except StreamInterrupted as broken:
            exchange.facts["stream_error"] = broken.code
            stream_format = reply.stream_format or "sse"
            # Close a half-written line first, so the error is an event of its own.
            prefix = (
                b""
                if last.endswith(b"\n\n" if stream_format == "sse" else b"\n")
                else (b"\n\n" if stream_format == "sse" else b"\n")
            )
            await response.write(
                prefix + stream_error_event(broken.message, broken.code, stream_format)
            )
        await response.write_eof()
    except ConnectionError:
        # The client went away mid-answer. Hand the response back as it is:
        # aiohttp sees the closed connection itself and ends quietly, where an
        # exception would be logged as a server error and answered with a 500.
        exchange.facts["client_gone"] = True
    finally:
        exchange.facts["bytes_out"] = sent
        await chunks.aclose()
    return response
