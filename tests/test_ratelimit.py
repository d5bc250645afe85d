"""ratelimit: exact admission under concurrency (memory and Redis, one and two pods), token
reservations reconciled by metering, OpenAI's headers and 429s (read by the real openai
client), keys per tenant / model / both / global, and a Redis outage with allow and deny."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from types import MappingProxyType
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import ValidationError

import policies.metering  # registers "metering"
import policies.ratelimit  # noqa: F401 - registers "ratelimit"
from policies.ratelimit import RateLimit, RateLimitConfig, go_duration
from sidecar.app import Sidecar
from sidecar.chain import Next, PolicyContext
from sidecar.config import parse_settings
from sidecar.errors import SidecarError
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import adapter, validate
from sidecar.observability import Metrics
from sidecar.routes import ROUTES
from sidecar.stores import Store, open_store
from tests.conftest import SidecarFactory
from tests.redis_server import RedisServer

MODEL = "llama3.2:latest"
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "say hello"}]}
BACKENDS = ["memory", "redis"]
ANON: dict[str, Any] = {
    "auth": {
        "allow_anonymous": True,
        "tenant_header": "x-tenant",
        "keys": [{"key": "sk-unused-key-0123456789abcdef", "tenant": "keyed"}],
    }
}


@pytest.fixture(params=BACKENDS)
def stores(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The `stores` YAML section for one backend; a fresh key prefix per test on Redis."""
    if request.param == "memory":
        return {}
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = f"rl-test-{uuid.uuid4().hex[:10]}:"
    return {"stores": {"redis_url": server.url, "prefix": prefix, "timeout": "500ms"}}


def rl(**options: Any) -> dict[str, Any]:
    return {"ratelimit": options}


async def chat(
    http: aiohttp.ClientSession,
    sidecar: Sidecar,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, CIMultiDictProxy[str], dict[str, Any]]:
    async with http.post(
        f"{sidecar.url}/v1/chat/completions",
        data=orjson.dumps(body or CHAT),
        headers={"Content-Type": "application/json", **(headers or {})},
    ) as response:
        raw = await response.read()
        return response.status, response.headers, orjson.loads(raw) if raw else {}


def metric(sidecar: Sidecar, name: str, **labels: str) -> float:
    value = sidecar.metrics.registry.get_sample_value(f"ollama_sidecar_{name}", labels)
    return value or 0.0


# --- config and helpers -------------------------------------------------------------------


def test_config_needs_a_limit_and_forbids_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="requests_per_minute, tokens_per_minute"):
        validate(RateLimitConfig, {})
    with pytest.raises(ValidationError):
        validate(RateLimitConfig, {"requests_per_minute": 10, "bogus": 1})
    with pytest.raises(ValidationError):
        validate(RateLimitConfig, {"requests_per_minute": 0})
    with pytest.raises(ValidationError):
        validate(RateLimitConfig, {"requests_per_minute": 1, "routes": ("/nope",)})
    config = validate(RateLimitConfig, {"requests_per_minute": 10})
    assert config.per == "tenant" and config.on_store_error == "allow"
    properties = adapter(RateLimitConfig).json_schema()["properties"]
    assert set(properties) == {field.name for field in dataclasses.fields(RateLimitConfig)}
    for name, schema in properties.items():
        assert schema.get("description"), name


def test_go_duration_spells_resets_like_openai() -> None:
    assert go_duration(0) == "0s"
    assert go_duration(0.02) == "20ms"
    assert go_duration(1) == "1s"
    assert go_duration(1.5) == "1.5s"
    assert go_duration(360) == "6m0s"
    assert go_duration(3700.5) == "1h1m40.5s"


# --- exactness under concurrency -------------------------------------------------------------


def _exchange() -> Exchange:
    route = ROUTES["/v1/chat/completions"]
    return Exchange(
        method="POST",
        route=route,
        path=route.name,
        query_string="",
        headers=CIMultiDictProxy(CIMultiDict()),
        body=orjson.dumps(CHAT),
    )


