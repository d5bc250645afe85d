"""The cache policy: byte-identical replay, single-flight, what is never cached, purge.

Every test runs on the memory backend and on a real Redis started by the tests.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import BaseModel, ConfigDict

import policies.cache  # registers "cache"
from sidecar import chain
from sidecar.app import Sidecar
from sidecar.chain import Next, PolicyContext
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import validate
from sidecar.observability import Metrics
from sidecar.routes import find_route
from tests.conftest import SidecarFactory, settings_for
from tests.fake_ollama import FakeOllama, Fault

CHAT = {
    "model": "llama3.2",
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0,
}
NATIVE_CHAT = {
    "model": "llama3.2",
    "messages": [{"role": "user", "content": "hi"}],
    "options": {"seed": 7},
}
EMBED = {"model": "nomic-embed-text", "input": ["a", "b"]}


@pytest.fixture(autouse=True, scope="module")
def _unregister_after() -> Iterator[None]:
    """Until policies/__init__.py imports `cache`, leave the registry as other tests expect it."""
    yield
    import policies as builtins
    from sidecar import chain

    if "cache" not in builtins.__all__:
        chain._BUILTINS.pop("cache", None)


@pytest.fixture(params=["memory", "redis"])
def stores(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {}
    server = request.getfixturevalue("redis_server")
    return {"stores": {"redis_url": server.url, "prefix": f"t-{uuid.uuid4().hex[:10]}:"}}


async def cached_sidecar(
    make_sidecar: SidecarFactory, stores: dict[str, Any], **options: Any
) -> Sidecar:
    return await make_sidecar(policies=[{"cache": options}], **stores)


async def call(
    http: aiohttp.ClientSession,
    sidecar: Sidecar,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, str | None, bytes]:
    async with http.post(f"{sidecar.url}{path}", json=body, headers=headers) as response:
        data = await response.read()
        return response.status, response.headers.get("x-sidecar-cache"), data


def generations(fake: FakeOllama) -> int:
    return sum(1 for r in fake.requests if r.method == "POST")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/chat/completions", {**CHAT, "stream": True}),
        ("/v1/completions", {"model": "llama3.2", "prompt": "hi", "seed": 1, "stream": True}),
        ("/api/chat", NATIVE_CHAT),
        ("/api/chat", {**NATIVE_CHAT, "stream": False}),
        ("/api/generate", {"model": "llama3.2", "prompt": "hi", "options": {"temperature": 0}}),
        ("/v1/embeddings", EMBED),
        ("/api/embed", EMBED),
    ],
)
async def test_second_answer_is_byte_identical(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
    path: str,
    body: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores)
    status1, cache1, first = await call(http, sidecar, path, body)
    status2, cache2, second = await call(http, sidecar, path, body)
    assert (status1, cache1) == (200, "miss")
    assert (status2, cache2) == (200, "hit")
    assert second == first
    assert generations(fake) == 1


async def test_stream_replay_is_chunked_event_by_event(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores)
    body = {**CHAT, "stream": True}
    await call(http, sidecar, "/v1/chat/completions", body)
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=body) as response:
        assert response.headers["x-sidecar-cache"] == "hit"
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert "Content-Length" not in response.headers
        events = [line async for line in response.content if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]\n"
    assert len(events) >= len(fake.chunks) + 1


async def test_fields_that_do_not_change_the_answer_share_an_entry(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores)
    await call(http, sidecar, "/v1/chat/completions", CHAT)
    reordered = {"temperature": 0.0, "messages": CHAT["messages"], "model": "llama3.2"}
    _, cache, _ = await call(http, sidecar, "/v1/chat/completions", {**reordered, "user": "bob"})
    assert cache == "hit"
    # An explicit top_p of 1.0 is Ollama's default: the same request.
    _, cache, _ = await call(http, sidecar, "/v1/chat/completions", {**CHAT, "top_p": 1.0})
    assert cache == "hit"
    _, cache, _ = await call(http, sidecar, "/v1/chat/completions", {**CHAT, "top_p": 0.5})
    assert cache == "miss"
    assert generations(fake) == 2


async def test_tenant_scope_keeps_tenants_apart(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    keys = {
        "keys": [
            {"key": "sk-tenant-a-0123456789", "tenant": "a"},
            {"key": "sk-tenant-b-0123456789", "tenant": "b"},
        ]
    }
    sidecar = await make_sidecar(policies=[{"auth": keys}, {"cache": {}}])
    for key, expected in (
        ("sk-tenant-a-0123456789", "miss"),
        ("sk-tenant-a-0123456789", "hit"),
        ("sk-tenant-b-0123456789", "miss"),
    ):
        headers = {"Authorization": f"Bearer {key}"}
        _, cache, _ = await call(http, sidecar, "/v1/chat/completions", CHAT, headers)
        assert cache == expected
    assert generations(fake) == 2


async def test_fifty_identical_streams_cost_one_generation(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores)
    gate = asyncio.Event()

    async def hold(index: int) -> None:
        await gate.wait()

    fake.between_chunks = hold
    body = {**CHAT, "stream": True}
    clients = [
        asyncio.create_task(call(http, sidecar, "/v1/chat/completions", body)) for _ in range(50)
    ]
    # Every client is in (joined the one flight) before the first content chunk exists.
    for _ in range(200):
        if sum(1 for t in clients if not t.done()) == 50 and len(fake.requests) == 1:
            metrics = await (await http.get(f"{sidecar.url}/metrics")).text()
            if "cache_coalesced_total" in metrics and 'route="/v1/chat/completions"} 49.0' in (
                metrics
            ):
                break
        await asyncio.sleep(0.01)
    gate.set()
    answers = await asyncio.gather(*clients)
    assert generations(fake) == 1
    bodies = {data for _, _, data in answers}
    assert len(bodies) == 1
    assert next(iter(bodies)).endswith(b"data: [DONE]\n\n")
    results = sorted(cache or "" for _, cache, _ in answers)
    assert results == ["coalesced"] * 49 + ["miss"]
    print("\ncoalescing: 50 concurrent identical streams -> 1 upstream request")
    _, cache, replay = await call(http, sidecar, "/v1/chat/completions", body)
    assert (cache, replay) == ("hit", next(iter(bodies)))


async def test_followers_get_the_leaders_error(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores)
    gate = asyncio.Event()

    async def hold(index: int) -> None:
        await gate.wait()

    fake.between_chunks = hold
    fake.inject(Fault("reset_after", after_chunks=2))
    body = {**CHAT, "stream": True}
    clients = [
        asyncio.create_task(call(http, sidecar, "/v1/chat/completions", body)) for _ in range(5)
    ]
    for _ in range(300):  # until the 4 followers have joined the one flight
        if await coalesced_count(http, sidecar) == 4.0:
            break
        await asyncio.sleep(0.01)
    gate.set()
    answers = await asyncio.gather(*clients)
    assert generations(fake) == 1
    assert len({data for _, _, data in answers}) == 1
    assert b'"error"' in answers[0][2]
    assert b"[DONE]" not in answers[0][2]
    # Not stored: the next one goes upstream and succeeds.
    fake.between_chunks = None
    _, cache, whole = await call(http, sidecar, "/v1/chat/completions", body)
    assert cache == "miss"
    assert whole.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize("kind", ["end_without_done", "reset_after"])
@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/chat/completions", {**CHAT, "stream": True}), ("/api/chat", NATIVE_CHAT)],
)
async def test_truncated_streams_are_never_cached(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
    kind: str,
    path: str,
    body: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores)
    fake.inject(Fault(kind, after_chunks=2))  # type: ignore[arg-type]
    _, cache, broken = await call(http, sidecar, path, body)
    assert cache == "miss"
    assert b"error" in broken
    _, cache, whole = await call(http, sidecar, path, body)
    assert cache == "miss"
    assert b"error" not in whole
    _, cache, again = await call(http, sidecar, path, body)
    assert (cache, again) == ("hit", whole)
    assert generations(fake) == 2


async def test_errors_are_never_cached(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores)
    fake.inject(Fault("status", status=500, message="boom"))
    status, cache, _ = await call(http, sidecar, "/v1/chat/completions", CHAT)
    assert (status, cache) == (500, "miss")
    status, cache, _ = await call(http, sidecar, "/v1/chat/completions", CHAT)
    assert (status, cache) == (200, "miss")
    unknown = {**CHAT, "model": "nope"}
    for _ in range(2):
        status, cache, _ = await call(http, sidecar, "/v1/chat/completions", unknown)
        assert (status, cache) == (404, "miss")


async def test_nondeterministic_requests_are_not_cached_by_default(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores)
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        _, cache, _ = await call(http, sidecar, "/v1/chat/completions", body)
        assert cache == "bypass"
    for _ in range(2):
        _, cache, _ = await call(http, sidecar, "/api/chat", {**body, "stream": False})
        assert cache == "bypass"
    # Neither a temperature above 0 (any JSON number) nor a boolean makes it deterministic.
    for temperature in (0.2, 1, True):
        warm = {**body, "temperature": temperature}
        _, cache, _ = await call(http, sidecar, "/v1/chat/completions", warm)
        assert cache == "bypass"
    assert generations(fake) == 7
    for route, count in (("/v1/chat/completions", 5.0), ("/api/chat", 2.0)):
        bypassed = sidecar.metrics.registry.get_sample_value(
            "ollama_sidecar_cache_bypass_total", {"route": route}
        )
        assert bypassed == count


async def test_cache_nondeterministic_option(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores, cache_nondeterministic=True)
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    caches = [(await call(http, sidecar, "/v1/chat/completions", body))[1] for _ in range(2)]
    assert caches == ["miss", "hit"]


async def test_no_store_and_no_cache(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores)
    no_store = {"Cache-Control": "no-store"}
    _, cache, _ = await call(http, sidecar, "/v1/chat/completions", CHAT, no_store)
    assert cache == "bypass"
    _, cache, first = await call(http, sidecar, "/v1/chat/completions", CHAT)
    assert cache == "miss"  # no-store stored nothing
    _, cache, fresh = await call(
        http, sidecar, "/v1/chat/completions", CHAT, {"Cache-Control": "no-cache"}
    )
    assert cache == "miss"  # looked nothing up, went upstream
    assert fresh != first  # the fake numbers its answers: a new one
    _, cache, again = await call(http, sidecar, "/v1/chat/completions", CHAT)
    assert (cache, again) == ("hit", fresh)  # ...and stored it
    assert generations(fake) == 3


async def test_purge_all_and_by_model(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores)
    await call(http, sidecar, "/v1/chat/completions", CHAT)
    await call(http, sidecar, "/v1/embeddings", EMBED)
    async with http.delete(f"{sidecar.url}/sidecar/cache?model=llama3.2") as response:
        assert response.status == 200
        assert (await response.json())["purged"] == {"cache": 1}
    assert (await call(http, sidecar, "/v1/chat/completions", CHAT))[1] == "miss"
    assert (await call(http, sidecar, "/v1/embeddings", EMBED))[1] == "hit"
    async with http.delete(f"{sidecar.url}/sidecar/cache") as response:
        assert (await response.json())["purged"] == {"cache": 2}
    assert (await call(http, sidecar, "/v1/embeddings", EMBED))[1] == "miss"


async def test_entries_over_max_entry_bytes_are_not_stored(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores, max_entry_bytes=64)
    caches = [(await call(http, sidecar, "/v1/chat/completions", CHAT))[1] for _ in range(2)]
    assert caches == ["miss", "miss"]


async def test_memory_max_bytes_evicts_the_oldest(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(policies=[{"cache": {"max_bytes": 2500}}])
    first = {**CHAT, "seed": 1}
    await call(http, sidecar, "/v1/chat/completions", first)
    for seed in range(2, 6):
        await call(http, sidecar, "/v1/chat/completions", {**CHAT, "seed": seed})
    assert (await call(http, sidecar, "/v1/chat/completions", first))[1] == "miss"
    metrics = await (await http.get(f"{sidecar.url}/metrics")).text()
    assert "ollama_sidecar_cache_evictions_total" in metrics
    evictions = [
        line for line in metrics.splitlines() if line.startswith("ollama_sidecar_cache_evictions")
    ]
    assert float(evictions[0].split()[-1]) >= 1
    gauge = [line for line in metrics.splitlines() if line.startswith("ollama_sidecar_cache_bytes")]
    assert 0 < float(gauge[0].split()[-1]) <= 2500


async def test_redis_down_is_a_miss_that_still_answers(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    from tests.redis_server import free_port

    stores = {"redis_url": f"redis://127.0.0.1:{free_port()}/0", "timeout": "200ms"}
    sidecar = await make_sidecar(policies=[{"cache": {}}], stores=stores)
    started = time.perf_counter()
    for path, body in (
        ("/v1/chat/completions", CHAT),
        ("/v1/chat/completions", {**CHAT, "stream": True}),
    ):
        for _ in range(2):
            status, cache, data = await call(http, sidecar, path, body)
            assert (status, cache) == (200, "miss")
            assert data
    assert time.perf_counter() - started < 5
    assert generations(fake) == 4


async def test_client_that_leaves_closes_the_upstream_and_stores_nothing(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(policies=[{"cache": {}}])
    gate = asyncio.Event()

    async def hold(index: int) -> None:
        if index >= 2:
            await gate.wait()

    fake.between_chunks = hold
    body = {**CHAT, "stream": True}
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=body) as response:
        await response.content.readline()
    await asyncio.wait_for(fake.stream_closed_by_peer.wait(), 5)
    gate.set()
    fake.between_chunks = None
    assert (await call(http, sidecar, "/v1/chat/completions", body))[1] == "miss"


async def test_hit_latency_against_a_miss(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores)
    misses: list[float] = []
    hits: list[float] = []
    for seed in range(40):
        body = {**CHAT, "seed": seed}
        started = time.perf_counter()
        assert (await call(http, sidecar, "/v1/chat/completions", body))[1] == "miss"
        misses.append(time.perf_counter() - started)
        started = time.perf_counter()
        assert (await call(http, sidecar, "/v1/chat/completions", body))[1] == "hit"
        hits.append(time.perf_counter() - started)
    hit_ms = statistics.median(hits) * 1000
    miss_ms = statistics.median(misses) * 1000
    backend = "redis" if stores else "memory"
    print(f"\n{backend}: hit p50 {hit_ms:.2f} ms vs miss p50 {miss_ms:.2f} ms (client round trip)")
    assert hit_ms < miss_ms


class ProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FactsProbe:
    """A test policy (placed before `cache`) that keeps each exchange's facts to look at later."""

    config_model: ClassVar[type[BaseModel]] = ProbeConfig
    seen: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, config: ProbeConfig, context: PolicyContext) -> None:
        pass

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        FactsProbe.seen.append(exchange.facts)
        return await call_next(exchange)


