"""The fake Ollama must behave like Ollama, or the proxy's tests prove nothing."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from openai import AsyncOpenAI

from tests.fake_ollama import BUSY_MESSAGE, GARBAGE, FakeOllama, Fault, not_found_message

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "say hello please"}]}
TEXT = "Hello from the fake Ollama."


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def sse_events(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) for each SSE event; enough of the format for these tests."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        events.append((name, "\n".join(data)))
    return events


def sse_json(raw: bytes) -> list[Any]:
    return [orjson.loads(data) for _, data in sse_events(raw) if data != "[DONE]"]


async def never(index: int) -> None:
    """A between_chunks gate that stays shut: the stream hangs after chunk 0."""
    await asyncio.Event().wait()


async def post(
    session: aiohttp.ClientSession, fake: FakeOllama, path: str, body: Any
) -> tuple[int, str, bytes]:
    async with session.post(fake.url + path, json=body) as response:
        return response.status, response.content_type, await response.read()


# --- plain routes -------------------------------------------------------------


async def test_root_version_and_unknown_route(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    async with session.get(fake.url + "/") as response:
        assert (response.status, await response.text()) == (200, "Ollama is running")
        assert response.content_type == "text/plain"
    async with session.head(fake.url + "/") as response:
        assert response.status == 200
    async with session.get(fake.url + "/api/version") as response:
        assert await response.json() == {"version": "0.12.0"}
    async with session.get(fake.url + "/api/nope") as response:
        assert (response.status, await response.text()) == (404, "404 page not found")


async def test_tags_show_and_ps(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    async with session.get(fake.url + "/api/tags") as response:
        models = (await response.json())["models"]
    assert [m["name"] for m in models] == fake.models
    assert set(models[0]) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert (await post(session, fake, "/api/show", {"model": "llama3.2"}))[0] == 200
    assert (await post(session, fake, "/api/show", {"name": "nope"}))[0] == 404
    await post(session, fake, "/api/chat", CHAT | {"stream": False})
    async with session.get(fake.url + "/api/ps") as response:
        assert [m["name"] for m in (await response.json())["models"]] == ["llama3.2:latest"]


async def test_management_routes_answer_success(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    for method, path in [
        ("POST", "/api/pull"),
        ("POST", "/api/push"),
        ("POST", "/api/create"),
        ("POST", "/api/copy"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/blobs/sha256:abc"),
    ]:
        async with session.request(method, fake.url + path, json={"model": "x"}) as response:
            assert await response.json() == {"status": "success"}, path
    async with session.head(fake.url + "/api/blobs/sha256:abc") as response:
        assert response.status == 200


# --- native streams -------------------------------------------------------------


async def test_native_chat_streams_ndjson_by_default(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    status, content_type, raw = await post(session, fake, "/api/chat", CHAT)
    assert (status, content_type) == (200, "application/x-ndjson")
    lines = raw.splitlines()
    assert all(line == orjson.dumps(orjson.loads(line)) for line in lines)  # compact, Go style
    objects = [orjson.loads(line) for line in lines]
    assert [o["message"]["content"] for o in objects[:-1]] == fake.chunks
    assert not any(o["done"] for o in objects[:-1])
    final = objects[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["message"] == {"role": "assistant", "content": ""}
    assert (final["prompt_eval_count"], final["eval_count"]) == (3, len(fake.chunks))
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int)
    assert raw.startswith(b'{"model":"llama3.2","created_at":"')


async def test_native_generate_non_stream_and_num_predict(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    body = {"model": "llama3.2", "prompt": "hi", "stream": False}
    status, content_type, raw = await post(session, fake, "/api/generate", body)
    reply = orjson.loads(raw)
    assert (status, content_type, reply["response"], reply["done"]) == (
        200,
        "application/json",
        TEXT,
        True,
    )
    assert all(isinstance(token, int) for token in reply["context"])
    capped = body | {"stream": True, "options": {"num_predict": 2}}
    lines = (await post(session, fake, "/api/generate", capped))[2].splitlines()
    final = orjson.loads(lines[-1])
    assert (len(lines), final["done_reason"], final["eval_count"]) == (3, "length", 2)
    assert "context" in final


async def test_native_embed_and_legacy_embeddings(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    body = {"model": "nomic-embed-text", "input": ["a b", "c"]}
    reply = orjson.loads((await post(session, fake, "/api/embed", body))[2])
    assert len(reply["embeddings"]) == 2 and len(reply["embeddings"][0]) == 8
    assert reply["prompt_eval_count"] == 3
    legacy = {"model": "nomic-embed-text", "prompt": "a b"}
    old = orjson.loads((await post(session, fake, "/api/embeddings", legacy))[2])
    assert old == {"embedding": reply["embeddings"][0]}  # deterministic from the text


# --- OpenAI-compatible routes ---------------------------------------------------


async def test_openai_chat_non_stream(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    status, content_type, raw = await post(session, fake, "/v1/chat/completions", CHAT)
    reply = orjson.loads(raw)
    assert (status, content_type) == (200, "application/json")
    assert reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    assert (reply["model"], reply["system_fingerprint"]) == ("llama3.2", "fp_ollama")
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": TEXT}
    assert reply["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    capped = orjson.loads(
        (await post(session, fake, "/v1/chat/completions", CHAT | {"max_tokens": 1}))[2]
    )
    assert capped["choices"][0]["finish_reason"] == "length"
    assert capped["usage"]["completion_tokens"] == 1


async def test_openai_chat_stream_without_usage(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    status, content_type, raw = await post(
        session, fake, "/v1/chat/completions", CHAT | {"stream": True}
    )
    assert (status, content_type) == (200, "text/event-stream")
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = sse_json(raw)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hello"}
    assert "role" not in chunks[1]["choices"][0]["delta"]
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert all(chunk["choices"] and "usage" not in chunk for chunk in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == TEXT


async def test_openai_chat_stream_with_usage(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    body = CHAT | {"stream": True, "stream_options": {"include_usage": True}}
    raw = (await post(session, fake, "/v1/chat/completions", body))[2]
    events = sse_events(raw)
    assert events[-1] == (None, "[DONE]")
    usage = orjson.loads(events[-2][1])
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert orjson.loads(events[-3][1])["choices"][0]["finish_reason"] == "stop"


async def test_openai_completions_stream(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    body = {"model": "llama3.2", "prompt": "x", "stream": True}
    chunks = sse_json((await post(session, fake, "/v1/completions", body))[2])
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == TEXT
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_openai_embeddings(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    body = {"model": "nomic-embed-text", "input": ["a b", "c"]}
    floats = orjson.loads((await post(session, fake, "/v1/embeddings", body))[2])
    assert floats["object"] == "list" and floats["model"] == "nomic-embed-text"
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    b64 = orjson.loads(
        (await post(session, fake, "/v1/embeddings", body | {"encoding_format": "base64"}))[2]
    )
    decoded = struct.unpack("<8f", base64.b64decode(b64["data"][1]["embedding"]))
    assert list(decoded) == floats["data"][1]["embedding"]
    for bad in ({"input": [[1, 2, 3]]}, {"input": [1, 2]}, {"encoding_format": "int8"}):
        status, _, raw = await post(session, fake, "/v1/embeddings", body | bad)
        assert status == 400
        assert orjson.loads(raw)["error"]["type"] == "invalid_request_error"


async def test_openai_models(session: aiohttp.ClientSession) -> None:
    async with FakeOllama(models=["llama3.2:latest", "someone/tool:7b"]) as fake:
        async with session.get(fake.url + "/v1/models") as response:
            data = (await response.json())["data"]
        assert [(m["id"], m["owned_by"]) for m in data] == [
            ("llama3.2:latest", "library"),
            ("someone/tool:7b", "someone"),
        ]
        async with session.get(fake.url + "/v1/models/someone/tool:7b") as response:
            assert (await response.json())["id"] == "someone/tool:7b"
        async with session.get(fake.url + "/v1/models/nope:1b") as response:
            assert response.status == 404
            assert (await response.json())["error"]["type"] == "not_found_error"
    async with FakeOllama(models=[]) as empty, session.get(empty.url + "/v1/models") as response:
        assert await response.json() == {"object": "list", "data": None}


async def test_responses_api(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    body = {"model": "llama3.2", "input": "say hi"}
    reply = orjson.loads((await post(session, fake, "/v1/responses", body))[2])
    assert (reply["object"], reply["status"]) == ("response", "completed")
    assert reply["output"][0]["content"][0]["text"] == TEXT
    assert (reply["usage"]["input_tokens"], reply["usage"]["output_tokens"]) == (2, 6)
    events = sse_events((await post(session, fake, "/v1/responses", body | {"stream": True}))[2])
    names = [name for name, _ in events]
    assert names[0] == "response.created" and names[-1] == "response.completed"
    assert names.count("response.output_text.delta") == len(fake.chunks)
    assert [orjson.loads(data)["sequence_number"] for _, data in events] == list(range(len(events)))


async def test_anthropic_messages(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    body = CHAT | {"max_tokens": 100}
    reply = orjson.loads((await post(session, fake, "/v1/messages", body))[2])
    assert (reply["type"], reply["role"], reply["stop_reason"]) == (
        "message",
        "assistant",
        "end_turn",
    )
    assert reply["content"] == [{"type": "text", "text": TEXT}]
    assert reply["usage"] == {"input_tokens": 3, "output_tokens": 6}
    events = sse_events((await post(session, fake, "/v1/messages", body | {"stream": True}))[2])
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop"
    assert names.count("content_block_delta") == len(fake.chunks)
    status, _, raw = await post(session, fake, "/v1/messages", CHAT)
    assert status == 400 and orjson.loads(raw)["type"] == "error"


# --- errors ---------------------------------------------------------------------


async def test_error_shapes(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    unknown = {"model": "nope", "messages": CHAT["messages"]}
    status, _, raw = await post(session, fake, "/api/chat", unknown)
    assert (status, orjson.loads(raw)) == (404, {"error": not_found_message("nope")})
    assert not_found_message("nope") == 'model "nope" not found, try pulling it first'
    status, _, raw = await post(session, fake, "/v1/chat/completions", unknown)
    assert (status, orjson.loads(raw)) == (
        404,
        {
            "error": {
                "message": not_found_message("nope"),
                "type": "not_found_error",
                "param": None,
                "code": None,
            }
        },
    )
    for path in ("/api/chat", "/v1/chat/completions"):
        status, _, raw = await post(session, fake, path, {"messages": CHAT["messages"]})
        message = orjson.loads(raw)["error"]
        assert status == 400
        assert (message if path.startswith("/api") else message["message"]) == "model is required"
    async with session.post(fake.url + "/v1/chat/completions", data=b"{nope") as response:
        assert response.status == 400
        assert (await response.json())["error"]["type"] == "invalid_request_error"
    async with session.post(fake.url + "/api/generate", data=b"[1") as response:
        assert response.status == 400 and isinstance((await response.json())["error"], str)


# --- faults ---------------------------------------------------------------------


async def test_status_and_busy_faults_use_the_route_shape(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    fake.inject(Fault("status", status=500, message="kaput"))
    fake.inject(Fault("busy"))
    async with session.get(fake.url + "/api/tags") as response:  # not a generation: no fault
        assert response.status == 200
    status, _, raw = await post(session, fake, "/api/chat", CHAT)
    assert (status, orjson.loads(raw)) == (500, {"error": "kaput"})
    status, _, raw = await post(session, fake, "/v1/chat/completions", CHAT)
    assert status == 503
    assert orjson.loads(raw)["error"] == {
        "message": BUSY_MESSAGE,
        "type": "api_error",
        "param": None,
        "code": None,
    }
    assert [r.path for r in fake.requests] == ["/api/tags", "/api/chat", "/v1/chat/completions"]
    assert fake.requests[-1].json == CHAT  # recorded although the fault answered
    assert (await post(session, fake, "/api/chat", CHAT))[0] == 200  # queue drained


async def test_delay_headers_waits_for_release(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    fake.inject(Fault("delay_headers", release=release))
    pending = asyncio.create_task(post(session, fake, "/v1/chat/completions", CHAT))
    await asyncio.wait_for(fake.holding_headers.wait(), 5)
    assert not pending.done() and len(fake.requests) == 1
    release.set()
    assert (await asyncio.wait_for(pending, 2))[0] == 200
    fake.inject(Fault("delay_headers", delay=0.05))
    started = time.monotonic()
    assert (await post(session, fake, "/api/chat", CHAT))[0] == 200
    # uvloop's timers count whole milliseconds: a 50 ms sleep may end a little early.
    assert time.monotonic() - started >= 0.045


async def test_reset_after_cuts_the_chunked_body(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    fake.inject(Fault("reset_after", after_chunks=2))
    received = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(fake.url + "/api/chat", json=CHAT) as response:
            async for line in response.content:
                received.append(orjson.loads(line)["message"]["content"])
    assert received == fake.chunks[:2]
    fake.inject(Fault("reset_after"))
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, fake, "/v1/chat/completions", CHAT)  # non-stream: no answer at all
    assert not fake.stream_closed_by_peer.is_set()


async def test_end_without_done(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    fake.inject(Fault("end_without_done", after_chunks=3))
    lines = (await post(session, fake, "/api/chat", CHAT))[2].splitlines()
    assert [orjson.loads(line)["done"] for line in lines] == [False, False, False]
    fake.inject(Fault("end_without_done", after_chunks=3))
    raw = (await post(session, fake, "/v1/chat/completions", CHAT | {"stream": True}))[2]
    assert len(sse_json(raw)) == 3 and b"[DONE]" not in raw
    fake.inject(Fault("end_without_done"))
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(session, fake, "/v1/chat/completions", CHAT)  # non-stream: the body is cut short


async def test_close_before_response(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    fake.inject(Fault("close_before_response"))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(session, fake, "/api/chat", CHAT)
    assert len(fake.requests) == 1
    assert (await post(session, fake, "/api/chat", CHAT))[0] == 200


async def test_garbage_after(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    fake.inject(Fault("garbage_after", after_chunks=1))
    lines = (await post(session, fake, "/api/chat", CHAT))[2].splitlines()
    assert lines[1] == GARBAGE
    assert orjson.loads(lines[-1])["done"] is True and len(lines) == len(fake.chunks) + 2
    fake.inject(Fault("garbage_after", after_chunks=1))
    raw = (await post(session, fake, "/v1/chat/completions", CHAT | {"stream": True}))[2]
    assert sse_events(raw)[1] == (None, GARBAGE.decode())
    assert raw.endswith(b"data: [DONE]\n\n")


# --- streaming mechanics and connections ----------------------------------------


async def test_between_chunks_gates_each_chunk(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    gates = {i: asyncio.Event() for i in range(1, len(fake.chunks))}

    async def between(index: int) -> None:
        await gates[index].wait()

    fake.between_chunks = between
    async with session.post(fake.url + "/api/chat", json=CHAT) as response:
        for index, piece in enumerate(fake.chunks):
            line = await asyncio.wait_for(response.content.readline(), 2)
            assert orjson.loads(line)["message"]["content"] == piece
            if index + 1 < len(fake.chunks):
                assert fake.active_streams == 1
                gates[index + 1].set()  # chunk i+1 exists only once chunk i has arrived
        assert orjson.loads(await response.content.readline())["done"] is True
    assert fake.active_streams == 0


async def test_stream_closed_by_peer(fake: FakeOllama, session: aiohttp.ClientSession) -> None:
    fake.between_chunks = never  # chunk 1 never comes
    async with session.post(fake.url + "/v1/chat/completions", json=CHAT | {"stream": True}) as r:
        assert (await asyncio.wait_for(r.content.readline(), 2)).startswith(b"data: ")
        assert fake.active_streams == 1
        r.close()
    await asyncio.wait_for(fake.stream_closed_by_peer.wait(), 2)
    assert fake.active_streams == 0


async def test_stop_ends_a_hanging_stream_without_blaming_the_peer(
    session: aiohttp.ClientSession,
) -> None:
    fake = FakeOllama()
    await fake.start()
    fake.between_chunks = never
    async with session.post(fake.url + "/api/chat", json=CHAT) as response:
        await asyncio.wait_for(response.content.readline(), 2)
        await asyncio.wait_for(fake.stop(), 2)
    assert not fake.stream_closed_by_peer.is_set()


async def test_connections_opened_counts_tcp_connections(fake: FakeOllama) -> None:
    async with aiohttp.ClientSession() as first:
        for _ in range(3):
            await post(first, fake, "/api/chat", CHAT | {"stream": False})
    assert fake.connections_opened == 1  # keep-alive reused one connection
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as second:
        for _ in range(2):
            await post(second, fake, "/api/version", None)
    assert fake.connections_opened == 3


# --- a real client ----------------------------------------------------------------


async def test_openai_client_against_the_fake(fake: FakeOllama) -> None:
    client = AsyncOpenAI(base_url=fake.url + "/v1", api_key="x", max_retries=0)
    try:
        messages: Any = CHAT["messages"]
        completion = await client.chat.completions.create(model="llama3.2", messages=messages)
        assert completion.choices[0].message.content == TEXT
        assert completion.usage is not None and completion.usage.completion_tokens == 6
        stream = await client.chat.completions.create(
            model="llama3.2",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == TEXT
        assert pieces[-1].usage is not None and pieces[-1].usage.total_tokens == 9
        embeddings = await client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
        assert [len(item.embedding) for item in embeddings.data] == [8, 8]
        models = [model.id async for model in client.models.list()]
        assert models == fake.models
    finally:
        await client.close()


async def test_fault_headers_and_in_flight_counting(
    fake: FakeOllama, session: aiohttp.ClientSession
) -> None:
    fake.inject(Fault("status", status=429, message="slow down", headers={"Retry-After": "2"}))
    async with session.post(f"{fake.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "2"
    release = asyncio.Event()

    async def hold(index: int) -> None:
        await release.wait()

    fake.between_chunks = hold
    streams = [
        asyncio.create_task(session.post(f"{fake.url}/api/chat", json=CHAT)) for _ in range(3)
    ]
    responses = [await stream for stream in streams]
    for response in responses:
        await response.content.readline()
    assert fake.in_flight == 3
    release.set()
    for response in responses:
        await response.read()
        response.release()
    assert fake.peak_in_flight == 3