async def _ok(exchange: Exchange) -> Reply:
    await asyncio.sleep(0)
    return Reply(200, CIMultiDict(), b"{}")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_policy_admits_exactly_the_burst_of_500_concurrent(
    backend: str, request: pytest.FixtureRequest
) -> None:
    """requests_per_minute=100 (burst 100 by default): 500 at once admit exactly 100."""
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    store = open_store(url, f"rl-test-{uuid.uuid4().hex[:10]}:")
    context = PolicyContext(settings=parse_settings({}), metrics=Metrics(), store=store)
    policy = RateLimit(RateLimitConfig(requests_per_minute=100), context)
    try:
        results = await asyncio.gather(
            *(policy(_exchange(), _ok) for _ in range(500)), return_exceptions=True
        )
    finally:
        if url is not None:
            await store.delete_prefix("")
        await store.close()
    admitted = [r for r in results if isinstance(r, Reply)]
    refused = [r for r in results if isinstance(r, SidecarError)]
    assert len(admitted) == 100 and len(refused) == 400
    assert {e.status for e in refused} == {429}


async def _burst(http: aiohttp.ClientSession, sidecars: list[Sidecar], n: int) -> list[int]:
    async def one(i: int) -> int:
        sidecar = sidecars[i % len(sidecars)]
        async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
            await response.read()
            return response.status

    return await asyncio.gather(*(one(i) for i in range(n)))


async def test_http_500_concurrent_admit_exactly_100(
    make_sidecar: SidecarFactory, stores: dict[str, Any]
) -> None:
    # A refill of 1/min keeps the figure exact however long 500 requests take.
    sidecar = await make_sidecar([rl(requests_per_minute=1, burst_requests=100)], **stores)
    connector = aiohttp.TCPConnector(limit=500)
    async with aiohttp.ClientSession(connector=connector) as http:
        statuses = await _burst(http, [sidecar], 500)
    assert statuses.count(200) == 100
    assert statuses.count(429) == 400
    assert metric(sidecar, "ratelimit_rejections_total", kind="requests") == 400


async def test_two_pods_sharing_redis_admit_exactly_100(
    make_sidecar: SidecarFactory, redis_server: RedisServer
) -> None:
    stores = {"redis_url": redis_server.url, "prefix": f"rl-test-{uuid.uuid4().hex[:10]}:"}
    policies = [rl(per="global", requests_per_minute=1, burst_requests=100)]
    pod_a = await make_sidecar(policies, stores=stores)
    pod_b = await make_sidecar(policies, stores=stores)
    connector = aiohttp.TCPConnector(limit=500)
    async with aiohttp.ClientSession(connector=connector) as http:
        statuses = await _burst(http, [pod_a, pod_b], 500)
    assert statuses.count(200) == 100 and statuses.count(429) == 400
    rejected = sum(
        metric(pod, "ratelimit_rejections_total", kind="requests") for pod in (pod_a, pod_b)
    )
    assert rejected == 400


# --- headers and 429s -----------------------------------------------------------------------


async def test_headers_on_success_and_on_429(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, stores: dict[str, Any]
) -> None:
    sidecar = await make_sidecar([rl(requests_per_minute=2, tokens_per_minute=100_000)], **stores)
    status, headers, _ = await chat(http, sidecar)
    assert status == 200
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert headers["x-ratelimit-remaining-requests"] == "1"
    assert headers["x-ratelimit-reset-requests"] in ("30s", "29.999s", "30.001s")
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(headers["x-ratelimit-remaining-tokens"]) < 100_000
    assert headers["x-ratelimit-reset-tokens"].endswith(("ms", "s"))
    status, headers, _ = await chat(http, sidecar)
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "0"
    status, headers, body = await chat(http, sidecar)
    assert status == 429
    assert body["error"]["type"] == "requests"
    assert body["error"]["code"] == "rate_limit_exceeded"
    # One request refills in 30 s; about that much is left.
    assert 28 <= int(headers["Retry-After"]) <= 30
    assert 28_000 <= int(headers["retry-after-ms"]) <= 30_000
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-tokens"] == "100000"
    assert metric(sidecar, "ratelimit_rejections_total", kind="requests") == 1