@pytest.fixture
def probe() -> Iterator[list[dict[str, Any]]]:
    FactsProbe.seen = []
    chain._BUILTINS["facts_probe"] = FactsProbe  # type: ignore[assignment]
    yield FactsProbe.seen
    chain._BUILTINS.pop("facts_probe", None)


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        # The fake's plain answers carry `usage` / Ollama's counts.
        ("/v1/chat/completions", CHAT, "prompt_tokens"),
        # A stream's usage event (the client asked for it) or its closing NDJSON line.
        (
            "/v1/chat/completions",
            {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
            "prompt_tokens",
        ),
        ("/api/chat", NATIVE_CHAT, "prompt_tokens"),
        ("/api/chat", {**NATIVE_CHAT, "stream": False}, "prompt_tokens"),
    ],
)
async def test_hits_carry_the_usage_they_represent(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
    probe: list[dict[str, Any]],
    path: str,
    body: dict[str, Any],
    expected: str,
) -> None:
    sidecar = await make_sidecar(policies=[{"facts_probe": {}}, {"cache": {}}], **stores)
    _, cache, first = await call(http, sidecar, path, body)
    assert cache == "miss"
    assert "cached_usage" not in probe[0]
    _, cache, _ = await call(http, sidecar, path, body)
    assert cache == "hit"
    usage = probe[1]["cached_usage"]
    assert usage[expected] > 0
    assert probe[1]["cache"] == "hit"
    if b'"prompt_eval_count"' in first:  # native: the counts of the closing line
        last = orjson.loads(first.strip().splitlines()[-1])
        assert usage["prompt_tokens"] == last["prompt_eval_count"]
        assert usage["completion_tokens"] == last["eval_count"]


