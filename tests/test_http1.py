"""The lean HTTP/1.1 client (sidecar/http1.py) against a scripted upstream on real sockets.

The fake Ollama is a well-behaved aiohttp server; the cases here are the ones
an upstream hop has to survive that a well-behaved server never produces: a
kept-alive connection closed under a request, bodies delimited by the
connection's close, compressed bodies, 1xx answers, garbage, extra bytes,
hop-by-hop headers, a stream faster than its reader. `ScriptedUpstream`
answers each request with exact bytes a test chooses, records the raw bytes it
received, counts connections, and tells when the sidecar closes one.
"""

from __future__ import annotations

import asyncio
import gzip
import random
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict
from pydantic import BaseModel, ConfigDict

from sidecar import http1
from sidecar.app import Sidecar
from sidecar.chain import Next, PolicyContext
from sidecar.exchange import Exchange, Reply
from sidecar.http1 import Connection, Origin, Pool, encode_request
from tests.conftest import SidecarFactory, raw_http

CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]}
NDJSON = "application/x-ndjson"
BOUND = 5.0  # seconds any single wait in this file may take before the test fails


# --- the scripted upstream -----------------------------------------------------------


@dataclass(eq=False)
class UpstreamRequest:
    """One request as the upstream read it off the wire."""

    connection: UpstreamConnection
    raw: bytes
    method: str
    target: str
    headers: CIMultiDict[str]
    body: bytes
    number: int  # 0-based, across all connections


Handler = Callable[[UpstreamRequest], Awaitable[None]]