async def test_routes_that_run_no_model_are_not_counted(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar([rl(requests_per_minute=1, burst_requests=1)])
    for _ in range(3):
        async with http.get(f"{sidecar.url}/v1/models") as response:
            assert response.status == 200
            assert "x-ratelimit-limit-requests" not in response.headers
    assert (await chat(http, sidecar))[0] == 200


async def test_openai_client_reads_the_429(make_sidecar: SidecarFactory) -> None:
    sidecar = await make_sidecar([rl(requests_per_minute=1, burst_requests=1)])
    client = openai.AsyncOpenAI(base_url=f"{sidecar.url}/v1", api_key="sk", max_retries=0)
    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    error = caught.value
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded" and error.type == "requests"
    headers = error.response.headers
    assert headers["x-ratelimit-limit-requests"] == "1"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert 55 <= int(headers["retry-after"]) <= 60
    await client.close()


async def test_openai_client_with_retries_honours_retry_after(
    make_sidecar: SidecarFactory,
) -> None:
    # 60/min = one a second: the 429 says "retry after ~1 s" and the client waits that long.
    sidecar = await make_sidecar([rl(requests_per_minute=60, burst_requests=1)])
    client = openai.AsyncOpenAI(base_url=f"{sidecar.url}/v1", api_key="sk", max_retries=2)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "hi"}
    ]
    await client.chat.completions.create(model=MODEL, messages=messages)
    started = time.monotonic()
    raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=messages)
    waited = time.monotonic() - started
    assert raw.http_response.status_code == 200
    assert raw.retries_taken >= 1
    assert 0.5 <= waited < 5
    assert metric(sidecar, "ratelimit_rejections_total", kind="requests") >= 1
    await client.close()


# --- tokens: reservation and reconciliation ----------------------------------------------


async def test_tokens_reserved_without_metering(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, stores: dict[str, Any]
) -> None:
    """No usage fact: the estimate (body bytes / 4 + max_tokens) stays taken."""
    sidecar = await make_sidecar(
        [rl(tokens_per_minute=1, burst_tokens=1000, requests_per_minute=100)], **stores
    )
    body = {**CHAT, "max_tokens": 50}
    estimate = (len(orjson.dumps(body)) + 3) // 4 + 50
    status, headers, _ = await chat(http, sidecar, body)
    assert status == 200
    assert headers["x-ratelimit-remaining-tokens"] == str(1000 - estimate)
    status, headers, _ = await chat(http, sidecar, body)
    assert headers["x-ratelimit-remaining-tokens"] == str(1000 - 2 * estimate)


async def test_tokens_reconciled_with_metering_plain_and_stream(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, stores: dict[str, Any]
) -> None:
    sidecar = await make_sidecar(
        [rl(tokens_per_minute=1, burst_tokens=1000), {"metering": {}}], **stores
    )
    body = {**CHAT, "max_tokens": 200}
    status, headers, answer = await chat(http, sidecar, body)
    assert status == 200
    used = answer["usage"]["total_tokens"]
    assert 0 < used < 200
    # The plain answer's header already shows the real usage, not the 200+ reservation.
    assert headers["x-ratelimit-remaining-tokens"] == str(1000 - used)

    # A stream: reconciled at its end (metering writes the usage there).
    async with http.post(
        f"{sidecar.url}/v1/chat/completions", json={**body, "stream": True}
    ) as response:
        assert response.status == 200
        at_admission = int(response.headers["x-ratelimit-remaining-tokens"])
        assert at_admission < 1000 - used - 200  # the reservation was taken
        await response.read()
    runtime = sidecar.runtime
    assert runtime is not None
    policy = next(p for name, p in runtime.policies if name == "ratelimit")
    assert isinstance(policy, RateLimit)
    await policy.close()  # waits for the pending reconciliation
    status, headers, answer = await chat(http, sidecar, body)
    assert status == 200
    # Two plain answers and a stream of the same request all used the same tokens.
    assert headers["x-ratelimit-remaining-tokens"] == str(1000 - 3 * used)


async def test_token_limit_429_and_request_slot_given_back(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, stores: dict[str, Any]
) -> None:
    sidecar = await make_sidecar(
        [rl(requests_per_minute=1, burst_requests=10, tokens_per_minute=600, burst_tokens=300)],
        **stores,
    )
    body = {**CHAT, "max_tokens": 200}
    assert (await chat(http, sidecar, body))[0] == 200
    status, headers, answer = await chat(http, sidecar, body)
    assert status == 429
    assert answer["error"]["type"] == "tokens"
    assert answer["error"]["code"] == "rate_limit_exceeded"
    # 600/min = 10 tokens a second; ~100+ tokens short.
    assert 5 <= int(headers["Retry-After"]) <= 30
    assert headers["x-ratelimit-remaining-requests"] == "9"  # the refused one was given back
    assert int(headers["x-ratelimit-remaining-tokens"]) < 200
    assert metric(sidecar, "ratelimit_rejections_total", kind="tokens") == 1
    # A request that never fits the burst is told not to retry.
    status, headers, answer = await chat(http, sidecar, {**CHAT, "max_tokens": 5000})
    assert status == 429 and answer["error"]["type"] == "tokens"
    assert headers["x-should-retry"] == "false" and "Retry-After" not in headers
    assert "Request too large" in answer["error"]["message"]