async def test_coalesced_plain_answers_carry_the_usage_they_represent(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    probe: list[dict[str, Any]],
) -> None:
    sidecar = await make_sidecar(policies=[{"facts_probe": {}}, {"cache": {}}])
    fake.inject(Fault("delay_headers", delay=0.3))
    answers = await asyncio.gather(
        *(call(http, sidecar, "/v1/chat/completions", CHAT) for _ in range(3))
    )
    assert sorted(cache or "" for _, cache, _ in answers) == ["coalesced", "coalesced", "miss"]
    assert generations(fake) == 1
    usage = orjson.loads(answers[0][2])["usage"]
    for facts in probe:
        if facts["cache"] == "coalesced":
            assert facts["cached_usage"] == usage
        else:
            assert "cached_usage" not in facts


async def test_complete_on_disconnect_finishes_and_stores_the_abandoned_stream(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(policies=[{"cache": {"complete_on_disconnect": True}}])
    gate = asyncio.Event()

    async def hold(index: int) -> None:
        if index >= 2:
            await gate.wait()

    fake.between_chunks = hold
    body = {**CHAT, "stream": True}
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=body) as response:
        assert response.headers["x-sidecar-cache"] == "miss"
        await response.content.readline()
    # The only client has gone; the upstream call goes on in the background.
    await asyncio.sleep(0.2)
    assert not fake.stream_closed_by_peer.is_set()
    gate.set()
    for _ in range(100):
        status, cache, whole = await call(http, sidecar, "/v1/chat/completions", body)
        if cache == "hit":
            break
        await asyncio.sleep(0.02)
    assert (status, cache) == (200, "hit")
    assert whole.endswith(b"data: [DONE]\n\n")
    assert not fake.stream_closed_by_peer.is_set()
    assert generations(fake) == 1


