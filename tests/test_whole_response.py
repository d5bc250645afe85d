"""Answers the relay writes itself (WholeResponse, StreamedResponse) say what aiohttp's would.

The relay writes a plain answer's status line, headers and body itself; these
tests hold it to aiohttp's own framing: the same headers for every HTTP version
and Connection header, keep-alive kept or ended the same way, the fallbacks
for HEAD and bodiless statuses, and no header injection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import orjson
import pytest
from aiohttp import web
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.http_writer import StreamWriter
from multidict import CIMultiDict

from sidecar.app import Sidecar
from sidecar.chain import Next, PolicyContext
from sidecar.exchange import Exchange, Reply
from sidecar.relay import StreamedResponse, WholeResponse
from tests.conftest import SidecarFactory
from tests.fake_ollama import FakeOllama

CHAT = orjson.dumps(
    {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}], "stream": False}
)


async def exchange_raw(sidecar: Sidecar, request: bytes, *, closes: bool) -> bytes:
    """One request's raw answer; read to the end when the sidecar is to close the connection."""
    host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            if closes:
                return await reader.read(-1)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(headers_of(head)["content-length"])
            body = await reader.readexactly(length)
            # Still open: a second request on the same connection is answered.
            writer.write(request)
            again = await reader.readuntil(b"\r\n\r\n")
            assert again.startswith(head.split(b" ", 1)[0])
            return head + body
    finally:
        writer.close()


def headers_of(head: bytes) -> dict[str, str]:
    lines = head.decode().split("\r\n")[1:]
    return {
        name.lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines if line)
    }


def post(version: str, connection: str | None) -> bytes:
    extra = f"Connection: {connection}\r\n" if connection else ""
    return (
        f"POST /api/chat HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"{extra}Content-Length: {len(CHAT)}\r\n\r\n"
    ).encode() + CHAT


@pytest.mark.parametrize(
    ("version", "connection", "closes", "answer_connection"),
    [
        ("1.1", None, False, None),
        ("1.1", "close", True, "close"),
        ("1.0", None, True, None),
        ("1.0", "keep-alive", False, "keep-alive"),
    ],
)
async def test_keep_alive_and_framing_are_aiohttps(
    sidecar: Sidecar,
    version: str,
    connection: str | None,
    closes: bool,
    answer_connection: str | None,
) -> None:
    answer = await exchange_raw(sidecar, post(version, connection), closes=closes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/{version} 200 OK\r\n".encode())
    headers = headers_of(head + b"\r\n")
    assert int(headers["content-length"]) == len(body)
    assert orjson.loads(body)["done"] is True
    assert headers["content-type"].startswith("application/json")
    assert headers["server"].startswith("Python/") and "aiohttp/" in headers["server"]
    assert headers["date"].endswith(" GMT")
    assert headers.get("connection") == answer_connection
    assert "transfer-encoding" not in headers
    assert "x-request-id" in headers


class _Request:
    """What WholeResponse.prepare reads of a request, with a transport that keeps the bytes."""

    method = "POST"

    def __init__(self, version: HttpVersion, keep_alive: bool) -> None:
        self.version = version
        self.keep_alive = keep_alive
        self.transport = _Transport()


class _Writer:
    """aiohttp's payload writer's part in web.Response, keeping the bytes it would send."""

    def __init__(self) -> None:
        self.written = b""
        self.buffer_size = 0
        self.output_size = 0
        self.length: int | None = None

    def enable_chunking(self) -> None:
        raise AssertionError("a whole answer is never chunked")

    async def write_headers(self, status_line: str, headers: CIMultiDict[str]) -> None:
        self.written += (
            status_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        ).encode()

    def send_headers(self) -> None:
        pass

    async def write_eof(self, data: bytes = b"") -> None:
        self.written += data


@pytest.mark.parametrize("version", [HttpVersion11, HttpVersion10])
@pytest.mark.parametrize("keep_alive", [True, False])
@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        (200, {"Content-Type": "application/json; charset=utf-8"}, b'{"a":1}'),
        (404, {"Content-Type": "application/json", "X-Request-ID": "r1"}, b'{"error":"x"}'),
        (200, {}, b"raw bytes"),
        (200, {"Content-Length": "2", "Date": "Tue, 01 Jan 2030 00:00:00 GMT"}, b"{}"),
        (503, {"Retry-After": "1", "Connection": "close"}, b"busy"),
        (200, {"Content-Type": "text/plain"}, b""),
    ],
)
async def test_the_bytes_are_web_responses_bytes(
    monkeypatch: pytest.MonkeyPatch,
    version: HttpVersion,
    keep_alive: bool,
    status: int,
    headers: dict[str, str],
    body: bytes,
) -> None:
    monkeypatch.setattr("aiohttp.web_response.rfc822_formatted_time", lambda: "NOW")
    monkeypatch.setattr("sidecar.relay.rfc822_formatted_time", lambda: "NOW")
    ours = _Request(version, keep_alive)
    assert WholeResponse.fits("POST", status, CIMultiDict(headers))
    whole = WholeResponse(status, CIMultiDict(headers), body)
    await whole.prepare(ours)  # type: ignore[arg-type]
    await whole.write_eof()
    theirs = _Request(version, keep_alive)
    writer = _Writer()
    request: Any = theirs
    request._payload_writer = writer
    request._prepare_hook = _no_hook
    reference = web.Response(status=status, body=body, headers=CIMultiDict(headers))
    await reference.prepare(request)
    await reference.write_eof()
    assert _lines(ours.transport.written) == _lines(writer.written)
    assert whole.keep_alive == reference.keep_alive


