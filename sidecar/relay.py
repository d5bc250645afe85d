"""Writes a Reply to the client: whole bodies at once, streams chunk by chunk.

Each chunk is written as it arrives and awaited (back-pressure), with nothing
added, nothing buffered and no parsing. When the upstream breaks after the
first byte the client gets an explicit error event, never a clean-looking end.
"""

from __future__ import annotations

from aiohttp import web

from sidecar.errors import StreamInterrupted, stream_error_event
from sidecar.exchange import Exchange, Reply


class ClientGone(Exception):
    """The client closed its connection while its answer was being written."""


async def relay(request: web.BaseRequest, reply: Reply, exchange: Exchange) -> web.StreamResponse:
    """Send `reply` to the client and return the (finished or prepared) response."""
    headers = reply.headers
    if exchange.response_headers:
        headers.update(exchange.response_headers)
    chunks = reply.chunks
    if chunks is None:
        exchange.facts["bytes_out"] = len(reply.body)
        return web.Response(status=reply.status, body=reply.body, headers=headers)

    headers["X-Accel-Buffering"] = "no"
    headers.setdefault("Cache-Control", "no-cache")
    response = web.StreamResponse(status=reply.status, headers=headers)
    sent = 0
    last = b"\n\n"
    try:
        await response.prepare(request)
        try:
            async for chunk in chunks:
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
    except ConnectionError as exc:
        raise ClientGone() from exc
    finally:
        exchange.facts["bytes_out"] = sent
        await chunks.aclose()
    return response