class UpstreamConnection:
    """The upstream's end of one TCP connection."""

    def __init__(
        self,
        upstream: ScriptedUpstream,
        index: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.upstream = upstream
        self.index = index
        self.reader = reader
        self.writer = writer
        self.requests: list[UpstreamRequest] = []
        self.peer_closed = asyncio.Event()  # the sidecar closed its side (EOF or reset read)
        self.ended = asyncio.Event()  # over, whoever ended it

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()

    def close(self) -> None:
        """A clean close (FIN) after whatever was written."""
        self.writer.close()

    def reset(self) -> None:
        """Close with a TCP reset (RST) instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def until_peer_closes(self) -> None:
        """Read (and drop) whatever comes until the sidecar closes the connection."""
        try:
            while await self.reader.read(65536):
                pass
        except ConnectionError:
            pass
        self._peer_gone()

    async def read_request(self) -> UpstreamRequest | None:
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self._peer_gone()
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.add(name, value.strip())
        length = int(headers.get("Content-Length", "0"))
        body = await self.reader.readexactly(length) if length else b""
        request = UpstreamRequest(
            self, head + body, method, target, headers, body, len(self.upstream.requests)
        )
        self.requests.append(request)
        return request

    def _peer_gone(self) -> None:
        self.peer_closed.set()
        self.upstream.changed()


async def answer_json(request: UpstreamRequest) -> None:
    """The default script: a small JSON answer naming the request it answers."""
    body = orjson.dumps({"answer": request.number, "target": request.target})
    request.connection.send(http_response(body))


class ScriptedUpstream:
    """An HTTP/1.1 server on 127.0.0.1 whose every answer is `handler`'s exact bytes."""

    def __init__(self) -> None:
        self.handler: Handler = answer_json
        self.connections: list[UpstreamConnection] = []
        self.requests: list[UpstreamRequest] = []
        self.open_now = 0
        self.max_open = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ScriptedUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=2**20)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for connection in self.connections:
            connection.writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def changed(self) -> None:
        """Wake every `until` waiter to look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(BOUND):
            while not predicate():
                await self._changed.wait()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        connection = UpstreamConnection(self, len(self.connections), reader, writer)
        self.connections.append(connection)
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        self.changed()
        try:
            while not writer.is_closing():
                request = await connection.read_request()
                if request is None:
                    break
                self.requests.append(request)
                self.changed()
                await self.handler(request)
                if not writer.is_closing():
                    await writer.drain()
        except ConnectionError:
            connection.peer_closed.set()
        except asyncio.CancelledError:
            pass  # torn down mid-script; ending quietly keeps asyncio's stream callback quiet
        finally:
            self.open_now -= 1
            writer.close()
            connection.ended.set()
            self._tasks.discard(task)
            self.changed()


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    async with ScriptedUpstream() as server:
        yield server


@pytest.fixture(autouse=True)
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Nothing here may end in the loop's exception handler (a protocol callback that raised)."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    yield seen
    loop.set_exception_handler(previous)
    assert not seen, seen


def http_response(
    body: bytes = b"",
    *,
    status: str = "200 OK",
    headers: Sequence[tuple[str, str]] = (("Content-Type", "application/json; charset=utf-8"),),
    length: bool = True,
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{version} {status}", *(f"{name}: {value}" for name, value in headers)]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk(piece: bytes) -> bytes:
    return f"{len(piece):x}\r\n".encode() + piece + b"\r\n"


LAST_CHUNK = b"0\r\n\r\n"
STREAM_HEAD = http_response(
    headers=(("Content-Type", NDJSON), ("Transfer-Encoding", "chunked")), length=False
)


def ndjson_lines(count: int) -> list[bytes]:
    lines = [
        orjson.dumps({"message": {"content": f"t{i}"}, "done": False}) + b"\n" for i in range(count)
    ]
    return [*lines, orjson.dumps({"message": {"content": ""}, "done": True}) + b"\n"]


def resends(sidecar: Sidecar) -> float | None:
    return sidecar.metrics.registry.get_sample_value(
        "ollama_sidecar_upstream_keepalive_resends_total"
    )


def upstream_errors(sidecar: Sidecar, reason: str) -> float:
    value = sidecar.metrics.registry.get_sample_value(
        "ollama_sidecar_upstream_errors_total", {"reason": reason}
    )
    return value or 0.0


async def start(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, **upstream_settings: Any
) -> Sidecar:
    return await make_sidecar(policies=[], upstream_url=upstream.url, upstream=upstream_settings)


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with asyncio.timeout(BOUND), http.get(url) as response:
        return response.status, await response.json()


# --- 1. the keep-alive race ----------------------------------------------------------


@pytest.mark.parametrize("how", ["fin", "reset"])
async def test_a_reused_connection_dropped_under_a_request_is_resent_once_fresh(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession, how: str
) -> None:
    async def handler(request: UpstreamRequest) -> None:
        connection = request.connection
        if connection.index == 0 and len(connection.requests) == 2:
            # The upstream had given up on this idle connection as request 2 came in.
            if how == "fin":
                connection.close()
            else:
                connection.reset()
            return
        await answer_json(request)

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    async with http.post(f"{sidecar.url}/api/chat", json={**CHAT, "n": 1}) as response:
        assert response.status == 200
    body = orjson.dumps({**CHAT, "n": 2, "stream": False})
    async with http.post(f"{sidecar.url}/api/chat", data=body) as response:
        assert response.status == 200
        assert (await response.json())["answer"] == 2
    assert len(upstream.connections) == 2
    dropped, resent = upstream.requests[1], upstream.requests[2]
    assert (dropped.connection.index, resent.connection.index) == (0, 1)
    assert resent.raw == dropped.raw  # the same request, byte for byte
    assert resent.body == body
    assert resends(sidecar) == 1.0


async def test_an_idle_connection_the_upstream_closed_is_not_used_again(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    async def handler(request: UpstreamRequest) -> None:
        await answer_json(request)  # keep-alive by HTTP/1.1's default...
        if request.number == 0:
            await request.connection.drain()
            request.connection.close()  # ...yet closed right after, without a word

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    assert await get_json(http, f"{sidecar.url}/api/tags") == (
        200,
        {"answer": 0, "target": "/api/tags"},
    )
    await asyncio.wait_for(upstream.connections[0].ended.wait(), BOUND)
    status, body = await get_json(http, f"{sidecar.url}/api/tags")
    assert (status, body["answer"]) == (200, 1)
    assert len(upstream.connections) == 2
    assert len(upstream.requests) == 2  # whichever way the close was noticed, sent once
    assert (resends(sidecar) or 0.0) <= 1.0


async def test_a_fresh_connection_dropped_before_answering_is_not_resent(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    async def handler(request: UpstreamRequest) -> None:
        request.connection.close()

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_disconnected"
    assert len(upstream.connections) == 1
    assert len(upstream.requests) == 1
    assert resends(sidecar) == 0.0
    assert upstream_errors(sidecar, "disconnected") == 1.0


async def test_a_reused_connection_dropped_after_part_of_the_answer_is_not_resent(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    async def handler(request: UpstreamRequest) -> None:
        if request.number == 1:  # the upstream did process it: resending would run it twice
            request.connection.send(
                http_response(length=False)[:-2] + b"Content-Length: 100\r\n\r\n{"
            )
            await request.connection.drain()
            request.connection.close()
            return
        await answer_json(request)

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    assert (await get_json(http, f"{sidecar.url}/v1/models"))[0] == 200
    async with http.get(f"{sidecar.url}/v1/models") as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_disconnected"
    assert len(upstream.connections) == 1
    assert resends(sidecar) == 0.0


# --- 2. content codings --------------------------------------------------------------

BIG_JSON = orjson.dumps({"models": [{"name": f"model-{i}", "size": i * 7} for i in range(3000)]})


@pytest.mark.parametrize(
    ("coding", "encode"),
    [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("deflate", zlib.compress)],
)
async def test_compressed_bodies_are_decoded(
    make_sidecar: SidecarFactory,
    upstream: ScriptedUpstream,
    http: aiohttp.ClientSession,
    coding: str,
    encode: Callable[[bytes], bytes],
) -> None:
    async def handler(request: UpstreamRequest) -> None:
        headers = (("Content-Type", "application/json"), ("Content-Encoding", coding))
        request.connection.send(http_response(encode(BIG_JSON), headers=headers))

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    headers = {"Accept-Encoding": "gzip, deflate, br"}
    async with (
        aiohttp.ClientSession(auto_decompress=False) as plain,
        plain.get(f"{sidecar.url}/api/tags", headers=headers) as response,
    ):
        assert response.status == 200
        assert "Content-Encoding" not in response.headers
        assert await response.read() == BIG_JSON
    assert upstream.requests[0].headers.getall("Accept-Encoding") == ["identity"]


async def test_a_compressed_stream_is_decoded_chunk_by_chunk(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    lines = ndjson_lines(20)

    async def handler(request: UpstreamRequest) -> None:
        compressor = zlib.compressobj(wbits=31)  # gzip
        head = STREAM_HEAD[:-2] + b"Content-Encoding: gzip\r\n\r\n"
        request.connection.send(head)
        for line in lines:
            request.connection.send(
                chunk(compressor.compress(line) + compressor.flush(zlib.Z_SYNC_FLUSH))
            )
            await request.connection.drain()
        request.connection.send(chunk(compressor.flush()) + LAST_CHUNK)

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    async with http.post(f"{sidecar.url}/api/chat", json=CHAT) as response:
        assert response.status == 200
        assert "Content-Encoding" not in response.headers
        assert await response.read() == b"".join(lines)


async def test_an_unknown_coding_passes_through_with_its_header(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream
) -> None:
    brotli_ish = bytes(range(256)) * 4

    async def handler(request: UpstreamRequest) -> None:
        headers = (("Content-Type", "application/json"), ("Content-Encoding", "br"))
        request.connection.send(http_response(brotli_ish, headers=headers))

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    async with (
        aiohttp.ClientSession(auto_decompress=False) as plain,
        plain.get(f"{sidecar.url}/api/tags") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Encoding"] == "br"
        assert await response.read() == brotli_ish


async def test_a_corrupt_compressed_body_is_a_502_not_a_crash(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    async def handler(request: UpstreamRequest) -> None:
        if request.number == 0:
            headers = (("Content-Type", "application/json"), ("Content-Encoding", "gzip"))
            request.connection.send(http_response(b"\x1f\x8b not gzip at all", headers=headers))
            return
        await answer_json(request)

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    async with http.get(f"{sidecar.url}/v1/models") as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_disconnected"
    assert (await get_json(http, f"{sidecar.url}/v1/models"))[0] == 200


# --- 3. a body delimited by the connection's close --------------------------------


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
async def test_a_body_ended_by_the_connection_close_arrives_whole(
    make_sidecar: SidecarFactory,
    upstream: ScriptedUpstream,
    http: aiohttp.ClientSession,
    version: str,
) -> None:
    body = orjson.dumps({"blob": "x" * (1024 * 1024)})

    async def handler(request: UpstreamRequest) -> None:
        if request.number == 0:
            headers = (("Content-Type", "application/json"), ("Connection", "close"))
            request.connection.send(http_response(headers=headers, length=False, version=version))
            for start_at in range(0, len(body), 100_000):  # in pieces, as a slow writer would
                request.connection.send(body[start_at : start_at + 100_000])
                await request.connection.drain()
            request.connection.close()
            return
        await answer_json(request)

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    async with asyncio.timeout(BOUND), http.get(f"{sidecar.url}/api/tags") as response:
        assert response.status == 200
        assert await response.read() == body
    status, answer = await get_json(http, f"{sidecar.url}/api/tags")
    assert (status, answer["answer"]) == (200, 1)
    assert len(upstream.connections) == 2


async def test_a_close_delimited_body_cut_by_a_reset_is_not_passed_off_as_whole(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    async def handler(request: UpstreamRequest) -> None:
        headers = (("Content-Type", "application/json"), ("Connection", "close"))
        request.connection.send(http_response(b'{"models": [', headers=headers, length=False))
        await request.connection.drain()
        request.connection.reset()

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    async with asyncio.timeout(BOUND), http.get(f"{sidecar.url}/v1/models") as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_disconnected"


# --- 4. HEAD --------------------------------------------------------------------------


async def test_head_answers_with_a_length_and_no_body_do_not_hang(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    async def handler(request: UpstreamRequest) -> None:
        if request.method == "HEAD":
            found = request.target == "/"
            status = "200 OK" if found else "404 Not Found"
            length = 17 if found else 0
            headers = (
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(length)),
            )
            # Exactly what Go's net/http sends for HEAD: the GET's headers, no body.
            request.connection.send(http_response(status=status, headers=headers, length=False))
            return
        await answer_json(request)

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    sidecar_blobs = await make_sidecar(
        policies=[], upstream_url=upstream.url, management={"allow": ["blobs"]}
    )
    digest = "sha256:" + "ab" * 32
    for url, expected in (
        (f"{sidecar.url}/", 200),
        (f"{sidecar_blobs.url}/api/blobs/{digest}", 404),
        (f"{sidecar.url}/", 200),
    ):
        async with asyncio.timeout(BOUND), http.head(url) as response:
            assert response.status == expected
            assert await response.read() == b""
        status, body = await get_json(http, f"{sidecar.url}/api/tags")
        assert status == 200
        assert body == {"answer": upstream.requests[-1].number, "target": "/api/tags"}
    heads = [request for request in upstream.requests if request.method == "HEAD"]
    assert [request.target for request in heads] == ["/", f"/api/blobs/{digest}", "/"]
    assert all(not request.body and "Content-Length" not in request.headers for request in heads)


# --- 5. 1xx informational answers -------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
async def test_informational_answers_before_the_real_one_are_skipped(
    make_sidecar: SidecarFactory,
    upstream: ScriptedUpstream,
    http: aiohttp.ClientSession,
    split: bool,
) -> None:
    informational = [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    ]

    async def handler(request: UpstreamRequest) -> None:
        body = orjson.dumps({"answer": request.number})
        pieces = [*informational, http_response(body, headers=(("X-Final", "yes"),))]
        if not split:
            request.connection.send(b"".join(pieces))
            return
        for piece in pieces:
            request.connection.send(piece)
            await request.connection.drain()

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    for number in (0, 1):
        async with asyncio.timeout(BOUND), http.get(f"{sidecar.url}/api/tags") as response:
            assert response.status == 200
            assert response.headers["X-Final"] == "yes"
            assert "Link" not in response.headers
            assert await response.read() == orjson.dumps({"answer": number})
    assert len(upstream.connections) == 1  # the connection stayed in step


async def test_informational_answers_before_a_stream_are_skipped(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    lines = ndjson_lines(3)

    async def handler(request: UpstreamRequest) -> None:
        request.connection.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await request.connection.drain()
        request.connection.send(STREAM_HEAD + b"".join(chunk(line) for line in lines) + LAST_CHUNK)

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    async with asyncio.timeout(BOUND), http.post(f"{sidecar.url}/api/chat", json=CHAT) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == NDJSON
        assert await response.read() == b"".join(lines)


# --- 6. garbage -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS ClientHello's first bytes
        b"HTTP/1.1 2xx OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: twelve\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n\x00\x00",
    ],
    ids=["ssh", "tls", "bad-status", "bad-length", "upgrade"],
)
async def test_garbage_instead_of_http_is_a_502_and_the_sidecar_carries_on(
    make_sidecar: SidecarFactory,
    upstream: ScriptedUpstream,
    http: aiohttp.ClientSession,
    garbage: bytes,
) -> None:
    async def handler(request: UpstreamRequest) -> None:
        if request.number == 0:
            request.connection.send(garbage)
            await request.connection.until_peer_closes()  # the sidecar must hang up itself
            return
        await answer_json(request)

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    async with asyncio.timeout(BOUND), http.get(f"{sidecar.url}/v1/models") as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_disconnected"
    await asyncio.wait_for(upstream.connections[0].peer_closed.wait(), BOUND)
    status, body = await get_json(http, f"{sidecar.url}/v1/models")
    assert (status, body["answer"]) == (200, 1)
    assert upstream_errors(sidecar, "disconnected") == 1.0


# --- 7. headers -------------------------------------------------------------------------


async def test_hop_by_hop_response_headers_are_not_relayed(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    async def handler(request: UpstreamRequest) -> None:
        headers = (
            ("Content-Type", "application/json"),
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Connection", "X-Other-Hop"),  # a second Connection field lists more
            ("X-Other-Hop", "2"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("Trailer", "X-Checksum"),
            ("X-Kept", "yes"),
            ("Transfer-Encoding", "chunked"),
        )
        body = orjson.dumps({"answer": request.number})
        request.connection.send(
            http_response(headers=headers, length=False) + chunk(body) + LAST_CHUNK
        )

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    for number in (0, 1):
        async with http.get(f"{sidecar.url}/api/tags") as response:
            assert response.status == 200
            assert await response.read() == orjson.dumps({"answer": number})
            assert response.headers["X-Kept"] == "yes"
            for name in (
                "X-Secret-Hop",
                "X-Other-Hop",
                "Keep-Alive",
                "Proxy-Authenticate",
                "Trailer",
            ):
                assert name not in response.headers, name
            assert "X-Secret-Hop" not in response.headers.get("Connection", "")
    assert len(upstream.connections) == 1


async def test_request_headers_path_prefix_and_host_sent_upstream(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream
) -> None:
    sidecar = await make_sidecar(policies=[], upstream_url=f"{upstream.url}/prefix/")
    request = (
        b"GET /api/tags?x=1&y=two HTTP/1.1\r\n"
        b"Host: sidecar.example:11435\r\n"
        b"Connection: keep-alive, X-Client-Hop\r\n"
        b"Connection: X-Second-Hop\r\n"
        b"X-Client-Hop: secret\r\n"
        b"X-Second-Hop: secret too\r\n"
        b"Keep-Alive: 300\r\n"
        b"TE: trailers\r\n"
        b"Accept-Encoding: gzip, br\r\n"
        b"X-App: kept\r\n"
        b"\r\n"
    )
    status, _ = await raw_http(sidecar.port, request)
    assert status == 200
    sent = upstream.requests[0]
    assert sent.raw.startswith(b"GET /prefix/api/tags?x=1&y=two HTTP/1.1\r\n")
    assert sent.headers.getall("Host") == [f"127.0.0.1:{upstream.port}"]
    for name in ("X-Client-Hop", "X-Second-Hop", "Keep-Alive", "TE", "Connection"):
        assert name not in sent.headers, name
    assert sent.headers.getall("Accept-Encoding") == ["identity"]
    assert sent.headers["X-App"] == "kept"


async def test_a_large_request_body_goes_upstream_whole_even_behind_a_larger_head(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    sidecar = await start(make_sidecar, upstream)
    for prompt_size, header_count in ((200_000, 0), (70_000, 20)):
        body = orjson.dumps({"model": "m", "input": "x" * prompt_size})
        headers = {f"X-Pad-{i}": "p" * 5000 for i in range(header_count)}  # a 100 KB head
        async with (
            asyncio.timeout(BOUND),
            http.post(f"{sidecar.url}/api/embed", data=body, headers=headers) as response,
        ):
            assert response.status == 200
        assert upstream.requests[-1].body == body


# --- 8. the pool limit ------------------------------------------------------------------


class _ArrivalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    key: str


class Arrivals:
    """A test policy: calls the test's listener as each request enters the chain."""

    config_model: ClassVar[type[BaseModel]] = _ArrivalOptions
    listeners: ClassVar[dict[str, Callable[[], None]]] = {}

    def __init__(self, config: _ArrivalOptions, context: PolicyContext) -> None:
        self.key = config.key

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        self.listeners[self.key]()
        return await call_next(exchange)


