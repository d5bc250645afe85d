"""The cache policy: byte-identical replay, single-flight, what is never cached, purge.

Every test runs on the memory backend and on a real Redis started by the tests.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

import policies.cache  # noqa: F401  (registers "cache")
from sidecar.app import Sidecar
from tests.conftest import SidecarFactory
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
    await asyncio.sleep(0.3)
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
    assert generations(fake) == 4


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
