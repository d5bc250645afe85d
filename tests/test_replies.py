"""Stream wrappers report every end once and always close what they wrap, even unstarted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.config import parse_settings
from sidecar.deadlines import DeadlineWatch
from sidecar.errors import StreamInterrupted
from sidecar.exchange import Exchange, Reply
from sidecar.observability import Metrics
from sidecar.replies import StreamEnd, peek_first_chunk, watch_stream
from sidecar.routes import ROUTES
from sidecar.upstream import Upstream
from tests.fake_ollama import FakeOllama


class Source:
    """A chunk source that records whether it was closed."""

    def __init__(self, chunks: list[bytes], breaks: bool = False) -> None:
        self.chunks = chunks
        self.breaks = breaks
        self.closed = False

    async def stream(self) -> AsyncGenerator[bytes, None]:
        try:
            for chunk in self.chunks:
                yield chunk
            if self.breaks:
                raise StreamInterrupted("boom")
        finally:
            self.closed = True


def reply_of(source: Source) -> Reply:
    return Reply(200, CIMultiDict(), chunks=source.stream(), stream_format="sse")


def recorder() -> tuple[list[tuple[StreamEnd, bool]], object]:
    ends: list[tuple[StreamEnd, bool]] = []

    def on_end(how: StreamEnd, error: StreamInterrupted | None) -> None:
        ends.append((how, error is not None))

    return ends, on_end


async def test_a_complete_stream_is_reported_once() -> None:
    ends, on_end = recorder()
    reply = watch_stream(reply_of(Source([b"a", b"b"])), on_end)  # type: ignore[arg-type]
    assert reply.chunks is not None
    assert [chunk async for chunk in reply.chunks] == [b"a", b"b"]
    await reply.chunks.aclose()
    assert ends == [("complete", False)]


async def test_a_broken_stream_is_reported_as_failed() -> None:
    ends, on_end = recorder()
    reply = watch_stream(reply_of(Source([b"a"], breaks=True)), on_end)  # type: ignore[arg-type]
    assert reply.chunks is not None
    with pytest.raises(StreamInterrupted):
        async for _ in reply.chunks:
            pass
    assert ends == [("failed", True)]


@pytest.mark.parametrize("read", [0, 1])
async def test_a_stream_closed_early_is_abandoned_and_its_source_closed(read: int) -> None:
    source = Source([b"a", b"b", b"c"])
    ends, on_end = recorder()
    reply = watch_stream(reply_of(source), on_end)  # type: ignore[arg-type]
    assert reply.chunks is not None
    for _ in range(read):
        await anext(reply.chunks)
    await reply.chunks.aclose()
    assert ends == [("abandoned", False)]
    # An unstarted generator has nothing to clean up; a started one ran its finally.
    assert source.closed is (read > 0)


async def test_peek_gives_the_first_chunk_back_and_closes_on_an_early_break() -> None:
    reply = await peek_first_chunk(reply_of(Source([b"a", b"b"])))
    assert reply.chunks is not None
    assert [chunk async for chunk in reply.chunks] == [b"a", b"b"]
    broken = Source([], breaks=True)
    with pytest.raises(StreamInterrupted):
        await peek_first_chunk(reply_of(broken))
    assert broken.closed


async def test_an_upstream_stream_closed_before_its_first_read_closes_the_connection(
    fake: FakeOllama,
) -> None:
    """The client left between the upstream's headers and the first chunk."""
    hold = asyncio.Event()

    async def gate(index: int) -> None:
        await hold.wait()

    fake.between_chunks = gate
    settings = parse_settings({"upstream": {"url": fake.url}})
    upstream = Upstream(settings.upstream, Metrics(), DeadlineWatch())
    await upstream.start()
    try:
        exchange = Exchange(
            method="POST",
            route=ROUTES["/api/chat"],
            path="/api/chat",
            query_string="",
            headers=CIMultiDictProxy(CIMultiDict()),
            body=b'{"model":"llama3.2:latest","messages":[{"role":"user","content":"hi"}]}',
            started_at=asyncio.get_running_loop().time(),
        )
        reply = await upstream.send(exchange)
        assert reply.chunks is not None
        await reply.chunks.aclose()  # never iterated
        await asyncio.wait_for(fake.stream_closed_by_peer.wait(), 5)
    finally:
        hold.set()
        await upstream.close()
