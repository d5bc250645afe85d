"""Chunks handed to the client from the upstream's callback while the relay waits.

A stream's second and later chunks usually arrive while the relay is parked
waiting for them; the source then hands each one straight to the client
(sidecar/replies.py: PushSource, ChunkSink) with the layers' transforms run on
the way. These tests pin what must not change because of it: the bytes, the
order, the usage metering strips and counts, the idle deadline, back-pressure,
and a failure inside the hand-over.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from policies.metering import MeteredChunks, Metering
from sidecar import relay
from sidecar.app import Sidecar
from tests.conftest import SidecarFactory
from tests.fake_ollama import FakeOllama
from tests.test_metering import policy_of

MODEL = "llama3.2:latest"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}]}
DEFAULT_CHAIN: list[Any] = [
    {"correlation": {}},
    {"metering": {}},
    {"circuit_breaker": {}},
    {"retry": {}},
]


@pytest.fixture
def pushed(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every chunk the client sink was handed, in order (the real method still runs)."""
    taken: list[bytes] = []
    take = relay._ClientSink.take

    def counting(self: Any, chunk: bytes) -> None:
        taken.append(chunk)
        take(self, chunk)

    monkeypatch.setattr(relay._ClientSink, "take", counting)
    return taken


def gate_each_chunk_on_the_client(fake: FakeOllama) -> list[asyncio.Event]:
    """Chunk i+1 leaves the fake only once the client has read chunk i: the relay waits
    for every chunk, so every chunk after the first can be pushed."""
    received = [asyncio.Event() for _ in range(len(fake.chunks) + 3)]

    async def gate(index: int) -> None:
        await received[index - 1].wait()

    fake.between_chunks = gate
    return received


def without_time(line: bytes) -> dict[str, Any]:
    """An NDJSON line without its `created_at`, which differs between two requests."""
    document: dict[str, Any] = orjson.loads(line)
    document.pop("created_at", None)
    return document


async def gated_stream(
    http: aiohttp.ClientSession, sidecar: Sidecar, fake: FakeOllama
) -> list[bytes]:
    """A streamed chat through `sidecar`, each chunk gated on the client: its SSE events."""
    received = gate_each_chunk_on_the_client(fake)
    async with http.post(
        f"{sidecar.url}/v1/chat/completions", json={**CHAT, "stream": True}
    ) as response:
        assert response.status == 200
        return await read_events(response, received)


async def read_events(
    response: aiohttp.ClientResponse, received: list[asyncio.Event]
) -> list[bytes]:
    events: list[bytes] = []
    buffer = b""
    async with asyncio.timeout(10):
        async for piece in response.content.iter_any():
            buffer += piece
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                events.append(event)
                received[min(len(events) - 1, len(received) - 1)].set()
    assert buffer == b""
    return events


async def test_the_default_chain_pushes_every_chunk_after_the_first_and_meters_the_stream(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession, pushed: list[bytes]
) -> None:
    sidecar = await make_sidecar(DEFAULT_CHAIN)
    events = await gated_stream(http, sidecar, fake)
    # What the client asked for and nothing else: every token, then [DONE]; the usage
    # event metering asked Ollama for is gone, whichever path each chunk took.
    assert events[-1] == b"data: [DONE]"
    documents = [orjson.loads(event.removeprefix(b"data: ")) for event in events[:-1]]
    assert all(document["choices"] for document in documents)
    text = "".join(document["choices"][0]["delta"].get("content", "") for document in documents)
    assert text == "".join(fake.chunks)
    assert not any(b'"usage"' in event for event in events)
    # The relay waited for each chunk after the first: those went through the sink
    # (as the upstream sent them; the usage event was among them).
    assert len(pushed) >= len(fake.chunks) - 1
    assert any(b'"usage"' in chunk for chunk in pushed)
    totals = policy_of(sidecar).totals()["anonymous"][MODEL]
    assert totals["completion_tokens"] == len(fake.chunks)
    assert not totals["estimated_requests"]


