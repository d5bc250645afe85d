"""budget: 429 insufficient_quota, reconciliation with metering, exactness, restarts, outages."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, get_type_hints

import aiohttp
import openai
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import ValidationError
from pydantic.fields import FieldInfo

import policies.auth
import policies.budget
import policies.metering
from policies.budget import Budget, BudgetConfig, period_at
from sidecar.app import Sidecar
from sidecar.chain import Next, PolicyContext
from sidecar.config import parse_settings
from sidecar.errors import SidecarError
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import validate
from sidecar.observability import Metrics
from sidecar.routes import ROUTES
from sidecar.stores import Store, open_store
from tests.conftest import SidecarFactory
from tests.redis_server import RedisServer

assert policies.budget and policies.metering and policies.auth  # registered by import

MODEL = "llama3.2:latest"
CHAT: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hi there"}],
    "max_tokens": 10,
}
NATIVE: dict[str, Any] = {**CHAT, "stream": False, "options": {"num_predict": 10}}
# Prompt bytes / 4 + max_tokens: what one CHAT request reserves.
CHAT_RESERVATION = len(orjson.dumps(CHAT)) // 4 + 10
JSON = {"Content-Type": "application/json"}
KEY_A = "sk-team-a-0123456789abcdef"
KEY_B = "sk-team-b-0123456789abcdef"


def policy_of(sidecar: Sidecar) -> Budget:
    assert sidecar.runtime is not None
    for name, policy in sidecar.runtime.policies:
        if name == "budget":
            assert isinstance(policy, Budget)
            return policy
    raise AssertionError("no budget policy")


class WallClock:
    """A settable Unix time for the policy's `now` hook."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["memory", "redis"])
def stores(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The `stores:` YAML section for each backend (Redis: a fresh prefix per test)."""
    if request.param == "memory":
        return {}
    server: RedisServer = request.getfixturevalue("redis_server")
    return {"stores": {"redis_url": server.url, "prefix": f"t-{uuid.uuid4().hex[:10]}:"}}


@pytest.fixture
def redis_up(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The session's redis-server, started again whatever the test did to it."""
    try:
        yield redis_server
    finally:
        redis_server.start()


def redis_stores(server: RedisServer) -> dict[str, Any]:
    return {
        "stores": {
            "redis_url": server.url,
            "prefix": f"t-{uuid.uuid4().hex[:10]}:",
            "timeout": 0.5,
        }
    }


async def post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], **kw: Any
) -> tuple[int, bytes, Any]:
    """POST the body as orjson writes it, so its size (and so the reservation) is known."""
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    async with http.post(url, data=orjson.dumps(body), headers=headers, **kw) as response:
        return response.status, await response.read(), response.headers


async def metrics_text(http: aiohttp.ClientSession, sidecar: Sidecar) -> str:
    async with http.get(f"{sidecar.url}/metrics") as response:
        return await response.text()


# --- config and periods -----------------------------------------------------------------


def test_config_defaults_and_bounds() -> None:
    config = BudgetConfig()
    assert (config.period, config.tokens, config.cost, config.on_store_error) == (
        "month",
        None,
        None,
        "allow",
    )
    assert validate(BudgetConfig, {"period": "fixed", "window": "1h"}).window == 3600
    for bad in (
        {"period": "fixed"},
        {"period": "day", "window": "1h"},
        {"tokens": -1},
        {"cost": -0.5},
        {"on_store_error": "maybe"},
        {"unknown": 1},
        {"tenants": {"a": {"tokens": 1, "extra": 2}}},
    ):
        with pytest.raises(ValidationError):
            validate(BudgetConfig, bad)
    for name, hint in get_type_hints(BudgetConfig, include_extras=True).items():
        metadata = getattr(hint, "__metadata__", ())
        assert any(isinstance(meta, FieldInfo) and meta.description for meta in metadata), name