async def _no_hook(response: web.StreamResponse) -> None:
    return None


def _lines(raw: bytes) -> tuple[bytes, set[bytes], bytes]:
    """Status line, the set of header lines (their order is free), body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *headers = head.split(b"\r\n")
    return status, set(headers), body


def test_bodiless_answers_and_head_go_through_aiohttp() -> None:
    plain = CIMultiDict({"Content-Type": "application/json"})
    assert not WholeResponse.fits("HEAD", 200, plain)
    assert not WholeResponse.fits("GET", 204, plain)
    assert not WholeResponse.fits("GET", 304, plain)
    assert not WholeResponse.fits("GET", 101, plain)
    assert not WholeResponse.fits("GET", 200, CIMultiDict({"Transfer-Encoding": "chunked"}))


@dataclasses.dataclass(frozen=True)
class _NoOptions:
    pass


class InjectsAHeader:
    """A (broken) policy that puts a line break into a response header."""

    config_model: ClassVar[type[Any]] = _NoOptions

    def __init__(self, config: Any, context: PolicyContext) -> None:
        pass

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        exchange.response_headers["X-Evil"] = "a\r\nSet-Cookie: stolen=1"
        return await call_next(exchange)


@pytest.fixture
async def injecting(make_sidecar: SidecarFactory, fake: FakeOllama) -> AsyncIterator[Sidecar]:
    yield await make_sidecar([{"tests.test_whole_response:InjectsAHeader": {}}])


async def test_a_line_break_in_a_header_never_reaches_the_client(injecting: Sidecar) -> None:
    answer = await exchange_raw(injecting, post("1.1", "close"), closes=True)
    assert b"stolen" not in answer
    assert answer == b"" or answer.startswith(b"HTTP/1.1 500")


class _Transport:
    """A transport that keeps what is written (for aiohttp's real StreamWriter too)."""

    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, pieces: list[bytes]) -> None:
        self.written += b"".join(pieces)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class _Protocol:
    _paused = False

    def __init__(self, transport: _Transport) -> None:
        self.transport = transport


class _StreamRequest:
    method = "POST"

    def __init__(self, version: HttpVersion, keep_alive: bool) -> None:
        self.version = version
        self.keep_alive = keep_alive
        self.transport = _Transport()
        self._payload_writer = StreamWriter(_Protocol(self.transport), asyncio.get_running_loop())  # type: ignore[arg-type]

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        return None