async def test_native_ndjson_streams_are_pushed_byte_for_byte(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession, pushed: list[bytes]
) -> None:
    sidecar = await make_sidecar(DEFAULT_CHAIN)
    direct = (await (await http.post(f"{fake.url}/api/chat", json=CHAT)).read()).splitlines()
    received = [asyncio.Event() for _ in range(len(fake.chunks) + 3)]

    async def gate(index: int) -> None:
        await received[index - 1].wait()

    fake.between_chunks = gate
    lines: list[bytes] = []
    async with http.post(f"{sidecar.url}/api/chat", json=CHAT) as response:
        async with asyncio.timeout(10):
            while line := await response.content.readline():
                lines.append(line)
                received[len(lines) - 1].set()
    assert all(line.endswith(b"\n") for line in lines)
    assert [without_time(line) for line in lines] == [without_time(line) for line in direct]
    assert len(pushed) >= len(fake.chunks) - 1


async def test_pushed_chunks_move_the_idle_deadline_on(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession, pushed: list[bytes]
) -> None:
    # Twelve chunks 100 ms apart take 1.2 s against an idle timeout of 300 ms: the
    # stream is only idle if pushed chunks do not count as activity.
    sidecar = await make_sidecar(DEFAULT_CHAIN, upstream={"timeouts": {"idle": "300ms"}})
    fake.chunks = [f"w{index} " for index in range(12)]

    async def paced(index: int) -> None:
        await asyncio.sleep(0.1)  # the upstream's pace is what this test is about

    fake.between_chunks = paced
    async with http.post(f"{sidecar.url}/api/chat", json=CHAT) as response:
        lines = (await response.read()).splitlines()
    last = orjson.loads(lines[-1])
    assert "error" not in last
    assert last["done"] is True
    assert len(lines) == len(fake.chunks) + 1
    assert len(pushed) >= len(fake.chunks) - 1


async def test_a_failure_inside_the_hand_over_ends_the_stream_with_an_error_event(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sidecar = await make_sidecar(DEFAULT_CHAIN)
    transform = MeteredChunks._transform
    calls = 0

    def failing(self: MeteredChunks, read: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("a bug in a transform")
        return transform(self, read)

    monkeypatch.setattr(MeteredChunks, "_transform", failing)
    events = await gated_stream(http, sidecar, fake)
    # The client learns it from the stream's last event (never waits for more), ...
    error = orjson.loads(events[-1].removeprefix(b"data: "))["error"]
    assert error["code"] == "internal_error"
    assert b"[DONE]" not in b"".join(events)
    # ... the upstream stream was closed, not left generating, and the sidecar still serves.
    await asyncio.wait_for(fake.stream_closed_by_peer.wait(), 5)
    monkeypatch.setattr(MeteredChunks, "_transform", transform)
    fake.between_chunks = None
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200


async def test_the_answer_ends_before_the_policies_end_of_stream_bookkeeping(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The client's stream is complete (the last event and the terminating chunk are
    # written) before metering records usage and the breaker counts a success.
    order: list[str] = []
    end_nowait = relay.StreamedResponse.end_nowait

    def ending(self: relay.StreamedResponse, rest: bytes = b"") -> None:
        order.append("answer ended")
        end_nowait(self, rest)

    record = Metering._record

    def recording(self: Metering, *args: Any, **kwargs: Any) -> Any:
        order.append("usage recorded")
        return record(self, *args, **kwargs)

    monkeypatch.setattr(relay.StreamedResponse, "end_nowait", ending)
    monkeypatch.setattr(Metering, "_record", recording)
    sidecar = await make_sidecar(DEFAULT_CHAIN)
    events = await gated_stream(http, sidecar, fake)
    assert events[-1] == b"data: [DONE]"
    assert order == ["answer ended", "usage recorded"]
    totals = policy_of(sidecar).totals()["anonymous"][MODEL]
    assert totals["completion_tokens"] == len(fake.chunks)