async def test_num_predict_and_default_completion_tokens(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(
        [rl(tokens_per_minute=1, burst_tokens=10_000, default_completion_tokens=100)]
    )
    native = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 40}}
    async with http.post(f"{sidecar.url}/api/generate", data=orjson.dumps(native)) as response:
        assert response.status == 200
        remaining = int(response.headers["x-ratelimit-remaining-tokens"])
    assert remaining == 10_000 - (len(orjson.dumps(native)) + 3) // 4 - 40
    status, headers, _ = await chat(http, sidecar)
    assert status == 200
    estimate = (len(orjson.dumps(CHAT)) + 3) // 4 + 100
    assert headers["x-ratelimit-remaining-tokens"] == str(remaining - estimate)


# --- keys --------------------------------------------------------------------------------


async def _statuses(
    http: aiohttp.ClientSession, sidecar: Sidecar, calls: list[tuple[str, str]]
) -> list[int]:
    out = []
    for tenant, model in calls:
        body = {**CHAT, "model": model}
        out.append((await chat(http, sidecar, body, {"x-tenant": tenant}))[0])
    return out


@pytest.mark.parametrize(
    ("per", "calls", "expected"),
    [
        ("tenant", [("a", MODEL), ("a", "smollm2"), ("b", MODEL)], [200, 429, 200]),
        ("model", [("a", MODEL), ("b", MODEL), ("a", "smollm2")], [200, 429, 200]),
        ("global", [("a", MODEL), ("b", "smollm2")], [200, 429]),
        (
            "tenant_model",
            [("a", MODEL), ("a", "smollm2"), ("b", MODEL), ("a", MODEL)],
            [200, 200, 200, 429],
        ),
    ],
)
async def test_keys_per_tenant_model_global(
    make_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
    per: str,
    calls: list[tuple[str, str]],
    expected: list[int],
) -> None:
    sidecar = await make_sidecar(
        [ANON, rl(per=per, requests_per_minute=1, burst_requests=1)], **stores
    )
    assert await _statuses(http, sidecar, calls) == expected


async def test_tenant_overrides(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, stores: dict[str, Any]
) -> None:
    auth = {"auth": {**ANON["auth"], "tenants": {"vip": {"requests_per_minute": 3}}}}
    sidecar = await make_sidecar([auth, rl(requests_per_minute=1)], **stores)
    assert await _statuses(http, sidecar, [("vip", MODEL)] * 4) == [200, 200, 200, 429]
    assert await _statuses(http, sidecar, [("anonymous", MODEL)] * 2) == [200, 429]
    status, headers, _ = await chat(http, sidecar, headers={"x-tenant": "vip"})
    assert status == 429
    assert headers["x-ratelimit-limit-requests"] == "3"


# --- Redis outage --------------------------------------------------------------------------


@pytest.fixture
def restart_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """Stop it in the test; it is running again afterwards whatever happened."""
    yield redis_server
    if not redis_server.running:
        redis_server.start()


@pytest.mark.parametrize("on_store_error", ["allow", "deny"])
async def test_redis_down_follows_on_store_error_and_recovers(
    make_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    restart_redis: RedisServer,
    on_store_error: str,
) -> None:
    stores = {
        "redis_url": restart_redis.url,
        "prefix": f"rl-test-{uuid.uuid4().hex[:10]}:",
        "timeout": "500ms",
    }
    policies = [rl(requests_per_minute=1, burst_requests=1, on_store_error=on_store_error)]
    sidecar = await make_sidecar(policies, stores=stores)
    assert (await chat(http, sidecar))[0] == 200
    assert (await chat(http, sidecar))[0] == 429
    restart_redis.stop()
    started = time.monotonic()
    for _ in range(3):
        status, headers, body = await chat(http, sidecar)
        if on_store_error == "allow":
            assert status == 200 and "x-ratelimit-limit-requests" not in headers
        else:
            assert status == 503 and body["error"]["code"] == "store_unavailable"
            assert headers["Retry-After"] == "1"
    assert time.monotonic() - started < 5  # bounded: no hang
    assert metric(sidecar, "ratelimit_store_errors_total") == 3
    restart_redis.start()
    # Recovered: the limit applies again (the restarted Redis lost its state: a fresh burst).
    deadline = time.monotonic() + 10
    statuses: list[int] = []
    while time.monotonic() < deadline:
        statuses = [(await chat(http, sidecar))[0] for _ in range(2)]
        if statuses == [200, 429]:
            break
        await asyncio.sleep(0.1)
    assert statuses == [200, 429]