async def test_the_pool_never_opens_more_than_max_connections(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    arrived = [0]

    async def handler(request: UpstreamRequest) -> None:
        await release.wait()
        await answer_json(request)

    def arrive() -> None:
        arrived[0] += 1
        upstream.changed()

    upstream.handler = handler
    Arrivals.listeners["pool-limit"] = arrive
    try:
        sidecar = await make_sidecar(
            policies=[{"tests.test_http1:Arrivals": {"key": "pool-limit"}}],
            upstream_url=upstream.url,
            upstream={"max_connections": 2},
        )
        calls = [asyncio.ensure_future(get_json(http, f"{sidecar.url}/api/tags")) for _ in range(6)]
        # Six in the chain (each goes straight on to the pool), two held by the upstream.
        await upstream.until(lambda: arrived[0] == 6 and len(upstream.requests) == 2)
        pool = sidecar.upstream._pool(upstream.url)
        assert len(pool._waiters) == 4  # the other four queue in the sidecar
        assert pool.open_count == 2
        assert len(upstream.connections) == 2
        release.set()
        answers = await asyncio.gather(*calls)
    finally:
        del Arrivals.listeners["pool-limit"]
    assert sorted(body["answer"] for _, body in answers) == list(range(6))
    assert {status for status, _ in answers} == {200}
    assert upstream.max_open == 2
    assert len(upstream.connections) == 2  # and the two were reused for the other four


# --- 9. keep-alive expiry --------------------------------------------------------------


async def test_an_idle_connection_is_closed_after_keepalive(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    sidecar = await start(make_sidecar, upstream, keepalive="200ms")
    loop = asyncio.get_running_loop()
    assert (await get_json(http, f"{sidecar.url}/api/tags"))[0] == 200
    idle_from = loop.time()
    await asyncio.wait_for(upstream.connections[0].peer_closed.wait(), BOUND)
    assert loop.time() - idle_from >= 0.15
    assert sidecar.upstream._pool(upstream.url).idle_count == 0
    status, body = await get_json(http, f"{sidecar.url}/api/tags")
    assert (status, body["answer"]) == (200, 1)
    assert len(upstream.connections) == 2


async def test_keepalive_zero_closes_every_connection_after_its_answer(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    sidecar = await start(make_sidecar, upstream, keepalive=0)
    for number in range(3):
        status, body = await get_json(http, f"{sidecar.url}/api/tags")
        assert (status, body["answer"]) == (200, number)
        await asyncio.wait_for(upstream.connections[number].peer_closed.wait(), BOUND)
    assert len(upstream.connections) == 3


# --- 10. back-pressure on a stream ------------------------------------------------------


async def test_a_stream_nobody_reads_stops_being_read_and_then_arrives_whole(
    upstream: ScriptedUpstream,
) -> None:
    payload = random.Random(7).randbytes(16 * 1024 * 1024)
    piece_size = 64 * 1024
    upstream_blocked = asyncio.Event()
    all_written = asyncio.Event()
    written = [0]

    async def handler(request: UpstreamRequest) -> None:
        writer = request.connection.writer
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        request.connection.send(STREAM_HEAD)
        _, high = writer.transport.get_write_buffer_limits()
        for at in range(0, len(payload), piece_size):
            writer.write(chunk(payload[at : at + piece_size]))
            written[0] = at + piece_size
            if writer.transport.get_write_buffer_size() > high:
                upstream_blocked.set()  # the kernel's buffers are full: nobody reads
            await writer.drain()
            await asyncio.sleep(0)  # let the reader run between writes, as another process would
        writer.write(LAST_CHUNK)
        all_written.set()

    upstream.handler = handler
    loop = asyncio.get_running_loop()
    pool = Pool(Origin.parse(upstream.url), 4, 30.0, lambda kind: kind == NDJSON, loop)
    try:
        connection = await pool.acquire(BOUND)
        request = encode_request(
            "POST", "/api/chat", pool.origin.host_header, CIMultiDict(), frozenset(), None, b"{}"
        )
        async with asyncio.timeout(BOUND):
            connection = await connection.send(request, None, head_only=False)
            assert connection.streaming
            blocked, written_out = (
                asyncio.ensure_future(upstream_blocked.wait()),
                asyncio.ensure_future(all_written.wait()),
            )
            await asyncio.wait([blocked, written_out], return_when=asyncio.FIRST_COMPLETED)
            blocked.cancel()
            written_out.cancel()
        assert upstream_blocked.is_set(), "the whole stream went out: nothing held it back"
        bound = http1.HIGH_WATER + 512 * 1024  # one socket read past the mark at most
        assert connection._paused
        assert connection._buffered <= bound
        assert written[0] < len(payload)  # the upstream is held back: the rest waits
        assert not connection.complete
        received = bytearray()
        async with asyncio.timeout(BOUND):
            while True:
                assert connection._buffered <= bound
                data = connection.read_nowait()
                if data:
                    received += data
                elif connection.at_eof:
                    break
                else:
                    await connection.wait()
        assert received == payload
        assert connection.reusable
        pool.release(connection)
        assert pool.idle_count == 1
    finally:
        pool.close()


# --- 11. extra bytes after a complete answer --------------------------------------------


@pytest.mark.parametrize(
    ("extra", "separately"),
    [
        (b"EXTRA", False),
        (http_response(b'{"answer": "WRONG"}'), False),
        (http_response(b'{"answer": "WRONG"}'), True),
    ],
    ids=["junk", "a-second-answer", "a-second-answer-later"],
)
async def test_extra_bytes_after_an_answer_retire_the_connection(
    make_sidecar: SidecarFactory,
    upstream: ScriptedUpstream,
    http: aiohttp.ClientSession,
    extra: bytes,
    separately: bool,
) -> None:
    async def handler(request: UpstreamRequest) -> None:
        answer = http_response(orjson.dumps({"answer": request.number}))
        if request.number != 0:
            request.connection.send(answer)
        elif separately:
            request.connection.send(answer)
            await request.connection.drain()
            request.connection.send(extra)
        else:
            request.connection.send(answer + extra)
        await request.connection.until_peer_closes()

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    assert await get_json(http, f"{sidecar.url}/api/tags") == (200, {"answer": 0})
    await asyncio.wait_for(upstream.connections[0].peer_closed.wait(), BOUND)
    assert await get_json(http, f"{sidecar.url}/api/tags") == (200, {"answer": 1})
    assert len(upstream.connections) == 2
    assert [len(connection.requests) for connection in upstream.connections] == [1, 1]


# --- 12. a header a policy broke ------------------------------------------------------


class _HeaderOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    value: str


class SetUpstreamHeader:
    """A test policy: adds one header to the upstream request, whatever it holds."""

    config_model: ClassVar[type[BaseModel]] = _HeaderOptions

    def __init__(self, config: _HeaderOptions, context: PolicyContext) -> None:
        self.name = config.name
        self.value = config.value

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        exchange.upstream_headers[self.name] = self.value
        return await call_next(exchange)


@pytest.mark.parametrize(
    "name_value",
    [
        ("X-Tenant", "acme\r\nX-Injected: yes"),
        ("X-Tenant", "acme\nX-Injected: yes"),
        ("X-Bad\r\nX", "1"),
    ],
)
def test_encode_request_refuses_a_line_break_in_a_policy_header(
    name_value: tuple[str, str],
) -> None:
    extra = CIMultiDict([name_value])
    with pytest.raises(ValueError, match="line break"):
        encode_request("GET", "/api/tags", "h:1", CIMultiDict(), frozenset(), extra, None)


def test_encode_request_bytes() -> None:
    headers = CIMultiDict(
        [
            ("Host", "client"),
            ("X-App", "a"),
            ("Connection", "X-Hop"),
            ("X-Hop", "1"),
            ("X-Swap", "old"),
        ]
    )
    extra = CIMultiDict([("X-Swap", "new")])
    small = encode_request(
        "POST", "/p?q=1", "up:8", headers, frozenset({"host", "connection"}), extra, b"{}"
    )
    assert small == (
        b"POST /p?q=1 HTTP/1.1\r\nHost: up:8\r\nX-App: a\r\nX-Swap: new\r\n"
        b"Accept-Encoding: identity\r\nContent-Length: 2\r\n\r\n{}"
    )
    big = b"x" * (1024 * 1024)
    head = encode_request("POST", "/p", "up:8", CIMultiDict(), frozenset(), None, big)
    assert head.endswith(b"Content-Length: 1048576\r\n\r\n")  # the body is written after it


async def test_a_policy_header_with_a_line_break_is_refused_not_sent(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    policy = "tests.test_http1:SetUpstreamHeader"
    good = await make_sidecar(
        policies=[{policy: {"name": "X-Tenant", "value": "acme"}}], upstream_url=upstream.url
    )
    assert (await get_json(http, f"{good.url}/v1/models"))[0] == 200
    assert upstream.requests[0].headers["X-Tenant"] == "acme"
    bad = await make_sidecar(
        policies=[{policy: {"name": "X-Tenant", "value": "acme\r\nX-Injected: yes"}}],
        upstream_url=upstream.url,
    )
    async with http.get(f"{bad.url}/v1/models") as response:
        assert response.status == 500
        error = (await response.json())["error"]
        assert "line break" in error["message"]
        assert error["code"] == "invalid_upstream_header"
    assert len(upstream.requests) == 1
    assert len(upstream.connections) == 1


# --- 13. abandoned requests ------------------------------------------------------------


async def test_a_stream_abandoned_by_the_client_closes_its_upstream_connection(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    lines = ndjson_lines(50)

    async def handler(request: UpstreamRequest) -> None:
        if request.number == 0:
            request.connection.send(STREAM_HEAD + chunk(lines[0]) + chunk(lines[1]))
            await request.connection.until_peer_closes()  # the model would still be generating
            return
        request.connection.send(STREAM_HEAD + b"".join(map(chunk, lines)) + LAST_CHUNK)

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    async with asyncio.timeout(BOUND):
        response = await http.post(f"{sidecar.url}/api/chat", json=CHAT)
        assert response.status == 200
        assert await response.content.readline() == lines[0]
        response.close()  # the client goes away mid-stream
        await upstream.connections[0].peer_closed.wait()
    async with asyncio.timeout(BOUND), http.post(f"{sidecar.url}/api/chat", json=CHAT) as whole:
        assert await whole.read() == b"".join(lines)
    assert len(upstream.connections) == 2
    assert [len(connection.requests) for connection in upstream.connections] == [1, 1]


async def test_a_request_abandoned_before_its_answer_closes_its_upstream_connection(
    make_sidecar: SidecarFactory, upstream: ScriptedUpstream, http: aiohttp.ClientSession
) -> None:
    async def handler(request: UpstreamRequest) -> None:
        if request.number == 0:
            await request.connection.until_peer_closes()
            return
        await answer_json(request)

    upstream.handler = handler
    sidecar = await start(make_sidecar, upstream)
    _, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(b"GET /api/tags HTTP/1.1\r\nHost: s\r\n\r\n")
    await upstream.until(lambda: len(upstream.requests) == 1)
    writer.close()  # the client hangs up while the upstream is still thinking
    await asyncio.wait_for(upstream.connections[0].peer_closed.wait(), BOUND)
    assert await get_json(http, f"{sidecar.url}/api/tags") == (
        200,
        {"answer": 1, "target": "/api/tags"},
    )
    assert len(upstream.connections) == 2


# --- the pool on its own ------------------------------------------------------------------


async def test_pool_reuses_the_most_recent_idle_connection(upstream: ScriptedUpstream) -> None:
    loop = asyncio.get_running_loop()
    pool = Pool(Origin.parse(upstream.url), 4, 30.0, lambda kind: False, loop)
    request = encode_request(
        "GET", "/api/tags", pool.origin.host_header, {}, frozenset(), None, None
    )
    try:
        first, second = await pool.acquire(BOUND), await pool.acquire(BOUND)
        answered: list[Connection] = []
        for connection in (first, second):
            answered.append(await asyncio.wait_for(connection.send(request, None, False), BOUND))
        for connection in answered:
            pool.release(connection)
        assert pool.idle_count == 2
        again = await pool.acquire(BOUND)
        assert again is second and again.reused
        assert len(upstream.connections) == 2
        pool.release(await asyncio.wait_for(again.send(request, None, False), BOUND))
    finally:
        pool.close()
    await upstream.until(lambda: all(c.peer_closed.is_set() for c in upstream.connections))