async def test_replay_pace_spaces_a_replayed_streams_events(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores, replay_pace="40ms")
    body = {**CHAT, "stream": True}
    _, _, first = await call(http, sidecar, "/v1/chat/completions", body)
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=body) as response:
        assert response.headers["x-sidecar-cache"] == "hit"
        arrivals: list[float] = []
        data = b""
        async for chunk in response.content.iter_any():
            arrivals.append(time.perf_counter())
            data += chunk
    assert data == first
    events = first.count(b"\n\n")
    assert len(arrivals) == events  # one event per chunk, each after its pause
    assert arrivals[-1] - arrivals[0] >= 0.04 * (events - 1) * 0.9


def sse_chunks(data: bytes) -> list[Any]:
    events = [event[6:] for event in data.split(b"\n\n") if event.startswith(b"data: ")]
    return [e.decode() if e == b"[DONE]" else orjson.loads(e) for e in events]


def without_ids(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k not in ("id", "created", "created_at")}


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_plain_request_is_answered_from_a_stream_entry(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
    include_usage: bool,
) -> None:
    # metering after cache records the usage the stream had (hidden from this client).
    sidecar = await make_sidecar(policies=[{"cache": {}}, {"metering": {}}], **stores)
    stream = {**CHAT, "stream": True}
    if include_usage:
        stream["stream_options"] = {"include_usage": True}
    _, cache, streamed = await call(http, sidecar, "/v1/chat/completions", stream)
    assert cache == "miss"
    status, cache, data = await call(http, sidecar, "/v1/chat/completions", CHAT)
    assert (status, cache) == (200, "hit")
    assembled = orjson.loads(data)
    # What the upstream itself answers to the plain request (not stored).
    _, cache, direct = await call(
        http, sidecar, "/v1/chat/completions", CHAT, {"Cache-Control": "no-store"}
    )
    assert cache == "bypass"
    assert without_ids(assembled) == without_ids(orjson.loads(direct))
    chunks = sse_chunks(streamed)
    assert assembled["id"] == chunks[0]["id"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c["choices"])
    assert assembled["choices"][0]["message"]["content"] == text
    assert generations(fake) == 2
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        assert response.headers["Content-Type"].startswith("application/json")


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_stream_request_is_answered_from_a_plain_entry(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
    include_usage: bool,
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores)
    _, cache, plain = await call(http, sidecar, "/v1/chat/completions", CHAT)
    assert cache == "miss"
    stream = {**CHAT, "stream": True, "stream_options": {"include_usage": include_usage}}
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=stream) as response:
        assert response.headers["x-sidecar-cache"] == "hit"
        assert response.headers["Content-Type"].startswith("text/event-stream")
        data = await response.read()
    document = orjson.loads(plain)
    chunks = sse_chunks(data)
    assert chunks[-1] == "[DONE]"
    assert [c["object"] for c in chunks[:-1]] == ["chat.completion.chunk"] * (len(chunks) - 1)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    message = document["choices"][0]["message"]
    assert chunks[1]["choices"][0]["delta"] == {"content": message["content"]}
    assert chunks[2]["choices"][0]["finish_reason"] == document["choices"][0]["finish_reason"]
    if include_usage:
        assert chunks[3]["choices"] == []
        assert chunks[3]["usage"] == document["usage"]
        assert len(chunks) == 5
    else:
        assert len(chunks) == 4
    assert {c["id"] for c in chunks[:-1]} == {document["id"]}
    assert generations(fake) == 1


