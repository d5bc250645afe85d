"""Shared fixtures: a fake Ollama and sidecars pointed at it, all on 127.0.0.1 and free ports."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
import uvloop

from sidecar import observability
from sidecar.app import Sidecar
from sidecar.config import Settings, parse_settings
from tests.fake_ollama import FakeOllama
from tests.redis_server import RedisServer, RedisServerMissing

SidecarFactory = Callable[..., Awaitable[Sidecar]]
JsonLogs = Callable[[], list[dict[str, Any]]]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on uvloop, as `ollama-sidecar serve` does, so loop differences show here."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as server:
        yield server


def settings_for(upstream_url: str, policies: list[Any] | None = None, **sections: Any) -> Settings:
    """Settings for a test sidecar on a free port; `sections` merge into the YAML mapping."""
    raw: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "policies": [{"correlation": {}}] if policies is None else policies,
        "logging": {"access_log": True},
    }
    upstream = {"url": upstream_url, **sections.pop("upstream", {})}
    raw["upstream"] = upstream
    raw.update(sections)
    return parse_settings(raw)


@pytest.fixture
async def make_sidecar(fake: FakeOllama) -> AsyncIterator[SidecarFactory]:
    started: list[Sidecar] = []

    async def make(
        policies: list[Any] | None = None, upstream_url: str | None = None, **sections: Any
    ) -> Sidecar:
        sidecar = Sidecar(settings_for(upstream_url or fake.url, policies, **sections))
        await sidecar.start()
        started.append(sidecar)
        return sidecar

    yield make
    for sidecar in started:
        await sidecar.stop(grace=0)


@pytest.fixture
async def sidecar(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def raw_http(port: int, request: bytes, read_timeout: float = 5.0) -> tuple[int, bytes]:
    """Send exact bytes (paths no client library would leave alone); return status and raw answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(read_timeout):
            answer = await reader.read(65536)
            head = answer.split(b"\r\n", 1)[0]
            while b"\r\n\r\n" not in answer:
                more = await reader.read(65536)
                if not more:
                    break
                answer += more
    finally:
        writer.close()
    status = int(head.split(b" ")[1]) if head.startswith(b"HTTP/") else 0
    return status, answer


@pytest.fixture
def json_logs() -> Iterator[JsonLogs]:
    """The sidecar's real log output (JSON lines), captured instead of written to stdout."""
    stream = io.BytesIO()
    observability.configure_logging("info", stream=stream)

    def lines() -> list[dict[str, Any]]:
        observability.flush_logs()
        return [orjson.loads(line) for line in stream.getvalue().splitlines()]

    yield lines
    observability.reset_logging()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; FAILS (never skips) when the binary is missing."""
    try:
        server = RedisServer()
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    with server:
        yield server