def test_periods_follow_the_utc_calendar() -> None:
    def ts(
        year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
    ) -> float:
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()

    month = period_at(ts(2026, 12, 31, 23, 59, 59), "month")
    assert (month.id, month.resets_at) == ("2026-12", "2027-01-01T00:00:00Z")
    assert period_at(ts(2027, 1, 1), "month").id == "2027-01"
    day = period_at(ts(2026, 2, 28, 12), "day")
    assert (day.id, day.resets_at) == ("2026-02-28", "2026-03-01T00:00:00Z")
    fixed = period_at(ts(2026, 5, 1, 10, 30), "fixed", 3600)
    assert fixed.resets_at == "2026-05-01T11:00:00Z"
    assert period_at(ts(2026, 5, 1, 11), "fixed", 3600).id != fixed.id


# --- refusals -------------------------------------------------------------------------


async def test_spent_budget_is_429_insufficient_quota_in_each_dialect(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar([{"budget": {"tokens": CHAT_RESERVATION * 2}}])
    url = f"{sidecar.url}/v1/chat/completions"
    assert (await post(http, url, CHAT))[0] == 200
    assert (await post(http, url, CHAT))[0] == 200
    status, raw, headers = await post(http, url, CHAT)
    assert status == 429
    error = orjson.loads(raw)["error"]
    assert error["code"] == "insufficient_quota" and error["type"] == "insufficient_quota"
    assert "anonymous" in error["message"] and "resets at" in error["message"]
    assert "Retry-After" not in headers and headers["x-should-retry"] == "false"
    status, raw, _ = await post(http, f"{sidecar.url}/api/chat", NATIVE)
    assert status == 429
    assert list(orjson.loads(raw)) == ["error"] and "quota" in orjson.loads(raw)["error"]
    text = await metrics_text(http, sidecar)
    assert 'ollama_sidecar_budget_rejections_total{tenant="anonymous"} 2.0' in text
    # Non-generation routes are never budgeted.
    async with http.get(f"{sidecar.url}/v1/models") as response:
        assert response.status == 200


async def test_a_request_larger_than_what_is_left_is_refused(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar([{"budget": {"tokens": 1000}}])
    url = f"{sidecar.url}/v1/chat/completions"
    status, raw, _ = await post(http, url, {**CHAT, "max_tokens": 5000})
    assert status == 429 and b"would exceed" in raw
    assert (await post(http, url, CHAT))[0] == 200  # a refusal took nothing


async def test_openai_client_raises_rate_limit_error_with_insufficient_quota(
    make_sidecar: SidecarFactory,
) -> None:
    sidecar = await make_sidecar([{"budget": {"tokens": 0}}])
    client = openai.AsyncOpenAI(base_url=f"{sidecar.url}/v1", api_key="x", max_retries=0)
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        await client.close()
    assert caught.value.status_code == 429
    assert caught.value.code == "insufficient_quota"
    assert caught.value.type == "insufficient_quota"


async def test_cost_budget_refuses_once_spent(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    prices = {"llama3.2": {"prompt": 1_000_000.0, "completion": 1_000_000.0}}  # 1 per token
    sidecar = await make_sidecar([{"budget": {"cost": 5.0}}, {"metering": {"prices": prices}}])
    url = f"{sidecar.url}/v1/chat/completions"
    status, raw, _ = await post(http, url, CHAT)
    assert status == 200
    assert orjson.loads(raw)["usage"]["total_tokens"] > 5
    status, raw, _ = await post(http, url, CHAT)
    assert status == 429 and b"cost budget" in raw
    detail = (await policy_of(sidecar).usage_detail("anonymous"))["anonymous"]
    assert detail["left_cost"] == 0.0 and detail["spent_cost"] > 5


async def test_limits_per_tenant_from_auth_overrides_and_the_tenants_map(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    auth = {
        "keys": [{"key": KEY_A, "tenant": "team-a"}, {"key": KEY_B, "tenant": "team-b"}],
        "tenants": {"team-a": {"budget_tokens": 0}},
    }
    budget = {"tokens": 1_000_000, "tenants": {"team-b": {"tokens": None}, "team-c": {"cost": 1}}}
    sidecar = await make_sidecar([{"auth": auth}, {"budget": budget}])
    url = f"{sidecar.url}/v1/chat/completions"
    status, _, _ = await post(http, url, CHAT, headers={"Authorization": f"Bearer {KEY_A}"})
    assert status == 429
    status, _, _ = await post(http, url, CHAT, headers={"Authorization": f"Bearer {KEY_B}"})
    assert status == 200
    policy = policy_of(sidecar)
    assert policy.limits_for("team-b") == (None, None)
    assert policy.limits_for("team-c") == (1_000_000, 1.0)
    assert policy.limits_for("team-a", {"budget_tokens": 7, "budget_cost": "x"}) == (7, None)
    detail = await policy.usage_detail(None)
    assert detail["team-a"]["limit_tokens"] == 0 and detail["team-a"]["left_tokens"] == 0
    assert detail["team-b"]["limit_tokens"] is None and detail["team-b"]["spent_tokens"] == 0
    assert set(detail) == {"team-a", "team-b", "team-c"}


# --- reconciliation with metering --------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
@pytest.mark.parametrize("stream", [False, True])
async def test_spend_equals_the_upstreams_usage(
    make_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    stores: dict[str, Any],
    path: str,
    stream: bool,
) -> None:
    prices = {"llama3.2": {"prompt": 1.0, "completion": 2.0}}
    sidecar = await make_sidecar(
        [{"budget": {"tokens": 100_000, "cost": 100.0}}, {"metering": {"prices": prices}}],
        **stores,
    )
    body: dict[str, Any] = {**CHAT, "stream": stream}
    if stream and path.startswith("/v1"):
        body["stream_options"] = {"include_usage": True}
    expected_tokens = expected_cost = 0.0
    for _ in range(3):
        status, raw, _ = await post(http, sidecar.url + path, body)
        assert status == 200
        if path.startswith("/v1"):
            events = [e[6:] for e in raw.split(b"\n\n") if e.startswith(b"data: {")]
            document = orjson.loads(events[-1] if stream else raw)
            prompt = document["usage"]["prompt_tokens"]
            completion = document["usage"]["completion_tokens"]
        else:
            last = orjson.loads(raw.strip().splitlines()[-1])
            prompt, completion = last["prompt_eval_count"], last["eval_count"]
        expected_tokens += prompt + completion
        expected_cost += (prompt * 1.0 + completion * 2.0) / 1e6
    policy = policy_of(sidecar)
    await policy.flush()
    detail = (await policy.usage_detail("anonymous"))["anonymous"]
    assert detail["spent_tokens"] == expected_tokens
    assert detail["left_tokens"] == 100_000 - expected_tokens
    assert detail["spent_cost"] == pytest.approx(expected_cost)
    assert expected_tokens != 3 * CHAT_RESERVATION  # the figure really was reconciled


async def test_error_answers_give_the_reservation_back(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar([{"budget": {"tokens": 100_000}}, {"metering": {}}])
    status, _, _ = await post(
        http, f"{sidecar.url}/v1/chat/completions", {**CHAT, "model": "no-such-model"}
    )
    assert status == 404
    detail = (await policy_of(sidecar).usage_detail("anonymous"))["anonymous"]
    assert detail["spent_tokens"] == 0


async def test_without_usage_the_reservation_is_kept(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar([{"budget": {"tokens": 100_000}}])
    assert (await post(http, f"{sidecar.url}/v1/chat/completions", CHAT))[0] == 200
    detail = (await policy_of(sidecar).usage_detail(None))["anonymous"]
    assert detail["spent_tokens"] == CHAT_RESERVATION


# --- exactness under concurrency ------------------------------------------------------------


async def test_500_concurrent_requests_admit_exactly_100(
    make_sidecar: SidecarFactory, stores: dict[str, Any]
) -> None:
    sidecar = await make_sidecar([{"budget": {"tokens": 100 * CHAT_RESERVATION}}], **stores)
    url = f"{sidecar.url}/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=500)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> int:
            async with session.post(url, data=orjson.dumps(CHAT), headers=JSON) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one() for _ in range(500)))
    assert statuses.count(200) == 100
    assert statuses.count(429) == 400
    detail = (await policy_of(sidecar).usage_detail("anonymous"))["anonymous"]
    assert detail["spent_tokens"] == 100 * CHAT_RESERVATION and detail["left_tokens"] == 0


# --- restarts -------------------------------------------------------------------------


async def test_spend_survives_a_restart_with_redis_and_resets_with_memory(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, stores: dict[str, Any]
) -> None:
    options = {"budget": {"tokens": CHAT_RESERVATION}}
    first = await make_sidecar([options], **stores)
    url = "/v1/chat/completions"
    assert (await post(http, first.url + url, CHAT))[0] == 200
    assert (await post(http, first.url + url, CHAT))[0] == 429
    await first.stop(grace=0)
    second = await make_sidecar([options], **stores)
    status = (await post(http, second.url + url, CHAT))[0]
    spent = (await policy_of(second).usage_detail("anonymous"))["anonymous"]["spent_tokens"]
    if stores:  # Redis: the spend is still there
        assert status == 429 and spent == CHAT_RESERVATION
    else:  # memory: a new process starts from zero
        assert status == 200 and spent == CHAT_RESERVATION


async def test_a_period_key_expires_a_bit_after_its_period(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, stores: dict[str, Any]
) -> None:
    sidecar = await make_sidecar(
        [{"budget": {"period": "fixed", "window": "1h", "tokens": 10**6}}], **stores
    )
    assert (await post(http, f"{sidecar.url}/v1/chat/completions", CHAT))[0] == 200
    policy = policy_of(sidecar)
    period = policy.period()
    ttl = await policy.store.ttl(f"budget:anonymous:{period.id}")
    assert ttl is not None
    left = period.end - time.time()
    assert left + 3600 - 5 <= ttl <= left + 3600 + 5


# --- period rollover --------------------------------------------------------------------


async def test_a_new_period_starts_a_new_budget(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, stores: dict[str, Any]
) -> None:
    sidecar = await make_sidecar(
        [{"budget": {"period": "month", "tokens": CHAT_RESERVATION}}], **stores
    )
    policy = policy_of(sidecar)
    clock = WallClock(datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC).timestamp())
    policy.now = clock
    url = f"{sidecar.url}/v1/chat/completions"
    assert (await post(http, url, CHAT))[0] == 200
    status, raw, _ = await post(http, url, CHAT)
    assert status == 429 and b"2026-12-01T00:00:00Z" in raw
    clock.t += 1  # December
    assert (await post(http, url, CHAT))[0] == 200
    detail = (await policy.usage_detail("anonymous"))["anonymous"]
    assert detail["period"] == "2026-12" and detail["resets_at"] == "2027-01-01T00:00:00Z"
    assert detail["spent_tokens"] == CHAT_RESERVATION


async def test_fixed_windows_roll_over(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(
        [{"budget": {"period": "fixed", "window": "1h", "tokens": CHAT_RESERVATION}}]
    )
    policy = policy_of(sidecar)
    clock = WallClock(7200.0 * 1000)
    policy.now = clock
    url = f"{sidecar.url}/v1/chat/completions"
    assert (await post(http, url, CHAT))[0] == 200
    clock.t += 3599
    assert (await post(http, url, CHAT))[0] == 429
    clock.t += 1
    assert (await post(http, url, CHAT))[0] == 200


# --- Redis outage --------------------------------------------------------------------------


async def test_redis_down_allow_lets_requests_through_and_recovers(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, redis_up: RedisServer
) -> None:
    sidecar = await make_sidecar(
        [{"budget": {"tokens": CHAT_RESERVATION}}], **redis_stores(redis_up)
    )
    url = f"{sidecar.url}/v1/chat/completions"
    assert (await post(http, url, CHAT))[0] == 200
    redis_up.stop()
    started = time.monotonic()
    for _ in range(3):
        assert (await post(http, url, CHAT))[0] == 200
    assert time.monotonic() - started < 5
    text = await metrics_text(http, sidecar)
    assert "ollama_sidecar_budget_store_errors_total 3.0" in text
    assert policy_of(sidecar).readiness()["store_errors"] == 3
    redis_up.start()  # a fresh, empty Redis: the budget applies again at once
    deadline = time.monotonic() + 5
    statuses: list[int] = []
    while time.monotonic() < deadline and 429 not in statuses:
        statuses.append((await post(http, url, CHAT))[0])
    assert statuses[-1] == 429


async def test_redis_down_deny_answers_503_and_recovers(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, redis_up: RedisServer
) -> None:
    sidecar = await make_sidecar(
        [{"budget": {"tokens": 10**6, "on_store_error": "deny"}}], **redis_stores(redis_up)
    )
    url = f"{sidecar.url}/v1/chat/completions"
    assert (await post(http, url, CHAT))[0] == 200
    redis_up.stop()
    started = time.monotonic()
    status, raw, _ = await post(http, url, CHAT)
    assert time.monotonic() - started < 5
    assert status == 503 and orjson.loads(raw)["error"]["code"] == "store_unavailable"
    status, raw, _ = await post(http, f"{sidecar.url}/api/chat", NATIVE)
    assert status == 503 and "store" in orjson.loads(raw)["error"]
    redis_up.start()
    # The first call after the outage reconnects: no waiting, no error.
    assert (await post(http, url, CHAT))[0] == 200


async def test_redis_dies_mid_stream_the_stream_still_ends(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, redis_up: RedisServer
) -> None:
    sidecar = await make_sidecar(
        [{"budget": {"tokens": 10**6}}, {"metering": {}}], **redis_stores(redis_up)
    )
    async with http.post(f"{sidecar.url}/api/chat", json={**CHAT, "stream": True}) as response:
        assert response.status == 200
        first = await response.content.readline()
        assert first
        redis_up.stop()
        rest = await response.read()
    assert b'"done":true' in first + rest
    policy = policy_of(sidecar)
    await asyncio.wait_for(policy.flush(), 5)
    assert policy.readiness()["store_errors"] == 1  # the reconcile failed, counted, no crash


async def test_usage_detail_and_readiness(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, stores: dict[str, Any]
) -> None:
    sidecar = await make_sidecar(
        [{"budget": {"period": "day", "tokens": 1000, "cost": 2.5}}], **stores
    )
    assert (await post(http, f"{sidecar.url}/v1/chat/completions", CHAT))[0] == 200
    policy = policy_of(sidecar)
    detail = await policy.usage_detail(None)
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert detail == {
        "anonymous": {
            "limit_tokens": 1000,
            "spent_tokens": CHAT_RESERVATION,
            "left_tokens": 1000 - CHAT_RESERVATION,
            "limit_cost": 2.5,
            "spent_cost": 0.0,
            "left_cost": 2.5,
            "period": today,
            "resets_at": detail["anonymous"]["resets_at"],
        }
    }
    assert (await policy.usage_detail("nobody"))["nobody"]["spent_tokens"] == 0
    ready = policy.readiness()
    assert ready["period"] == "day" and ready["current_period"] == today
    assert ready["store"] == ("redis" if stores else "memory")


# --- reconciliation without a task per request, limits worked out once ---------------------


def _budget(store: Store, metrics: Metrics | None = None, **options: Any) -> Budget:
    context = PolicyContext(settings=parse_settings({}), metrics=metrics or Metrics(), store=store)
    return Budget(BudgetConfig(**options), context)


def _chat(tenant: str = "anonymous", overrides: Any = None) -> Exchange:
    route = ROUTES["/v1/chat/completions"]
    exchange = Exchange(
        method="POST",
        route=route,
        path=route.name,
        query_string="",
        headers=CIMultiDictProxy(CIMultiDict()),
        body=orjson.dumps(CHAT),
    )
    exchange.facts["tenant"] = tenant
    if overrides is not None:
        exchange.facts["tenant_overrides"] = overrides
    return exchange


def _answer(total_tokens: int, *, stream: bool, before: Callable[[], None] = lambda: None) -> Next:
    """An upstream that used `total_tokens` (metering's usage fact), plain or streamed."""

    async def call_next(exchange: Exchange) -> Reply:
        before()
        if not stream:
            exchange.facts["usage"] = {"total_tokens": total_tokens}
            return Reply(200, CIMultiDict(), b"{}")

        async def chunks() -> AsyncGenerator[bytes, None]:
            yield b"data: {}\n\n"
            exchange.facts["usage"] = {"total_tokens": total_tokens}

        return Reply(200, CIMultiDict(), chunks=chunks(), stream_format="sse")

    return call_next


async def _drain(reply: Reply) -> None:
    assert reply.chunks is not None
    async for _ in reply.chunks:
        pass


async def _spent(store: Store, policy: Budget, tenant: str = "anonymous") -> float:
    return (await store.get(f"budget:{tenant}:{policy.period().id}")).get("tokens", 0.0)


async def test_a_stream_end_reconciles_at_once_without_a_task() -> None:
    store = open_store(None)
    policy = _budget(store, tokens=100_000)
    reply = await policy(_chat(), _answer(30, stream=True))
    assert await _spent(store, policy) == CHAT_RESERVATION
    tasks = len(asyncio.all_tasks())
    await _drain(reply)
    assert len(asyncio.all_tasks()) == tasks and store.pending_writes == 0
    assert await _spent(store, policy) == 30
    await policy(_chat(), _answer(12, stream=False))  # a plain answer: at once too
    assert await _spent(store, policy) == 42


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_reconciliations_reach_the_store(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_server").url if backend == "redis" else None
    store = open_store(url, f"t-{uuid.uuid4().hex[:10]}:")
    policy = _budget(store, tokens=100_000)
    try:
        replies = [await policy(_chat(), _answer(10 + i, stream=True)) for i in range(20)]
        for reply in replies:
            await _drain(reply)
        for _ in range(20):
            await policy(_chat(), _answer(1, stream=False))
        with pytest.raises(RuntimeError):  # an error before any answer: all given back
            await policy(_chat(), _answer(1, stream=False, before=_raise))
        # usage_detail waits for what this process queued
        detail = (await policy.usage_detail("anonymous"))["anonymous"]
        assert detail["spent_tokens"] == sum(10 + i for i in range(20)) + 20
        assert store.pending_writes == 0 and policy.readiness()["store_errors"] == 0
    finally:
        if url is not None:
            await store.delete_prefix("")
        await store.close()


def _raise() -> None:
    raise RuntimeError("no answer")


async def test_a_plain_reconciliation_lost_to_an_outage_is_counted(
    redis_server: RedisServer,
) -> None:
    del redis_server  # only to fail early when redis-server is missing
    with RedisServer() as own:
        store = open_store(own.url, "budget-outage:", timeout_s=0.3)
        metrics = Metrics()
        policy = _budget(store, metrics, tokens=100_000)
        try:
            reply = await policy(_chat(), _answer(5, stream=False, before=own.stop))
            assert reply.status == 200  # the answer is not held up by the store
            await asyncio.wait_for(policy.flush(), 5)
            assert policy.readiness()["store_errors"] == 1
            value = metrics.registry.get_sample_value("ollama_sidecar_budget_store_errors_total")
            assert value == 1
        finally:
            await store.close()


async def test_limits_follow_the_overrides_object_and_the_gauge_reads_the_spend() -> None:
    store = open_store(None)
    metrics = Metrics()
    policy = _budget(store, metrics, tokens=1000)
    first = MappingProxyType({"budget_tokens": 4 * CHAT_RESERVATION})

    def ratio() -> float | None:
        return metrics.registry.get_sample_value(
            "ollama_sidecar_budget_used_ratio", {"tenant": "team"}
        )

    assert ratio() is None
    await policy(_chat("team", first), _answer(CHAT_RESERVATION, stream=False))
    assert ratio() == pytest.approx(0.25)
    await policy(_chat("team", first), _answer(CHAT_RESERVATION, stream=False))
    assert ratio() == pytest.approx(0.5)
    # a reloaded auth: a new mapping, its limits apply at once
    second = MappingProxyType({"budget_tokens": 2 * CHAT_RESERVATION})
    with pytest.raises(SidecarError) as refused:
        await policy(_chat("team", second), _answer(1, stream=False))
    assert refused.value.status == 429 and ratio() == 1.0
    # no overrides: the policy's own limit
    await policy(_chat("team"), _answer(CHAT_RESERVATION, stream=False))
    assert ratio() == pytest.approx(3 * CHAT_RESERVATION / 1000)
