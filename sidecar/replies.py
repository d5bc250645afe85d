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

from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Literal, Protocol

from sidecar.errors import StreamInterrupted
from sidecar.exchange import Reply

StreamEnd = Literal["complete", "failed", "abandoned"]
OnEnd = Callable[[StreamEnd, StreamInterrupted | None], None]
# What a layer does to each chunk on the way out (b"" holds everything back for now),
# and what it still holds back when the stream ends well.
Transform = Callable[[bytes], bytes]
Flush = Callable[[], bytes]
Layer = tuple[Transform, Flush]


class ChunkSink(Protocol):
    """Where a stream's source can hand chunks straight to the client (see PushSource)."""

    def accepts(self) -> bool:
        """Whether a chunk can be written now, without waiting (no back-pressure)."""
        ...

    def take(self, chunk: bytes) -> None:
        """Run the layers' transforms on `chunk` and write what is left."""
        ...

    def end(self) -> None:
        """The stream ended well: write what the layers held back and the end of the
        answer now, before the policies' end-of-stream bookkeeping runs."""
        ...


class PushSource(Protocol):
    """A stream source that can hand its chunks to a sink while the reader waits for one.

    A relayed chunk that arrives while the relay is parked waiting costs, read
    the usual way, a future, a task wake-up and a resume of every layer; handed
    over in the callback that received it, it costs the layers' transforms and
    a write. The reader still ends the stream (its end, its error) the usual way.
    """

    def push_to(self, sink: ChunkSink | None) -> None: ...


class WatchedChunks(AsyncGenerator[bytes, None]):
    """Relays `inner` chunk by chunk and reports, exactly once, how it ended.

    "complete": the stream finished; "failed": it raised StreamInterrupted;
    "abandoned": it was closed (or raised anything else) before its end, also
    when that happens before the first chunk. `first` is a chunk already read
    from `inner` (see peek_first_chunk), given out before the rest.

    Policies that only watch a stream add themselves to the watched stream
    (`watch`, `put_back`) instead of wrapping it again: every layer is a call
    per chunk, and in the default chain three watchers sat on one stream.
    """

    __slots__ = ("_ended", "_error", "_first", "_how", "_inner", "_on_end", "_on_first")

    def __init__(
        self,
        inner: AsyncGenerator[bytes, None] | None,
        on_end: OnEnd | None = None,
        *,
        first: bytes | None = None,
        on_first: Callable[[], None] | None = None,
    ) -> None:
        self._inner = inner
        self._on_end: list[OnEnd] = [] if on_end is None else [on_end]
        self._first = first
        self._on_first = on_first
        self._ended = False
        self._how: StreamEnd = "abandoned"
        self._error: StreamInterrupted | None = None

    def watch(self, on_end: OnEnd) -> None:
        """Call `on_end` too when the stream ends (at once if it already has)."""
        if self._ended:
            on_end(self._how, self._error)
        else:
            self._on_end.append(on_end)

    def on_first(self, callback: Callable[[], None]) -> bool:
        """Call `callback` as the first chunk is given out; False if another one is set."""
        if self._on_first is not None:
            return False
        self._on_first = callback
        return True

    def put_back(self, chunk: bytes) -> None:
        """Give `chunk` (just read from this stream) out again first."""
        assert self._first is None, "one chunk at a time"
        self._first = chunk

    def push_pipeline(self) -> tuple[PushSource, list[Layer]] | None:
        """The source under this stream and the layers above it (transform, flush), innermost
        first, when every layer can run in a callback; None when one cannot (then chunks
        are read the usual way). Asked after the first chunk went out."""
        inner = self._inner
        if self._first is not None or self._on_first is not None:
            return None
        return inner.push_pipeline() if isinstance(inner, WatchedChunks) else None

    def _pull(self) -> Awaitable[bytes]:
        """The next chunk of what is watched (subclasses read their own source)."""
        assert self._inner is not None
        return self._inner.asend(None)

    def __anext__(self) -> Coroutine[Any, Any, bytes]:
        return self.asend(None)

    async def asend(self, value: None) -> bytes:
        if self._first is not None:
            chunk, self._first = self._first, None
        else:
            try:
                chunk = await self._pull()
            except BaseException as error:
                self._ended_by(error)
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
            if self._inner is None:
                raise typ if val is None else val
            return await self._inner.athrow(typ, val, tb)
        finally:
            self._end("abandoned", None)

    async def aclose(self) -> None:
        try:
            if self._inner is not None:
                await self._inner.aclose()
        finally:
            self._end("abandoned", None)

    def _ended_by(self, error: BaseException) -> None:
        """Report the end a read raised: its last chunk, a break, or anything else."""
        if isinstance(error, StopAsyncIteration):
            self._end("complete", None)
        elif isinstance(error, StreamInterrupted):
            self._end("failed", error)
        else:
            self._end("abandoned", None)

    def _end(self, how: StreamEnd, error: StreamInterrupted | None) -> None:
        if not self._ended:
            self._ended = True
            self._how = how
            self._error = error
            for on_end in self._on_end:
                on_end(how, error)
            self._on_end = []

    def __del__(self) -> None:
        # Last resort: a step that dropped the reply without closing it must not
        # keep what the watcher holds (a concurrency slot, a breaker's probe).
        if not self._ended:
            self._end("abandoned", None)


def watch_stream(reply: Reply, on_end: OnEnd) -> Reply:
    """The same reply, calling `on_end` once when its stream ends (see WatchedChunks).

    A reply with no stream ends at once, as "complete".
    """
    chunks = reply.chunks
    if chunks is None:
        on_end("complete", None)
        return reply
    if isinstance(chunks, WatchedChunks):
        chunks.watch(on_end)
        return reply
    return reply.with_chunks(WatchedChunks(chunks, on_end))


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
        return (
            reply if isinstance(chunks, WatchedChunks) else reply.with_chunks(WatchedChunks(chunks))
        )
    except BaseException:
        await chunks.aclose()
        raise
    if isinstance(chunks, WatchedChunks) and chunks._first is None:
        chunks.put_back(first)
        return reply
    return reply.with_chunks(WatchedChunks(chunks, first=first))


async def discard(reply: Reply) -> None:
    """A reply that will not be sent: close its stream, so the upstream connection goes."""
    if reply.chunks is not None:
        await reply.chunks.aclose()