async def test_native_chat_plain_and_stream_answer_each_other(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores)
    plain = {**NATIVE_CHAT, "stream": False}
    # A stream first (Ollama's default), then the plain request from it.
    _, cache, streamed = await call(http, sidecar, "/api/chat", NATIVE_CHAT)
    assert cache == "miss"
    _, cache, data = await call(http, sidecar, "/api/chat", plain)
    assert cache == "hit"
    _, _, direct = await call(http, sidecar, "/api/chat", plain, {"Cache-Control": "no-store"})
    assert without_ids(orjson.loads(data)) == without_ids(orjson.loads(direct))
    final = orjson.loads(streamed.splitlines()[-1])
    assembled = orjson.loads(data)
    for name in ("prompt_eval_count", "eval_count", "done_reason", "total_duration"):
        assert assembled[name] == final[name]
    # A plain entry answering a stream (another seed: nothing stored for it yet).
    other = {**plain, "options": {"seed": 8}}
    _, cache, answer = await call(http, sidecar, "/api/chat", other)
    assert cache == "miss"
    async with http.post(f"{sidecar.url}/api/chat", json={**other, "stream": True}) as response:
        assert response.headers["x-sidecar-cache"] == "hit"
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [orjson.loads(line) async for line in response.content if line.strip()]
    document = orjson.loads(answer)
    assert [line["done"] for line in lines] == [False, True]
    assert "".join(line["message"]["content"] for line in lines) == document["message"]["content"]
    assert lines[-1] | {"message": None} == document | {"message": None}
    assert generations(fake) == 3


