"""routing: aliases, model fallbacks, several upstreams with priority failover and weights."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from sidecar.config import ConfigError, parse_settings
from tests.conftest import SidecarFactory
from tests.fake_ollama import FakeOllama, Fault

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def second() -> AsyncIterator[FakeOllama]:
    async with FakeOllama(models=("llama3.2:latest", "qwen3:latest")) as server:
        yield server


def generations(fake: FakeOllama) -> list[str]:
    return [r.json["model"] for r in fake.requests if r.json and "model" in r.json]


async def test_an_alias_answers_as_the_model_it_names(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(
        policies=[{"routing": {"aliases": {"gpt-4o-mini": "llama3.2:latest"}}}]
    )
    for path, extra in (("/v1/chat/completions", {}), ("/api/chat", {"stream": False})):
        body = {**CHAT, **extra, "model": "gpt-4o-mini"}
        async with http.post(f"{sidecar.url}{path}", json=body) as response:
            assert response.status == 200
            assert response.headers["x-sidecar-model"] == "llama3.2:latest"
            document = await response.json()
        # The body's model is what the upstream said.
        assert document["model"] == "llama3.2:latest"
        assert fake.requests[-1].json["model"] == "llama3.2:latest"


async def test_unaliased_bodies_pass_byte_for_byte(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(
        policies=[{"routing": {"aliases": {"gpt-4o-mini": "llama3.2:latest"}}}]
    )
    body = b'{ "model" : "llama3.2:latest", "messages": [] }'
    async with http.post(f"{sidecar.url}/v1/chat/completions", data=body):
        pass
    assert fake.requests[-1].body == body


async def test_aliases_are_listed_and_retrievable_as_models(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(
        policies=[
            {"routing": {"aliases": {"gpt-4o-mini": "llama3.2:latest", "ghost": "absent:latest"}}}
        ]
    )
    async with http.get(f"{sidecar.url}/v1/models") as response:
        ids = [model["id"] for model in (await response.json())["data"]]
    assert "gpt-4o-mini" in ids and "llama3.2:latest" in ids
    assert "ghost" not in ids  # an alias of a model Ollama lacks is not advertised
    async with http.get(f"{sidecar.url}/v1/models/gpt-4o-mini") as response:
        assert response.status == 200
        assert (await response.json())["id"] == "gpt-4o-mini"


async def test_a_missing_model_falls_back_to_the_next(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(
        policies=[{"routing": {"fallbacks": {"llama3.1:70b": ["qwen3:latest", "llama3.2:latest"]}}}]
    )
    body = {**CHAT, "model": "llama3.1:70b", "stream": True}
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["x-sidecar-model"] == "llama3.2:latest"
        assert (await response.read()).rstrip().endswith(b"data: [DONE]")
    assert generations(fake) == ["llama3.1:70b", "qwen3:latest", "llama3.2:latest"]


async def test_a_failing_model_falls_back_on_5xx_and_the_last_answer_stands(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(
        policies=[{"routing": {"fallbacks": {"llama3.2:latest": ["smollm2:latest"]}}}]
    )
    fake.inject(Fault("busy"))
    async with http.post(
        f"{sidecar.url}/api/chat", json={**CHAT, "model": "llama3.2:latest"}
    ) as response:
        assert response.status == 200
        assert response.headers["x-sidecar-model"] == "smollm2:latest"
    fake.inject(Fault("busy"))
    fake.inject(Fault("status", status=500, message="also down"))
    async with http.post(
        f"{sidecar.url}/api/chat", json={**CHAT, "model": "llama3.2:latest"}
    ) as response:
        assert response.status == 500
        assert (await response.json())["error"] == "also down"


async def test_client_errors_do_not_fall_back(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(
        policies=[{"routing": {"fallbacks": {"llama3.2:latest": ["smollm2:latest"]}}}]
    )
    fake.inject(Fault("status", status=400, message="bad options"))
    async with http.post(
        f"{sidecar.url}/v1/chat/completions", json={**CHAT, "model": "llama3.2:latest"}
    ) as response:
        assert response.status == 400
    assert generations(fake) == ["llama3.2:latest"]


async def test_upstreams_fail_over_by_priority(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    second: FakeOllama,
    http: aiohttp.ClientSession,
    unused_tcp_port: int,
) -> None:
    upstreams = [
        {"name": "local", "url": f"http://127.0.0.1:{unused_tcp_port}", "priority": 0},
        {"name": "shared", "url": second.url, "priority": 1},
        {"name": "last", "url": fake.url, "priority": 2},
    ]
    sidecar = await make_sidecar(policies=[{"routing": {"upstreams": upstreams}}])
    body = {**CHAT, "model": "llama3.2:latest", "stream": True}
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        await response.read()
    assert len(second.requests) == 1 and not fake.requests
    # A stream that breaks before its first chunk moves on too.
    second.inject(Fault("reset_after", after_chunks=0))
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=body) as response:
        raw = await response.read()
    assert raw.rstrip().endswith(b"data: [DONE]")
    assert len(fake.requests) == 1
    async with http.get(f"{sidecar.url}/readyz") as response:
        detail = await response.json()
    assert [up["name"] for up in detail["policies"]["routing"]["upstreams"]] == [
        "local",
        "shared",
        "last",
    ]


async def test_a_stream_broken_after_its_first_chunk_is_not_moved(
    make_sidecar: SidecarFactory, fake: FakeOllama, second: FakeOllama, http: aiohttp.ClientSession
) -> None:
    upstreams = [
        {"name": "a", "url": fake.url, "priority": 0},
        {"name": "b", "url": second.url, "priority": 1},
    ]
    sidecar = await make_sidecar(policies=[{"routing": {"upstreams": upstreams}}])
    fake.inject(Fault("reset_after", after_chunks=2))
    body = {**CHAT, "model": "llama3.2:latest"}
    async with http.post(f"{sidecar.url}/api/chat", json=body) as response:
        lines = (await response.read()).splitlines()
    assert "error" in orjson.loads(lines[-1])
    assert not second.requests


async def test_equal_priorities_share_by_weight(
    make_sidecar: SidecarFactory, fake: FakeOllama, second: FakeOllama, http: aiohttp.ClientSession
) -> None:
    upstreams = [
        {"name": "big", "url": fake.url, "weight": 3},
        {"name": "small", "url": second.url, "weight": 1},
    ]
    sidecar = await make_sidecar(policies=[{"routing": {"upstreams": upstreams}}])
    for _ in range(400):
        async with http.get(f"{sidecar.url}/api/version") as response:
            assert response.status == 200
    share = len(fake.requests) / 400
    assert 0.65 < share < 0.85, share


def test_config_rejects_loops_duplicates_and_self_fallbacks() -> None:
    bad = [
        ({"aliases": {"a": "b", "b": "a"}}, "aliases loop"),
        (
            {"upstreams": [{"name": "x", "url": "http://a"}, {"name": "x", "url": "http://b"}]},
            "unique",
        ),
        ({"fallbacks": {"m": ["m"]}}, "the model itself"),
        ({"upstreams": [{"name": "x", "url": "ftp://a"}]}, "http"),
        ({"upstreams": [{"name": "x", "url": "http://a", "weight": 0}]}, "greater than 0"),
    ]
    for options, message in bad:
        with pytest.raises(ConfigError, match=message):
            parse_settings({"policies": [{"routing": options}]})


async def test_when_every_candidate_breaks_before_its_first_chunk_the_client_gets_a_502() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    from policies.routing import Routing, RoutingConfig
    from sidecar.chain import PolicyContext
    from sidecar.errors import StreamInterrupted, UpstreamError
    from sidecar.exchange import Exchange, Reply
    from sidecar.knobs import validate
    from sidecar.observability import Metrics
    from sidecar.routes import ROUTES

    config = validate(RoutingConfig, {"fallbacks": {"llama3.2:latest": ["smollm2:latest"]}})
    routing = Routing(config, PolicyContext(settings=parse_settings({}), metrics=Metrics()))
    exchange = Exchange(
        "POST",
        ROUTES["/api/chat"],
        "/api/chat",
        "",
        CIMultiDictProxy(CIMultiDict()),
        b'{"model":"llama3.2:latest","messages":[]}',
    )

    async def broken(_: Exchange) -> Reply:
        raise StreamInterrupted("gone before the first chunk")

    with pytest.raises(UpstreamError) as caught:
        await routing(exchange, broken)
    assert caught.value.status == 502
