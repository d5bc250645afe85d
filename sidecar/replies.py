"""Tools for policies that look at a streamed reply without holding it back.

A policy must never buffer a stream; these wrap `Reply.chunks` so a policy can
learn how a stream ended, or see its first chunk before deciding to retry, and
they always close the stream they wrap, so a client that goes away still
closes the upstream connection at once.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import replace
from typing import Literal

from sidecar.errors import StreamInterrupted
from sidecar.exchange import Reply

StreamEnd = Literal["complete", "failed", "abandoned"]


def watch_stream(
    reply: Reply, on_end: Callable[[StreamEnd, StreamInterrupted | None], None]
) -> Reply:
    """The same reply, calling `on_end` once when its stream ends.

    "complete": the upstream finished properly; "failed": it broke (with the
    StreamInterrupted); "abandoned": the client went away first. A reply with
    no stream ends at once, as "complete".
    """
    chunks = reply.chunks
    if chunks is None:
        on_end("complete", None)
        return reply

    async def watched() -> AsyncGenerator[bytes, None]:
        end: StreamEnd = "abandoned"
        broken: StreamInterrupted | None = None
        try:
            async with aclosing(chunks) as inner:
                async for chunk in inner:
                    yield chunk
            end = "complete"
        except StreamInterrupted as error:
            end, broken = "failed", error
            raise
        finally:
            on_end(end, broken)

    return replace(reply, chunks=watched())


async def peek_first_chunk(reply: Reply) -> Reply:
    """Wait for a stream's first chunk; raise StreamInterrupted if it breaks before one.

    Nothing has reached the client yet at that point, so a retry or a fallback
    may still take over; the returned reply yields that chunk, then the rest.
    """
    chunks = reply.chunks
    if chunks is None:
        return reply
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await chunks.aclose()
        raise

    async def resumed() -> AsyncGenerator[bytes, None]:
        async with aclosing(chunks) as inner:
            if first is not None:
                yield first
            async for chunk in inner:
                yield chunk

    return replace(reply, chunks=resumed())