# ---------------------------------------------------------------------------
# Single-flight across pods: two sidecars sharing one Redis (a short lock per key).


async def two_pods(
    make_sidecar: SidecarFactory, redis_url: str, **options: Any
) -> tuple[Sidecar, Sidecar]:
    stores = {"stores": {"redis_url": redis_url, "prefix": f"t-{uuid.uuid4().hex[:10]}:"}}
    first = await cached_sidecar(make_sidecar, stores, **options)
    second = await cached_sidecar(make_sidecar, stores, **options)
    return first, second


async def coalesced_count(http: aiohttp.ClientSession, sidecar: Sidecar) -> float:
    text = await (await http.get(f"{sidecar.url}/metrics")).text()
    for line in text.splitlines():
        if 'cache_coalesced_total{route="/v1/chat/completions"}' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("stream", [True, False])
async def test_identical_requests_across_two_pods_cost_one_generation(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    redis_server: Any,
    stream: bool,
) -> None:
    pods = await two_pods(make_sidecar, redis_server.url)
    gate = asyncio.Event()

    async def hold(index: int) -> None:
        await gate.wait()

    if stream:
        fake.between_chunks = hold
    else:
        fake.inject(Fault("delay_headers", release=gate))
    body = {**CHAT, "stream": stream}
    clients = [
        asyncio.create_task(call(http, pods[i % 2], "/v1/chat/completions", body))
        for i in range(10)
    ]
    # Every client is in: 4 followers in each pod joined its pod's one flight, one pod's
    # leader holds the lock and the other's polls for the entry.
    for _ in range(300):
        counts = [await coalesced_count(http, pod) for pod in pods]
        waits = sum(cache_policy(pod).lock_waits for pod in pods)
        if counts == [4.0, 4.0] and len(fake.requests) == 1 and waits == 1:
            break
        await asyncio.sleep(0.01)
    assert waits == 1  # the other pod's leader found the lock and waits for the entry
    assert generations(fake) == 1
    gate.set()
    answers = await asyncio.gather(*clients)
    assert generations(fake) == 1
    assert {status for status, _, _ in answers} == {200}
    bodies = {data for _, _, data in answers}
    assert len(bodies) == 1
    if stream:
        assert next(iter(bodies)).endswith(b"data: [DONE]\n\n")
    assert sorted(cache or "" for _, cache, _ in answers) == ["coalesced"] * 9 + ["miss"]
    print(f"\ncross-pod coalescing (stream={stream}): 10 requests over 2 pods -> 1 upstream")


