"""Hostile or confused clients: every bad request gets a clear 4xx, never a 5xx or a hang."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from sidecar.app import Sidecar
from tests.conftest import SidecarFactory, raw_http
from tests.fake_ollama import FakeOllama

CHAT_PATH = "/v1/chat/completions"


async def still_serves(sidecar: Sidecar, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{sidecar.url}/api/version") as response:
        assert response.status == 200


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"model": "x",}', "not valid JSON"),
        (b"[1, 2]", "not an array"),
        (b'"text"', "not a string"),
        (b"null", "not null"),
        (b"42", "not a number"),
        (b"", "empty"),
        (b"   \n", "empty"),
        (b'{"model": "\xff\xfe"}', "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "JSON"),  # a depth limit or "not an array"
        (b'{"n": NaN}', "not valid JSON"),
    ],
    ids=lambda value: repr(value)[:24],
)
async def test_bad_json_is_400_in_openai_shape(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession, body: bytes, fragment: str
) -> None:
    before = len(fake.requests)
    async with http.post(f"{sidecar.url}{CHAT_PATH}", data=body) as response:
        assert response.status == 400
        error = (await response.json())["error"]
        assert response.headers["X-Request-ID"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_json"
    assert fragment.removeprefix("not ") in error["message"]
    assert len(fake.requests) == before, "a bad body must not reach Ollama"
    await still_serves(sidecar, http)


async def test_bad_json_on_native_routes_is_400_in_native_shape(
    sidecar: Sidecar, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{sidecar.url}/api/chat", data=b"{oops") as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert isinstance(error, str)
    assert "not valid JSON" in error


async def test_body_over_the_limit_is_413_before_it_is_read(
    make_sidecar: SidecarFactory, fake: FakeOllama
) -> None:
    sidecar = await make_sidecar(limits={"max_body": "1KiB"})
    request = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {50 * 1024**2}\r\n\r\n"
    ).encode() + b"{" * 100
    status, answer = await raw_http(sidecar.port, request)
    assert status == 413
    assert b'"code":"body_too_large"' in answer
    assert b"Connection: close" in answer
    assert not fake.requests


async def test_chunked_body_over_the_limit_is_413(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(limits={"max_body": "1KiB"})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b'{"pad": "' + b"x" * 500 + b'"}'

    async with http.post(f"{sidecar.url}{CHAT_PATH}", data=chunks()) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "body_too_large"


async def test_body_at_the_limit_passes(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(limits={"max_body": "1KiB"})
    padding = "x" * (1024 - len('{"model":"llama3.2:latest","messages":[],"pad":""}'))
    body = f'{{"model":"llama3.2:latest","messages":[],"pad":"{padding}"}}'.encode()
    assert len(body) == 1024
    async with http.post(f"{sidecar.url}{CHAT_PATH}", data=body) as response:
        assert response.status < 500


async def test_wrong_method_is_405_with_allow(
    sidecar: Sidecar, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{sidecar.url}{CHAT_PATH}") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert (await response.json())["error"]["code"] == "method_not_allowed"
    async with http.delete(f"{sidecar.url}/api/tags") as response:
        assert response.status == 405
        assert isinstance((await response.json())["error"], str)


async def test_unknown_route_is_404_in_openai_shape(
    sidecar: Sidecar, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{sidecar.url}/v1/fine_tuning/jobs", json={}) as response:
        assert response.status == 404
        error = (await response.json())["error"]
    assert error["code"] == "unknown_route"
    assert error["type"] == "not_found_error"


@pytest.mark.parametrize(
    "target",
    [
        "//api/pull",
        "/api//pull",
        "/api/%2Fpull",
        "/api%2Fpull",
        "/API/Pull",
        "/api/pull.",
        "/api/pull/",
        "/api/./pull",
        "/v1/../api/pull",
        "/x/../../api/pull",
        "/api/%70%75%6c%6c",
        "/api/delete",
        "/api/blobs/sha256:0000",
    ],
)
async def test_no_spelling_reaches_a_management_route(
    sidecar: Sidecar, fake: FakeOllama, target: str
) -> None:
    method = "DELETE" if "delete" in target else "POST"
    request = (
        f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        'Content-Length: 15\r\nConnection: close\r\n\r\n{"model": "x"}'
    ).encode()
    status, answer = await raw_http(sidecar.port, request)
    assert status == 403, answer
    assert b"management.allow" in answer
    assert not [r for r in fake.requests if not r.path.startswith(("/api/version", "/api/tags"))]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /api/version HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET /api/version HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(300))
        + b"\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        b"GET /api/version HTTP/1.1\r\nHost: x\r\nBad Header Name: v\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /api/ver\x00sion HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/models%2F..%2F..%2Fapi%2Fpull HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /api/%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=lambda value: repr(value)[:32],
)
async def test_protocol_junk_never_gets_a_5xx(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession, request_bytes: bytes
) -> None:
    status, _ = await raw_http(sidecar.port, request_bytes)
    assert 400 <= status < 500
    await still_serves(sidecar, http)


async def test_non_ascii_header_values_do_not_break_the_relay(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    request = (
        "GET /api/version HTTP/1.1\r\nHost: x\r\nX-Name: caf\u00e9 \u2603\r\nConnection: close\r\n\r\n"
    ).encode()
    status, _ = await raw_http(sidecar.port, request)
    assert status == 200


async def test_odd_but_valid_bodies_reach_ollama_and_its_answer_comes_back(
    sidecar: Sidecar, http: aiohttp.ClientSession
) -> None:
    deep = b'{"model":"llama3.2:latest","x":' + b'{"n":' * 3000 + b"1" + b"}" * 3001
    bodies = [
        b'{"model": 42, "messages": []}',
        b'{"messages": []}',
        b'{"model": "", "prompt": "x"}',
        deep,
    ]
    for body in bodies:
        async with http.post(f"{sidecar.url}{CHAT_PATH}", data=body) as response:
            assert 400 <= response.status < 500
            assert "error" in await response.json()


async def test_a_stalled_body_is_408_and_frees_the_handler(
    make_sidecar: SidecarFactory, fake: FakeOllama
) -> None:
    sidecar = await make_sidecar(limits={"body_timeout": "100ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    try:
        writer.write(
            f"POST {CHAT_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"model": "llama3.2:latest"'
        )
        await writer.drain()
        async with asyncio.timeout(5):
            answer = await reader.read(65536)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"code":"request_timeout"' in answer
    assert not fake.requests


async def test_an_http_1_0_client_gets_its_stream_until_close(sidecar: Sidecar) -> None:
    body = b'{"model":"llama3.2:latest","messages":[{"role":"user","content":"hi"}]}'
    request = (
        b"POST /api/chat HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            answer = await reader.read()  # HTTP/1.0: the body ends when the connection does
    finally:
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower()
    assert b'"done":true' in payload.splitlines()[-1]


async def test_pipelined_requests_are_answered_in_order(sidecar: Sidecar) -> None:
    one = b"GET /api/version HTTP/1.1\r\nHost: x\r\nX-Request-ID: first\r\n\r\n"
    two = b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Request-ID: second\r\nConnection: close\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    try:
        writer.write(one + two)
        async with asyncio.timeout(5):
            answer = await reader.read()
    finally:
        writer.close()
    assert answer.count(b"HTTP/1.1 200") == 2
    assert answer.index(b"X-Request-ID: first") < answer.index(b"X-Request-ID: second")
    assert b'"models"' in answer.split(b"X-Request-ID: second", 1)[1]