# --- reconciliation without a task per request -------------------------------------------------


def _policy(store: Store, metrics: Metrics, **options: Any) -> RateLimit:
    context = PolicyContext(settings=parse_settings({}), metrics=metrics, store=store)
    return RateLimit(validate(RateLimitConfig, options), context)


def _stream_using(total_tokens: int) -> Next:
    """An upstream whose stream ends with metering's usage fact."""

    async def call_next(exchange: Exchange) -> Reply:
        async def chunks() -> AsyncGenerator[bytes, None]:
            yield b"data: {}\n\n"
            exchange.facts["usage"] = {"total_tokens": total_tokens}

        return Reply(200, CIMultiDict(), chunks=chunks(), stream_format="sse")

    return call_next


async def _drain(reply: Reply) -> None:
    assert reply.chunks is not None
    async for _ in reply.chunks:
        pass


TOKENS = "rl:t:t=anonymous"  # the token bucket of _exchange()'s (anonymous) tenant


async def test_a_stream_end_reconciles_at_once_without_a_task() -> None:
    store = open_store(None)
    policy = _policy(store, Metrics(), tokens_per_minute=0.001, burst_tokens=5000)
    exchange = _exchange()
    reply = await policy(exchange, _stream_using(30))
    reserved = 5000 - int(exchange.response_headers["x-ratelimit-remaining-tokens"])
    assert reserved > 256  # the prompt estimate and the default completion
    tasks = len(asyncio.all_tasks())
    await _drain(reply)
    # applied by the stream's end callback itself: no task, nothing pending
    assert len(asyncio.all_tasks()) == tasks and store.pending_writes == 0
    remaining = (await store.take(TOKENS, 0, 0.001 / 60, 5000)).remaining
    assert remaining == pytest.approx(5000 - 30, abs=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_stream_and_upstream_failure_settle_through_the_queue(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    store = open_store(url, f"rl-test-{uuid.uuid4().hex[:10]}:")
    policy = _policy(store, Metrics(), tokens_per_minute=0.001, burst_tokens=5000)

    async def down(exchange: Exchange) -> Reply:
        raise SidecarError(502, "upstream down", code="upstream_unavailable")

    try:
        replies = [await policy(_exchange(), _stream_using(30 + i)) for i in range(10)]
        for reply in replies:
            await _drain(reply)
        for _ in range(5):  # no answer at all: the reservation goes back
            with pytest.raises(SidecarError):
                await policy(_exchange(), down)
        await policy.close()  # the queued reconciliations are written
        assert store.pending_writes == 0
        remaining = (await store.take(TOKENS, 0, 0.001 / 60, 5000)).remaining
        assert remaining == pytest.approx(5000 - sum(30 + i for i in range(10)), abs=1e-3)
        assert policy.readiness()["pending_reconciliations"] == 0
    finally:
        if url is not None:
            await store.delete_prefix("")
        await store.close()


async def test_reconciliation_lost_to_an_outage_is_counted(redis_server: RedisServer) -> None:
    del redis_server  # only to fail early when redis-server is missing
    with RedisServer() as own:
        store = open_store(own.url, "rl-outage:", timeout_s=0.3)
        metrics = Metrics()
        policy = _policy(store, metrics, tokens_per_minute=60, burst_tokens=5000)
        try:
            replies = [await policy(_exchange(), _stream_using(30)) for _ in range(3)]
            own.stop()
            for reply in replies:
                await _drain(reply)  # the streams end normally
            await asyncio.wait_for(policy.close(), 5)
            errors = metrics.registry.get_sample_value(
                "ollama_sidecar_ratelimit_store_errors_total", {}
            )
            assert errors == 3  # one per lost reconciliation
        finally:
            await store.close()


async def test_a_tenants_limits_follow_its_overrides_object() -> None:
    """Limits are worked out once per key and auth's overrides object, not per request."""
    policy = _policy(open_store(None), Metrics(), requests_per_minute=1)
    first = MappingProxyType({"requests_per_minute": 3})
    # a reloaded auth: a new mapping, new limits at once
    second = MappingProxyType({"requests_per_minute": 7, "burst_requests": 9})
    for overrides, limit in [(first, "3"), (first, "3"), (second, "9"), (None, "1")]:
        exchange = _exchange()
        exchange.facts.update(tenant="t", tenant_overrides=overrides)
        if overrides is None:
            exchange.facts["tenant"] = "u"
        await policy(exchange, _ok)
        assert exchange.response_headers["x-ratelimit-limit-requests"] == limit
