"""Tools for policies that look at a streamed reply without holding it back.

A policy must never buffer a stream; these wrap `Reply.chunks` so a policy can
learn how a stream ended, or see its first chunk before deciding to retry.
They are classes, not `async def` generators, for one reason: a generator that
is closed before its first chunk was asked for never runs its body, so neither
its `finally` nor the `aclose` of the stream it wraps would run. That happens
whenever the client goes away before the answer starts; a wrapper that forgot
the stream then would leak the upstream connection, a breaker's probe slot or
a concurrency slot.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from types import TracebackType
from typing import Any, Literal

from sidecar.errors import StreamInterrupted
from sidecar.exchange import Reply

StreamEnd = Literal["complete", "failed", "abandoned"]
OnEnd = Callable[[StreamEnd, StreamInterrupted | None], None]


class WatchedChunks(AsyncGenerator[bytes, None]):
    """Relays `inner` chunk by chunk and reports, exactly once, how it ended.

    "complete": the stream finished; "failed": it raised StreamInterrupted;
    "abandoned": it was closed (or raised anything else) before its end, also
    when that happens before the first chunk. `first` is a chunk already read
    from `inner` (see peek_first_chunk), given out before the rest.
    """

    __slots__ = ("_ended", "_first", "_inner", "_on_end", "_on_first")

    def __init__(
        self,
        inner: AsyncGenerator[bytes, None],
        on_end: OnEnd | None = None,
        *,
        first: bytes | None = None,
        on_first: Callable[[], None] | None = None,
    ) -> None:
        self._inner = inner
        self._on_end = on_end
        self._first = first
        self._on_first = on_first
        self._ended = False

    async def asend(self, value: None) -> bytes:
        if self._first is not None:
            chunk, self._first = self._first, None
        else:
            try:
                chunk = await self._inner.asend(value)
            except StopAsyncIteration:
                self._end("complete", None)
                raise
            except StreamInterrupted as error:
                self._end("failed", error)
                raise
            except BaseException:
                self._end("abandoned", None)
                raise
        if self._on_first is not None:
            on_first, self._on_first = self._on_first, None
            on_first()
        return chunk

    async def athrow(
        self,
        typ: Any,
        val: Any = None,
        tb: TracebackType | None = None,
    ) -> bytes:
        try:
            return await self._inner.athrow(typ, val, tb)
        finally:
            self._end("abandoned", None)

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._end("abandoned", None)

    def _end(self, how: StreamEnd, error: StreamInterrupted | None) -> None:
        if not self._ended:
            self._ended = True
            if self._on_end is not None:
                self._on_end(how, error)

    def __del__(self) -> None:
        # Last resort: a step that dropped the reply without closing it must not
        # keep what the watcher holds (a concurrency slot, a breaker's probe).
        if not self._ended:
            self._end("abandoned", None)


def watch_stream(reply: Reply, on_end: OnEnd) -> Reply:
    """The same reply, calling `on_end` once when its stream ends (see WatchedChunks).

    A reply with no stream ends at once, as "complete".
    """
    if reply.chunks is None:
        on_end("complete", None)
        return reply
    return replace(reply, chunks=WatchedChunks(reply.chunks, on_end))


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
        return replace(reply, chunks=WatchedChunks(chunks))
    except BaseException:
        await chunks.aclose()
        raise
    return replace(reply, chunks=WatchedChunks(chunks, first=first))


async def discard(reply: Reply) -> None:
    """A reply that will not be sent: close its stream, so the upstream connection goes."""
    if reply.chunks is not None:
        await reply.chunks.aclose()