async def test_a_failed_lock_holder_lets_the_other_pod_go_upstream(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    redis_server: Any,
) -> None:
    first, second = await two_pods(make_sidecar, redis_server.url)
    gate = asyncio.Event()

    async def hold(index: int) -> None:
        await gate.wait()

    fake.between_chunks = hold
    fake.inject(Fault("reset_after", after_chunks=2))
    body = {**CHAT, "stream": True}
    leader = asyncio.create_task(call(http, first, "/v1/chat/completions", body))
    for _ in range(200):
        if len(fake.requests) == 1:
            break
        await asyncio.sleep(0.01)
    waiter = asyncio.create_task(call(http, second, "/v1/chat/completions", body))
    for _ in range(300):
        if cache_policy(second).lock_waits == 1:
            break
        await asyncio.sleep(0.01)
    assert generations(fake) == 1  # the second pod waits on the lock
    started = time.perf_counter()
    gate.set()
    _, _, broken = await leader
    assert b"[DONE]" not in broken
    status, cache, whole = await waiter
    elapsed = time.perf_counter() - started
    assert (status, cache) == (200, "miss")
    assert whole.endswith(b"data: [DONE]\n\n")
    assert generations(fake) == 2
    assert elapsed < 2.0  # took the released lock over at once, not after lock_wait (10s)