@pytest.mark.parametrize("version", [HttpVersion11, HttpVersion10])
@pytest.mark.parametrize("keep_alive", [True, False])
@pytest.mark.parametrize("chunks", [[b"data: 1\n\n", b"data: [DONE]\n\n"], [b'{"a":1}\n'], []])
async def test_a_stream_is_framed_as_aiohttps_stream_response(
    monkeypatch: pytest.MonkeyPatch, version: HttpVersion, keep_alive: bool, chunks: list[bytes]
) -> None:
    monkeypatch.setattr("aiohttp.web_response.rfc822_formatted_time", lambda: "NOW")
    monkeypatch.setattr("sidecar.relay.rfc822_formatted_time", lambda: "NOW")
    headers = {"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
    ours: Any = _StreamRequest(version, keep_alive)
    streamed = StreamedResponse(200, CIMultiDict(headers))
    await streamed.prepare(ours)
    for chunk in chunks:
        await streamed.write(chunk)
    await streamed.write_eof()
    theirs: Any = _StreamRequest(version, keep_alive)
    reference = web.StreamResponse(status=200, headers=CIMultiDict(headers))
    if version >= HttpVersion11:
        reference.enable_chunked_encoding()
    await reference.prepare(theirs)
    for chunk in chunks:
        await reference.write(chunk)
    await reference.write_eof()
    assert _lines(ours.transport.written) == _lines(theirs.transport.written)
    assert streamed.chunked == reference.chunked
    if version >= HttpVersion11:
        assert streamed.keep_alive == reference.keep_alive
    else:
        # No length and no chunking: the body ends with the connection, so it must
        # close (aiohttp's StreamResponse leaves keep_alive set for an HTTP/1.0 client
        # that asked for it, which would then wait for an end that never comes).
        assert streamed.keep_alive is False


async def test_an_http_1_0_keep_alive_client_gets_a_stream_that_ends_with_the_connection(
    sidecar: Sidecar,
) -> None:
    stream = orjson.dumps({**orjson.loads(CHAT), "stream": True})
    request = (
        b"POST /api/chat HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(stream)
    ) + stream
    answer = await exchange_raw(sidecar, request, closes=True)  # read(-1): ends at the close
    head, _, body = answer.partition(b"\r\n\r\n")
    headers = headers_of(head + b"\r\n")
    assert "content-length" not in headers and "transfer-encoding" not in headers
    assert headers.get("connection") is None
    assert orjson.loads(body.splitlines()[-1])["done"] is True


async def test_a_plain_answer_is_on_the_clients_socket_before_the_bookkeeping(
    sidecar: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request's metrics and access line run after the answer was written, so a
    client (and its next request on the connection) does not wait for them."""
    host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
    client = socket.socket()
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, (host, int(port)))
    seen_by_bookkeeping: list[bytes] = []
    account = Sidecar._account

    def peeking_account(self: Sidecar, *args: Any) -> None:
        # What the client's socket holds already, without taking it.
        try:
            seen_by_bookkeeping.append(client.recv(1 << 16, socket.MSG_PEEK))
        except BlockingIOError:
            seen_by_bookkeeping.append(b"")
        account(self, *args)

    monkeypatch.setattr(Sidecar, "_account", peeking_account)
    try:
        await loop.sock_sendall(client, post("1.1", "close"))
        answer = b""
        async with asyncio.timeout(10):
            while more := await loop.sock_recv(client, 1 << 16):
                answer += more
    finally:
        client.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert seen_by_bookkeeping == [answer]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_draining_sidecar_says_connection_close_in_the_answer(
    sidecar: Sidecar, stream: bool
) -> None:
    """Once draining, an answer tells the client the connection ends with it (it then
    does), rather than closing a connection the client was told it could reuse."""
    sidecar.draining = True
    body = orjson.dumps({**orjson.loads(CHAT), "stream": stream})
    request = (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    answer = await exchange_raw(sidecar, request, closes=True)  # read to the close
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert headers_of(head + b"\r\n")["connection"] == "close"
    if stream:
        assert rest.endswith(b"0\r\n\r\n")
    else:
        assert orjson.loads(rest)["done"] is True
