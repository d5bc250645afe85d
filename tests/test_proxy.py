"""The relay: bytes pass untouched, streams flow chunk by chunk, failures end streams loudly."""

from __future__ import annotations

import asyncio
import re
import socket

import aiohttp
import orjson
import pytest
from aiohttp import web

from sidecar.app import Sidecar
from tests.conftest import JsonLogs, SidecarFactory
from tests.fake_ollama import FakeOllama, Fault

CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi there"}]}


async def read_sse_events(response: aiohttp.ClientResponse) -> list[bytes]:
    body = await response.read()
    return [event for event in body.split(b"\n\n") if event]


async def test_non_stream_body_reaches_upstream_byte_for_byte(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    # Odd spacing and key order: any re-serialisation would show.
    body = b'{ "messages":[{"role":"user","content":"hi"}] ,"model" : "llama3.2:latest"}'
    async with http.post(f"{sidecar.url}/v1/chat/completions?x=1&y=two", data=body) as response:
        assert response.status == 200
        document = await response.json()
    assert document["object"] == "chat.completion"
    assert document["usage"]["completion_tokens"] > 0
    recorded = fake.requests[-1]
    assert recorded.body == body
    assert recorded.path == "/v1/chat/completions"
    assert recorded.query == "x=1&y=two"


async def test_response_bytes_pass_through_unchanged(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{fake.url}/api/tags") as direct:
        direct_body = await direct.read()
    async with http.get(f"{sidecar.url}/api/tags") as proxied:
        assert proxied.status == 200
        assert await proxied.read() == direct_body
        assert proxied.headers["Content-Type"] == direct.headers["Content-Type"]


async def test_sse_stream_is_relayed_event_for_event(
    sidecar: Sidecar, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{sidecar.url}/v1/chat/completions", json={**CHAT, "stream": True}
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["X-Accel-Buffering"] == "no"
        assert "Content-Length" not in response.headers
        assert response.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Encoding" not in response.headers
        events = await read_sse_events(response)
    assert events[-1] == b"data: [DONE]"
    first = orjson.loads(events[0].removeprefix(b"data: "))
    assert first["choices"][0]["delta"]["role"] == "assistant"
    # No usage event unless the client asked for it.
    assert all(b'"choices":[]' not in event for event in events)


async def test_ndjson_stream_is_the_default_on_api_chat(
    sidecar: Sidecar, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{sidecar.url}/api/chat", json=CHAT) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/x-ndjson"
        lines = (await response.read()).splitlines()
    documents = [orjson.loads(line) for line in lines]
    assert documents[-1]["done"] is True
    assert documents[-1]["eval_count"] == len(documents) - 1
    assert all(document["done"] is False for document in documents[:-1])


async def test_stream_is_not_buffered(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Chunk i+1 leaves the fake only after the client has received chunk i.

    A sidecar that held chunks back would deadlock here (and fail by timeout).
    """
    received = [asyncio.Event() for _ in range(len(fake.chunks) + 2)]

    async def gate(index: int) -> None:
        await received[index - 1].wait()

    fake.between_chunks = gate
    async with http.post(f"{sidecar.url}/api/chat", json=CHAT) as response:
        count = 0
        async with asyncio.timeout(10):
            while line := await response.content.readline():
                assert orjson.loads(line)
                received[count].set()
                count += 1
    assert count == len(fake.chunks) + 1


async def test_client_disconnect_closes_the_upstream_stream(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    never = asyncio.Event()

    async def hold(index: int) -> None:
        await never.wait()

    fake.between_chunks = hold
    response = await http.post(f"{sidecar.url}/v1/chat/completions", json={**CHAT, "stream": True})
    first = await response.content.readline()
    assert first.startswith(b"data: ")
    response.close()
    await asyncio.wait_for(fake.stream_closed_by_peer.wait(), 5)
    assert fake.active_streams == 0


@pytest.mark.parametrize(
    ("path", "body", "error_prefix"),
    [
        ("/v1/chat/completions", {**CHAT, "stream": True}, b"data: "),
        ("/api/chat", CHAT, b""),
        ("/api/generate", {"model": "llama3.2:latest", "prompt": "hi"}, b""),
    ],
)
@pytest.mark.parametrize("kind", ["reset_after", "end_without_done"])
async def test_broken_stream_ends_with_an_error_event(
    sidecar: Sidecar,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    path: str,
    body: dict[str, object],
    error_prefix: bytes,
    kind: str,
) -> None:
    fake.inject(Fault(kind, after_chunks=2))  # type: ignore[arg-type]
    async with http.post(f"{sidecar.url}{path}", json=body) as response:
        assert response.status == 200
        raw = await response.read()
    lines = [line for line in raw.split(b"\n") if line]
    assert b"[DONE]" not in raw
    last = orjson.loads(lines[-1].removeprefix(error_prefix))
    if error_prefix:
        assert last["error"]["type"] == "api_error"
        expected = (
            "upstream_stream_incomplete"
            if kind == "end_without_done"
            else "upstream_stream_interrupted"
        )
        assert last["error"]["code"] == expected
    else:
        assert isinstance(last["error"], str)
    metrics = sidecar.metrics.render().decode()
    assert "ollama_sidecar_stream_interruptions_total{" in metrics


async def test_idle_timeout_mid_stream_ends_with_an_error_event(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(upstream={"timeouts": {"idle": "200ms"}})
    stall = asyncio.Event()

    async def hold(index: int) -> None:
        if index == 2:
            await stall.wait()

    fake.between_chunks = hold
    async with http.post(f"{sidecar.url}/api/chat", json=CHAT) as response:
        lines = (await response.read()).splitlines()
    assert len(lines) == 3
    assert "idle timeout" in orjson.loads(lines[-1])["error"]
    await asyncio.wait_for(fake.stream_closed_by_peer.wait(), 5)


async def test_upstream_unreachable_is_502_in_each_dialect(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    sidecar = await make_sidecar(upstream_url=f"http://127.0.0.1:{unused_tcp_port}")
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 502
        error = (await response.json())["error"]
    assert error["code"] == "upstream_unreachable"
    assert error["type"] == "api_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert response.headers["X-Request-ID"]
    async with http.post(f"{sidecar.url}/api/chat", json=CHAT) as response:
        assert response.status == 502
        assert isinstance((await response.json())["error"], str)


async def test_slow_first_byte_is_504(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(upstream={"timeouts": {"first_byte": "200ms"}})
    release = asyncio.Event()
    fake.inject(Fault("delay_headers", release=release))
    try:
        async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
            assert response.status == 504
            assert (await response.json())["error"]["code"] == "upstream_timeout"
    finally:
        release.set()


async def test_upstream_closing_an_idle_pooled_connection_is_resent_fresh(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200
    # The pooled connection is now idle; the upstream drops it as the next request arrives.
    fake.inject(Fault("close_before_response"))
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200
        assert (await response.json())["choices"][0]["message"]["content"]
    generations = [r for r in fake.requests if r.path == "/v1/chat/completions"]
    assert len(generations) == 3
    assert (
        "ollama_sidecar_upstream_keepalive_resends_total 1.0" in sidecar.metrics.render().decode()
    )


async def test_upstream_errors_pass_through_unchanged(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    body = {**CHAT, "model": "nope"}
    async with http.post(f"{fake.url}/v1/chat/completions", json=body) as direct:
        direct_body = await direct.read()
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=body) as response:
        assert response.status == 404
        assert await response.read() == direct_body
    fake.inject(Fault("busy"))
    async with http.post(f"{sidecar.url}/api/chat", json=CHAT) as response:
        assert response.status == 503
        assert "server busy" in (await response.json())["error"]


async def test_hop_by_hop_and_authorization_stay_in_the_sidecar(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    headers = {
        "Authorization": "Bearer sk-secret",
        "Connection": "keep-alive, X-Private",
        "X-Private": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic abc",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "X-App": "kept",
    }
    async with http.post(
        f"{sidecar.url}/v1/chat/completions", json=CHAT, headers=headers
    ) as response:
        assert response.status == 200
    sent = fake.requests[-1].headers
    for name in ("Authorization", "X-Private", "Keep-Alive", "TE", "Proxy-Authorization"):
        assert name not in sent, name
    assert sent["traceparent"] == headers["traceparent"]
    assert sent["X-App"] == "kept"
    assert sent["Accept-Encoding"] == "identity"


async def test_authorization_is_forwarded_when_configured(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(upstream={"forward_authorization": True})
    headers = {"Authorization": "Bearer upstream-key"}
    async with http.get(f"{sidecar.url}/v1/models", headers=headers) as response:
        assert response.status == 200
    assert fake.requests[-1].headers["Authorization"] == "Bearer upstream-key"


async def test_request_id_is_kept_or_made_and_sent_both_ways(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    async with http.get(
        f"{sidecar.url}/api/version", headers={"X-Request-ID": "app-42"}
    ) as response:
        assert response.headers["X-Request-ID"] == "app-42"
    assert fake.requests[-1].headers["X-Request-ID"] == "app-42"
    for junk in ("has space", "x" * 500, "new\u00e9line"):
        async with http.get(
            f"{sidecar.url}/api/version", headers={"X-Request-ID": junk}
        ) as response:
            made = response.headers["X-Request-ID"]
        assert made != junk
        assert len(made) == 32
        assert fake.requests[-1].headers["X-Request-ID"] == made


async def test_pass_through_config_adds_no_request_id(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(policies=[])
    async with http.get(f"{sidecar.url}/api/version") as response:
        assert response.status == 200
        assert "X-Request-ID" not in response.headers


async def test_model_routes_and_listing(sidecar: Sidecar, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{sidecar.url}/v1/models") as response:
        ids = [model["id"] for model in (await response.json())["data"]]
    assert "llama3.2:latest" in ids
    async with http.get(f"{sidecar.url}/v1/models/llama3.2:latest") as response:
        assert response.status == 200
        assert (await response.json())["id"] == "llama3.2:latest"
    async with http.get(f"{sidecar.url}/v1/models/absent:latest") as response:
        assert response.status == 404


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/completions", {"model": "llama3.2:latest", "prompt": "hi"}),
        ("POST", "/v1/embeddings", {"model": "nomic-embed-text:latest", "input": ["a", "b"]}),
        ("POST", "/v1/responses", {"model": "llama3.2:latest", "input": "hi"}),
        (
            "POST",
            "/v1/messages",
            {
                "model": "llama3.2:latest",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}],
            },
        ),
        ("POST", "/api/generate", {"model": "llama3.2:latest", "prompt": "hi", "stream": False}),
        ("POST", "/api/embed", {"model": "nomic-embed-text:latest", "input": "a"}),
        ("POST", "/api/embeddings", {"model": "nomic-embed-text:latest", "prompt": "a"}),
        ("POST", "/api/show", {"model": "llama3.2:latest"}),
        ("GET", "/api/ps", None),
        ("GET", "/api/version", None),
        ("GET", "/", None),
    ],
)
async def test_every_relayed_route_answers_like_ollama(
    sidecar: Sidecar,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    body: object,
) -> None:
    async with http.request(method, f"{fake.url}{path}", json=body) as direct:
        direct_status = direct.status
    async with http.request(method, f"{sidecar.url}{path}", json=body) as response:
        assert response.status == direct_status == 200
        await response.read()
    assert fake.requests[-1].path == path


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": "llama3.2:latest", "input": "hi", "stream": True}),
        (
            "/v1/messages",
            {
                "model": "llama3.2:latest",
                "max_tokens": 5,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
        ),
    ],
)
async def test_named_event_streams_pass_when_complete(
    sidecar: Sidecar, http: aiohttp.ClientSession, path: str, body: object
) -> None:
    async with http.post(f"{sidecar.url}{path}", json=body) as response:
        raw = await response.read()
    last_event = raw.rstrip(b"\n").split(b"\n\n")[-1]
    assert last_event.startswith((b"event: response.completed", b"event: message_stop"))


async def test_management_route_reaches_upstream_only_when_allowed(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    blocked = await make_sidecar()
    async with http.post(f"{blocked.url}/api/pull", json={"model": "x"}) as response:
        assert response.status == 403
        assert "management.allow" in (await response.json())["error"]
    assert not [r for r in fake.requests if r.path == "/api/pull"]
    allowed = await make_sidecar(management={"allow": ["pull"]})
    async with http.post(
        f"{allowed.url}/api/pull", json={"model": "x", "stream": False}
    ) as response:
        assert response.status == 200
    assert [r.path for r in fake.requests if r.path == "/api/pull"] == ["/api/pull"]


async def test_client_disconnect_before_the_first_byte_cancels_the_upstream_request(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    """A client that gives up while Ollama is still thinking must not leave Ollama thinking."""
    arrived = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(request: web.BaseRequest) -> web.StreamResponse:
        arrived.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response()

    runner = web.ServerRunner(web.Server(slow, handler_cancellation=True))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        sidecar = await make_sidecar(upstream_url=f"http://127.0.0.1:{runner.addresses[0][1]}")
        request = asyncio.create_task(http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT))
        await asyncio.wait_for(arrived.wait(), 5)
        request.cancel()
        await asyncio.wait_for(cancelled.wait(), 5)
        # The sidecar's own handler ends too: nothing is left in flight.
        assert sidecar._idle is not None
        await asyncio.wait_for(sidecar._idle.wait(), 5)
    finally:
        await runner.cleanup()


async def test_a_client_gone_mid_stream_is_a_quiet_499(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession, json_logs: JsonLogs
) -> None:
    never = asyncio.Event()

    async def hold(index: int) -> None:
        if index >= 2:
            await never.wait()

    fake.between_chunks = hold
    response = await http.post(f"{sidecar.url}/api/chat", json=CHAT)
    await response.content.readline()
    response.close()
    await asyncio.wait_for(fake.stream_closed_by_peer.wait(), 5)
    assert sidecar._idle is not None
    await asyncio.wait_for(sidecar._idle.wait(), 5)
    lines = json_logs()
    assert [line["status"] for line in lines if line["event"] == "request"] == [499]
    assert not [line for line in lines if line["level"] in ("error", "critical", "exception")]


async def test_route_timeouts_override_the_default_for_one_route(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(
        upstream={"route_timeouts": {"/v1/embeddings": {"first_byte": "100ms"}}}
    )
    release = asyncio.Event()
    fake.inject(Fault("delay_headers", release=release))
    try:
        body = {"model": "nomic-embed-text:latest", "input": "x"}
        async with http.post(f"{sidecar.url}/v1/embeddings", json=body) as response:
            assert response.status == 504
    finally:
        release.set()
    # Other routes keep the generous default.
    release = asyncio.Event()
    fake.inject(Fault("delay_headers", release=release))
    request = asyncio.create_task(http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT))
    await asyncio.sleep(0.3)  # well past the embeddings override, far below the default
    assert not request.done()
    release.set()
    async with await request as response:
        assert response.status == 200


async def test_a_long_stream_read_in_small_pieces_arrives_byte_for_byte(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """The relay frames chunks itself while the client keeps up and lets aiohttp do it
    (with back-pressure) when the socket buffer is not empty: both must interleave cleanly."""
    # ~16 MB: more than the socket buffers on both sides hold.
    fake.chunks = [f"{n:05d} " + "x" * 4000 for n in range(4000)]
    body = {**CHAT, "stream": True}
    async with http.post(f"{fake.url}/v1/chat/completions", json=body) as direct:
        expected = await direct.read()
    # A client with a small receive buffer, so the sidecar's socket buffer fills and
    # the relay switches between its own framing and aiohttp's as the client drains.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    payload = orjson.dumps(body)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
        + payload
    )
    async with asyncio.timeout(30):
        answer = await reader.read(-1)
    writer.close()
    head, _, framed = answer.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    received = _dechunk(framed)
    assert _without_ids(received) == _without_ids(expected)
    assert received.endswith(b"data: [DONE]\n\n")


async def test_an_http_1_0_client_gets_the_stream_unframed_until_the_close(
    sidecar: Sidecar,
) -> None:
    host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = orjson.dumps({**CHAT, "stream": True})
    writer.write(
        b"POST /api/chat HTTP/1.0\r\nContent-Type: application/json\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(payload)
        + payload
    )
    async with asyncio.timeout(10):
        answer = await reader.read(-1)  # the sidecar closes after the body
    writer.close()
    head, _, stream = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower()
    lines = stream.splitlines()
    assert all(orjson.loads(line) for line in lines)
    assert orjson.loads(lines[-1])["done"] is True


def _without_ids(stream: bytes) -> bytes:
    """A stream with the per-answer parts (id, created, timings) masked."""
    return re.sub(rb'"(id|created|system_fingerprint)":("[^"]*"|\d+)', rb'"\1":0', stream)


def _dechunk(framed: bytes) -> bytes:
    """A chunked body decoded strictly: every size line, every CRLF, the final 0 chunk."""
    out = bytearray()
    at = 0
    while True:
        end = framed.index(b"\r\n", at)
        size = int(framed[at:end], 16)
        at = end + 2
        if size == 0:
            assert framed[at:] == b"\r\n"
            return bytes(out)
        out += framed[at : at + size]
        assert framed[at + size : at + size + 2] == b"\r\n"
        at += size + 2