async def test_a_waiting_pod_goes_upstream_when_lock_wait_runs_out(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    redis_server: Any,
) -> None:
    first, second = await two_pods(make_sidecar, redis_server.url, lock_wait="200ms")
    gate = asyncio.Event()
    fake.inject(Fault("delay_headers", release=gate))
    leader = asyncio.create_task(call(http, first, "/v1/chat/completions", CHAT))
    for _ in range(200):
        if len(fake.requests) == 1:
            break
        await asyncio.sleep(0.01)
    started = time.perf_counter()
    status, cache, _ = await call(http, second, "/v1/chat/completions", CHAT)
    elapsed = time.perf_counter() - started
    assert (status, cache) == (200, "miss")
    assert 0.15 <= elapsed < 2.0
    assert generations(fake) == 2
    gate.set()
    assert (await leader)[:2] == (200, "miss")


def cache_policy(sidecar: Sidecar) -> Any:
    """The running cache policy of a sidecar."""
    assert sidecar.runtime is not None
    return dict(sidecar.runtime.policies)["cache"]


async def test_an_entry_expires_after_its_ttl(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
) -> None:
    sidecar = await cached_sidecar(make_sidecar, stores, ttl="300ms")
    assert (await call(http, sidecar, "/v1/chat/completions", CHAT))[1] == "miss"
    assert (await call(http, sidecar, "/v1/chat/completions", CHAT))[1] == "hit"
    await asyncio.sleep(0.4)
    assert (await call(http, sidecar, "/v1/chat/completions", CHAT))[1] == "miss"
    assert (await call(http, sidecar, "/v1/chat/completions", CHAT))[1] == "hit"
    assert generations(fake) == 2


def test_keys_stay_what_they_were() -> None:
    """Entries in a shared Redis outlive a deploy: a new version must find them by the same key."""

    def key(scope: str, route: str, body: dict[str, Any], stream: bool, include_usage: bool) -> str:
        settings = settings_for("http://127.0.0.1:9", [])
        config = validate(policies.cache.CacheConfig, {"scope": scope})
        cache = policies.cache.ResponseCache(
            config, PolicyContext(settings=settings, metrics=Metrics())
        )
        match = find_route(route)
        exchange = Exchange(
            method="POST",
            route=match.route,
            path=match.upstream_path,
            query_string="",
            headers=CIMultiDictProxy(CIMultiDict()),
            body=orjson.dumps(body),
        )
        exchange.facts["tenant"] = "team-a"
        base = cache._key_base(exchange, exchange.json)
        return policies.cache._key_of(base, stream, include_usage)

    chat = {
        "model": "llama3.2",
        "messages": [{"role": "user", "content": "hi ü"}],
        "temperature": 0,
        "user": "u1",
        "stream": True,
        "stream_options": {"include_usage": True},
        "top_p": 1,
    }
    generate = {"model": "llama3.2:latest", "prompt": "p", "options": {"temperature": 0, "seed": 3}}
    tag = "45b1c9806e74e049"
    assert key("tenant", "/v1/chat/completions", chat, True, True) == (
        f"{tag}:8238fdb1cecb18bda60aac93b79f9ea69fd2b3bc7c042a8003fa371922d39d7f"
    )
    assert key("tenant", "/v1/chat/completions", chat, False, False) == (
        f"{tag}:df21720ff304d5b11942aa2262cc6f7e9d9cd3181862394c500b1fa45ec3c6d1"
    )
    assert key("global", "/api/generate", generate, False, False) == (
        f"{tag}:76c2ba3a48e854a1e86167d93a9f9a07c962b43a78a5392f9d71e0c1d6da337a"
    )
