"""The concurrency policy: a cap on in-flight upstream requests, a fair bounded queue, no leaks.

Unit tests drive the policy with a stub `call_next` whose requests are held on
asyncio events, so every interleaving is chosen by the test, not by timing.
Integration tests run a real sidecar against the fake Ollama and check what
Ollama would see: never more than the cap at once.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncGenerator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

import policies.concurrency  # noqa: F401 - registers "concurrency"
from policies.concurrency import MODEL_ROUTES, Concurrency, ConcurrencyConfig
from sidecar.app import Sidecar
from sidecar.chain import PolicyContext
from sidecar.config import ConfigError, parse_settings
from sidecar.errors import SidecarError, StreamInterrupted
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import validate
from sidecar.observability import Metrics
from sidecar.routes import ROUTES
from tests.conftest import SidecarFactory
from tests.fake_ollama import FakeOllama

CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]}


# --- helpers ------------------------------------------------------------------------


class Clock:
    """A clock the test moves by hand, for the service-time mean behind Retry-After."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_policy(
    clock: Callable[[], float] | None = None, metrics: Metrics | None = None, **options: Any
) -> Concurrency:
    context = PolicyContext(settings=parse_settings({}), metrics=metrics or Metrics())
    if clock is not None:
        context = PolicyContext(settings=context.settings, metrics=context.metrics, clock=clock)
    return Concurrency(validate(ConcurrencyConfig, options), context)


def make_exchange(
    tag: str,
    model: str = "llama3.2",
    upstream: str | None = None,
    route: str = "/v1/chat/completions",
) -> Exchange:
    exchange = Exchange(
        method="POST" if ROUTES[route].json_body else "GET",
        route=ROUTES[route],
        path=route,
        query_string="",
        headers=CIMultiDictProxy(CIMultiDict()),
        body=orjson.dumps({"model": model, "messages": []}) if ROUTES[route].json_body else b"",
    )
    exchange.facts["tag"] = tag
    if upstream is not None:
        exchange.facts["upstream"] = upstream
    return exchange


class StubUpstream:
    """A `call_next` that records who got in and holds each request until the test releases it.

    With `stream=True` it answers at once with a stream whose chunks wait for
    the request's event; otherwise `call_next` itself waits for it.
    """

    def __init__(self, stream: bool = False) -> None:
        self.stream = stream
        self.entered: list[str] = []
        self.in_flight = 0
        self.peak = 0
        self.fail: dict[str, BaseException] = {}
        self._events: dict[str, asyncio.Event] = {}

    def event(self, tag: str) -> asyncio.Event:
        return self._events.setdefault(tag, asyncio.Event())

    def release(self, *tags: str) -> None:
        for tag in tags:
            self.event(tag).set()

    async def __call__(self, exchange: Exchange) -> Reply:
        tag = exchange.facts["tag"]
        self.entered.append(tag)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.stream:
                return Reply(200, CIMultiDict(), chunks=self._chunks(tag), stream_format="sse")
            await self.event(tag).wait()
            if tag in self.fail:
                raise self.fail[tag]
            return Reply(200, CIMultiDict(), body=tag.encode())
        finally:
            self.in_flight -= 1

    async def _chunks(self, tag: str) -> AsyncGenerator[bytes, None]:
        yield b"data: first\n\n"
        await self.event(tag).wait()
        if tag in self.fail:
            raise self.fail[tag]
        yield b"data: [DONE]\n\n"


async def eventually(condition: Callable[[], bool], within: float = 2.0) -> None:
    """Let other tasks run until `condition` holds; fail after `within` seconds.

    The policy's queue has no event to await (it needs none in production), so
    its state is polled; the wait is for a condition, never for a fixed time.
    """
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - see above
            await asyncio.sleep(0.001)


def state(policy: Concurrency, upstream: str = "default") -> tuple[int, int]:
    """(in flight, queued) of one upstream, as /readyz shows it."""
    entry = policy.readiness()["upstreams"].get(upstream, {"in_flight": 0, "queued": 0})
    return entry["in_flight"], entry["queued"]


def start(policy: Concurrency, stub: StubUpstream, exchange: Exchange) -> asyncio.Task[Reply]:
    return asyncio.create_task(policy(exchange, stub))


async def start_in_order(
    policy: Concurrency, stub: StubUpstream, tags: list[str], **exchange_options: Any
) -> list[asyncio.Task[Reply]]:
    """Start requests one after the other, each in the policy (running or queued) before the next."""
    upstream = exchange_options.get("upstream") or "default"
    tasks = []
    for tag in tags:
        expected = sum(state(policy, upstream)) + 1
        tasks.append(start(policy, stub, make_exchange(tag, **exchange_options)))
        # Awaited within the iteration, so the lambda sees this iteration's values.
        await eventually(lambda: sum(state(policy, upstream)) == expected)  # noqa: B023
    return tasks


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"ollama_sidecar_{name}", labels)


# --- the cap and the queue ----------------------------------------------------------


async def test_the_cap_is_respected_and_the_rest_wait() -> None:
    policy = make_policy(max_in_flight=2)
    stub = StubUpstream()
    tasks = [start(policy, stub, make_exchange(str(i))) for i in range(6)]
    await eventually(lambda: state(policy) == (2, 4))
    assert stub.in_flight == 2
    for released in range(1, 7):
        running = [tag for tag in stub.entered if not stub.event(tag).is_set()]
        assert len(running) == min(2, 7 - released)
        stub.release(running[0])
        # The freed slot goes to the next waiter: two in flight while any wait.
        await eventually(lambda: len(stub.entered) == min(6, released + 2))  # noqa: B023
    replies = await asyncio.gather(*tasks)
    assert sorted(reply.body for reply in replies) == [str(i).encode() for i in range(6)]
    assert stub.peak == 2
    assert state(policy) == (0, 0)


async def test_waiters_get_slots_in_arrival_order() -> None:
    policy = make_policy(max_in_flight=1)
    stub = StubUpstream()
    tasks = await start_in_order(policy, stub, ["a", "b", "c", "d", "e"])
    for tag in "abcd":
        stub.release(tag)
        await eventually(lambda: stub.entered[-1] != tag)  # noqa: B023
    stub.release("e")
    await asyncio.gather(*tasks)
    assert stub.entered == ["a", "b", "c", "d", "e"]
    assert stub.peak == 1


async def test_a_newcomer_does_not_overtake_the_queue() -> None:
    """The slot a request frees goes to the first waiter, not to whoever asks next."""
    policy = make_policy(max_in_flight=1)
    stub = StubUpstream()
    tasks = await start_in_order(policy, stub, ["a", "b"])
    stub.release("a")
    late = start(policy, stub, make_exchange("late"))
    await eventually(lambda: stub.entered == ["a", "b"] and state(policy) == (1, 1))
    stub.release("b", "late")
    await asyncio.gather(*tasks, late)
    assert stub.entered == ["a", "b", "late"]


async def test_a_full_queue_is_refused_at_once_with_retry_after() -> None:
    metrics = Metrics()
    policy = make_policy(max_in_flight=1, max_queue=2, metrics=metrics)
    stub = StubUpstream()
    tasks = await start_in_order(policy, stub, ["a", "b", "c"])
    with pytest.raises(SidecarError) as refused:
        await policy(make_exchange("d"), stub)
    error = refused.value
    assert error.status == 429
    assert error.code == "concurrency_limit"
    assert error.error_type == "rate_limit_error"
    # No request has finished yet: one service is taken as 1 s; two wait ahead, one slot.
    assert error.headers == {"Retry-After": "3"}
    assert "queue is full" in error.message
    assert "d" not in stub.entered
    assert sample(metrics, "concurrency_rejections_total", upstream="default", reason="queue_full")
    stub.release("a", "b", "c")
    await asyncio.gather(*tasks)
    assert state(policy) == (0, 0)


async def test_retry_after_follows_the_recent_service_time() -> None:
    clock = Clock()
    policy = make_policy(clock=clock, max_in_flight=2, max_queue=3)
    stub = StubUpstream()
    # Two requests that held their slot for 10 s each: the mean is 10 s.
    first = await start_in_order(policy, stub, ["a", "b"])
    clock.now += 10
    stub.release("a", "b")
    await asyncio.gather(*first)
    tasks = await start_in_order(policy, stub, ["c", "d", "e", "f", "g"])
    assert state(policy) == (2, 3)
    with pytest.raises(SidecarError) as refused:
        await policy(make_exchange("h"), stub)
    # Position 4 in the queue, two slots, 10 s each: ceil(10 * 4 / 2) = 20.
    assert refused.value.headers["Retry-After"] == "20"
    stub.release("c", "d", "e", "f", "g")
    await asyncio.gather(*tasks)


async def test_a_wait_longer_than_queue_timeout_is_refused() -> None:
    metrics = Metrics()
    policy = make_policy(max_in_flight=1, queue_timeout="50ms", metrics=metrics)
    stub = StubUpstream()
    (running,) = await start_in_order(policy, stub, ["a"])
    async with asyncio.timeout(2):
        with pytest.raises(SidecarError) as refused:
            await policy(make_exchange("b"), stub)
    error = refused.value
    assert (error.status, error.code) == (429, "concurrency_limit")
    assert "queue_timeout (0.05s)" in error.message
    assert error.headers == {"Retry-After": "1"}
    assert stub.entered == ["a"]
    assert state(policy) == (1, 0)
    assert sample(
        metrics, "concurrency_rejections_total", upstream="default", reason="queue_timeout"
    )
    assert sample(metrics, "concurrency_queue_wait_seconds_count", upstream="default") == 1
    stub.release("a")
    await running
    assert state(policy) == (0, 0)


async def test_reject_status_503() -> None:
    policy = make_policy(max_in_flight=1, max_queue=0, reject_status=503)
    stub = StubUpstream()
    (running,) = await start_in_order(policy, stub, ["a"])
    with pytest.raises(SidecarError) as refused:
        await policy(make_exchange("b"), stub)
    assert (refused.value.status, refused.value.code) == (503, "concurrency_limit")
    assert refused.value.error_type == "api_error"
    assert "Retry-After" in refused.value.headers
    stub.release("a")
    await running


# --- nothing leaks --------------------------------------------------------------------


async def test_a_cancelled_waiter_leaves_the_queue_and_takes_no_slot() -> None:
    policy = make_policy(max_in_flight=1)
    stub = StubUpstream()
    a, b, c = await start_in_order(policy, stub, ["a", "b", "c"])
    b.cancel()
    await eventually(lambda: state(policy) == (1, 1))
    stub.release("a")
    await eventually(lambda: stub.entered == ["a", "c"])
    stub.release("c")
    await asyncio.gather(a, c)
    with pytest.raises(asyncio.CancelledError):
        await b
    assert stub.entered == ["a", "c"]
    assert state(policy) == (0, 0)


async def test_a_waiter_cancelled_just_after_its_grant_passes_the_slot_on() -> None:
    """The slot is handed over before the waiter runs; if it is gone by then, the next one gets it."""
    policy = make_policy(max_in_flight=1)
    stub = StubUpstream(stream=True)
    a, b, c = await start_in_order(policy, stub, ["a", "b", "c"])
    reply = await a
    assert reply.chunks is not None
    await reply.chunks.aclose()  # frees a's slot and hands it to b, synchronously
    assert state(policy) == (1, 1)  # b holds it now, though its task has not run yet
    b.cancel()
    await eventually(lambda: stub.entered == ["a", "c"])
    with pytest.raises(asyncio.CancelledError):
        await b
    last = await c
    assert last.chunks is not None
    await last.chunks.aclose()
    assert state(policy) == (0, 0)


async def test_a_waiter_cancelled_just_before_a_slot_frees_is_skipped() -> None:
    """Its task has not run yet, so it is still queued; the slot goes past it."""
    policy = make_policy(max_in_flight=1)
    stub = StubUpstream(stream=True)
    a, b, c = await start_in_order(policy, stub, ["a", "b", "c"])
    reply = await a
    assert reply.chunks is not None
    b.cancel()
    await reply.chunks.aclose()  # frees a's slot while b is cancelled but still queued
    await eventually(lambda: stub.entered == ["a", "c"])
    with pytest.raises(asyncio.CancelledError):
        await b
    last = await c
    assert last.chunks is not None
    await last.chunks.aclose()
    assert state(policy) == (0, 0)


async def test_an_exception_in_call_next_frees_the_slot() -> None:
    policy = make_policy(max_in_flight=1)
    stub = StubUpstream()
    stub.fail["a"] = RuntimeError("upstream exploded")
    a, b = await start_in_order(policy, stub, ["a", "b"])
    stub.release("a")
    with pytest.raises(RuntimeError):
        await a
    await eventually(lambda: stub.entered == ["a", "b"])
    stub.release("b")
    await b
    assert state(policy) == (0, 0)


async def test_cancelling_a_request_in_flight_frees_the_slot() -> None:
    policy = make_policy(max_in_flight=1)
    stub = StubUpstream()
    a, b = await start_in_order(policy, stub, ["a", "b"])
    a.cancel()
    await eventually(lambda: stub.entered == ["a", "b"])
    stub.release("b")
    await b
    with pytest.raises(asyncio.CancelledError):
        await a
    assert state(policy) == (0, 0)


# --- streams hold their slot until they end ------------------------------------------


async def _stream_holds_slot_until(
    end: Callable[[Reply], Any], stub: StubUpstream | None = None
) -> None:
    """a streams; b waits until a's stream ends by `end`, then gets the slot."""
    policy = make_policy(max_in_flight=1)
    stub = stub or StubUpstream(stream=True)
    a, b = await start_in_order(policy, stub, ["a", "b"])
    reply = await a
    assert stub.in_flight == 0  # call_next has returned ...
    assert state(policy) == (1, 1)  # ... yet the slot is still held by the stream
    await end(reply)
    await eventually(lambda: stub.entered == ["a", "b"])
    other = await b
    assert other.chunks is not None
    await other.chunks.aclose()
    assert state(policy) == (0, 0)


async def test_a_stream_holds_its_slot_until_it_completes() -> None:
    policy = make_policy(max_in_flight=1)
    stub = StubUpstream(stream=True)
    a, b = await start_in_order(policy, stub, ["a", "b"])
    reply = await a
    assert reply.chunks is not None
    chunks = [await anext(reply.chunks)]
    assert stub.in_flight == 0  # call_next has returned ...
    assert state(policy) == (1, 1)  # ... yet the stream, between chunks, holds the slot
    stub.release("a")
    chunks += [chunk async for chunk in reply.chunks]
    assert chunks == [b"data: first\n\n", b"data: [DONE]\n\n"]
    await eventually(lambda: stub.entered == ["a", "b"])
    other = await b
    assert other.chunks is not None
    await other.chunks.aclose()
    assert state(policy) == (0, 0)


async def test_a_stream_frees_its_slot_when_it_fails() -> None:
    stub = StubUpstream(stream=True)
    stub.fail["a"] = StreamInterrupted("the upstream connection broke mid-stream")

    async def fail(reply: Reply) -> None:
        assert reply.chunks is not None
        await anext(reply.chunks)
        stub.release("a")
        with pytest.raises(StreamInterrupted):
            await anext(reply.chunks)

    await _stream_holds_slot_until(fail, stub)


async def test_a_stream_frees_its_slot_when_the_client_abandons_it() -> None:
    async def abandon(reply: Reply) -> None:
        assert reply.chunks is not None
        await anext(reply.chunks)
        await reply.chunks.aclose()

    await _stream_holds_slot_until(abandon)


async def test_a_stream_closed_before_its_first_chunk_frees_its_slot() -> None:
    """The client left while the headers were written: the stream never started."""

    async def close_unstarted(reply: Reply) -> None:
        assert reply.chunks is not None
        await reply.chunks.aclose()

    await _stream_holds_slot_until(close_unstarted)


async def test_a_stream_dropped_without_closing_frees_its_slot() -> None:
    """Last resort: an outer step that loses the reply must not lose the slot with it."""

    async def drop(reply: Reply) -> None:
        reply.chunks = None
        del reply
        gc.collect()

    await _stream_holds_slot_until(drop)


# --- keys: upstreams, models, routes -----------------------------------------------


async def test_each_upstream_has_its_own_cap() -> None:
    policy = make_policy(max_in_flight=1)
    stub = StubUpstream()
    a = await start_in_order(policy, stub, ["a1"], upstream="a")
    b = await start_in_order(policy, stub, ["b1"], upstream="b")
    assert state(policy, "a") == (1, 0)
    assert state(policy, "b") == (1, 0)
    stub.release("a1", "b1")
    await asyncio.gather(*a, *b)


async def test_per_model_caps_each_model_and_the_upstream() -> None:
    policy = make_policy(max_in_flight=3, per_model=True, max_in_flight_per_model=1)
    stub = StubUpstream()
    x1 = start(policy, stub, make_exchange("x1", model="x"))
    await eventually(lambda: stub.entered == ["x1"])
    x2 = start(policy, stub, make_exchange("x2", model="x"))
    await eventually(lambda: state(policy) == (1, 1))
    # y and z are not stuck behind x2, which waits for its model only.
    y1 = start(policy, stub, make_exchange("y1", model="y"))
    z1 = start(policy, stub, make_exchange("z1", model="z"))
    await eventually(lambda: stub.entered == ["x1", "y1", "z1"])
    # The upstream is full now: w waits although its model is idle.
    w1 = start(policy, stub, make_exchange("w1", model="w"))
    await eventually(lambda: state(policy) == (3, 2))
    detail = policy.readiness()["upstreams"]["default"]
    assert detail["models"]["x"] == {"in_flight": 1, "queued": 1}
    assert detail["models"]["w"] == {"in_flight": 0, "queued": 1}
    # y's slot goes to w: x2, ahead of it, still waits for x.
    stub.release("y1")
    await eventually(lambda: stub.entered[-1] == "w1")
    assert state(policy) == (3, 1)
    stub.release("x1")
    await eventually(lambda: stub.entered[-1] == "x2")
    stub.release("x2", "z1", "w1")
    await asyncio.gather(x1, x2, y1, z1, w1)
    assert state(policy) == (0, 0)


async def test_per_model_retry_after_uses_the_model_cap() -> None:
    clock = Clock()
    policy = make_policy(
        clock=clock, max_in_flight=8, per_model=True, max_in_flight_per_model=1, max_queue=1
    )
    stub = StubUpstream()
    tasks = await start_in_order(policy, stub, ["a", "b"], model="x")
    with pytest.raises(SidecarError) as refused:
        await policy(make_exchange("c", model="x"), stub)
    # One waiting ahead for model x, one slot for x, 1 s each (no finished request yet).
    assert refused.value.headers["Retry-After"] == "2"
    assert "model 'x'" in refused.value.message
    stub.release("a", "b")
    await asyncio.gather(*tasks)


async def test_routes_that_run_no_model_never_wait() -> None:
    policy = make_policy(max_in_flight=1, max_queue=0)
    stub = StubUpstream()
    (running,) = await start_in_order(policy, stub, ["a"])
    stub.release("tags")
    reply = await policy(make_exchange("tags", route="/api/tags"), stub)
    assert reply.body == b"tags"
    assert state(policy) == (1, 0)
    stub.release("a")
    await running


async def test_gauges_read_the_live_counts() -> None:
    metrics = Metrics()
    policy = make_policy(max_in_flight=1, metrics=metrics)
    stub = StubUpstream()
    tasks = await start_in_order(policy, stub, ["a", "b", "c"])
    assert sample(metrics, "concurrency_in_flight", upstream="default") == 1
    assert sample(metrics, "concurrency_queued", upstream="default") == 2
    stub.release("a", "b", "c")
    await asyncio.gather(*tasks)
    assert sample(metrics, "concurrency_in_flight", upstream="default") == 0
    assert sample(metrics, "concurrency_queued", upstream="default") == 0
    assert sample(metrics, "concurrency_queue_wait_seconds_count", upstream="default") == 2


# --- configuration ------------------------------------------------------------------


def test_defaults() -> None:
    config = ConcurrencyConfig()
    assert config.max_in_flight == 8
    assert config.per_model is False
    assert config.max_in_flight_per_model == 1
    assert config.max_queue == 64
    assert config.queue_timeout == 30.0
    assert config.reject_status == 429
    assert config.routes == MODEL_ROUTES


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"max_in_fligth": 4}, "max_in_fligth"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"max_queue": -1}, "max_queue"),
        ({"queue_timeout": "forever"}, "queue_timeout"),
        ({"queue_timeout": 0}, "queue_timeout"),
        ({"reject_status": 500}, "reject_status"),
        ({"routes": ["/api/pul"]}, "routes"),
    ],
)
def test_bad_options_are_reported_with_their_path(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings({"policies": [{"concurrency": options}]})
    assert any(problem in path for path, _ in error.value.problems), error.value.problems


def test_durations_take_units() -> None:
    settings = parse_settings({"policies": [{"concurrency": {"queue_timeout": "250ms"}}]})
    (entry,) = settings.policies
    assert isinstance(entry.options, ConcurrencyConfig)
    assert entry.options.queue_timeout == 0.25


# --- through a real sidecar against the fake Ollama ----------------------------------


def _policy_of(sidecar: Sidecar) -> Concurrency:
    assert sidecar.runtime is not None
    (policy,) = [policy for name, policy in sidecar.runtime.policies if name == "concurrency"]
    assert isinstance(policy, Concurrency)
    return policy


def _complete(path: str, body: bytes) -> bool:
    if path.startswith("/v1/"):
        return body.endswith(b"data: [DONE]\n\n")
    return orjson.loads(body.splitlines()[-1]).get("done") is True


async def _hold_streams(fake: FakeOllama, count: int) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold every stream after its first chunk; `held` is set once `count` are held."""
    release, held = asyncio.Event(), asyncio.Event()
    holding = 0

    async def hold(index: int) -> None:
        nonlocal holding
        if index == 1:
            holding += 1
            if holding >= count:
                held.set()
        await release.wait()

    fake.between_chunks = hold
    return release, held


async def test_fifty_streams_never_put_more_than_the_cap_on_ollama(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(policies=[{"concurrency": {"max_in_flight": 4, "max_queue": 64}}])
    policy = _policy_of(sidecar)
    release, held = await _hold_streams(fake, 4)

    async def one(index: int) -> tuple[str, int, bytes]:
        path = "/v1/chat/completions" if index % 2 else "/api/chat"
        async with http.post(f"{sidecar.url}{path}", json={**CHAT, "stream": True}) as response:
            return path, response.status, await response.read()

    async with asyncio.timeout(20):
        tasks = [asyncio.create_task(one(index)) for index in range(50)]
        await held.wait()
        await eventually(lambda: state(policy) == (4, 46), within=10)
        assert fake.in_flight == 4
        async with http.get(f"{sidecar.url}/readyz") as response:
            detail = (await response.json())["policies"]["concurrency"]
        assert detail["upstreams"]["default"]["queued"] == 46
        release.set()
        results = await asyncio.gather(*tasks)
    assert all(status == 200 and _complete(path, body) for path, status, body in results)
    assert fake.peak_in_flight == 4
    assert state(policy) == (0, 0)
    assert len([r for r in fake.requests if r.path in MODEL_ROUTES]) == 50


@pytest.mark.parametrize("reject_status", [429, 503])
async def test_the_excess_is_refused_in_each_dialect_with_retry_after(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    reject_status: int,
) -> None:
    sidecar = await make_sidecar(
        policies=[
            {"correlation": {}},
            {"concurrency": {"max_in_flight": 2, "max_queue": 2, "reject_status": reject_status}},
        ]
    )
    policy = _policy_of(sidecar)
    release, held = await _hold_streams(fake, 2)

    async def one(path: str) -> tuple[int, CIMultiDictProxy[str], bytes]:
        async with http.post(f"{sidecar.url}{path}", json={**CHAT, "stream": True}) as response:
            return response.status, response.headers, await response.read()

    async with asyncio.timeout(20):
        admitted = [asyncio.create_task(one("/v1/chat/completions")) for _ in range(4)]
        await held.wait()
        await eventually(lambda: state(policy) == (2, 2))
        refused_v1 = await asyncio.gather(*(one("/v1/chat/completions") for _ in range(3)))
        refused_api = await asyncio.gather(*(one("/api/chat") for _ in range(3)))
        release.set()
        done = await asyncio.gather(*admitted)
    assert all(status == 200 and _complete("/v1/", body) for status, _, body in done)
    for status, headers, body in refused_v1:
        assert status == reject_status
        assert int(headers["Retry-After"]) >= 1
        assert headers["X-Request-ID"]  # a refusal still carries the request id
        error = orjson.loads(body)["error"]
        assert error["code"] == "concurrency_limit"
        assert error["type"] == ("rate_limit_error" if reject_status == 429 else "api_error")
        assert "queue is full" in error["message"]
    for status, headers, body in refused_api:
        assert status == reject_status
        assert int(headers["Retry-After"]) >= 1
        document = orjson.loads(body)
        assert isinstance(document["error"], str) and "queue is full" in document["error"]
    assert fake.peak_in_flight == 2
    assert len([r for r in fake.requests if r.path in MODEL_ROUTES]) == 4
    async with http.get(f"{sidecar.url}/metrics") as response:
        text = await response.text()
    assert (
        'ollama_sidecar_concurrency_rejections_total{reason="queue_full",upstream="default"} 6.0'
        in text
    )


async def test_a_queue_timeout_through_the_sidecar(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(
        policies=[{"concurrency": {"max_in_flight": 1, "queue_timeout": "50ms"}}]
    )
    release, held = await _hold_streams(fake, 1)
    async with asyncio.timeout(10):
        first = await http.post(f"{sidecar.url}/api/chat", json=CHAT)
        await held.wait()
        async with http.post(f"{sidecar.url}/api/generate", json={**CHAT, "prompt": "x"}) as late:
            assert late.status == 429
            assert late.headers["Retry-After"] == "1"
            assert "queue_timeout" in (await late.json())["error"]
        release.set()
        assert _complete("/api/", await first.read())
        first.release()
    assert [r.path for r in fake.requests if r.path in MODEL_ROUTES] == ["/api/chat"]


async def test_a_client_gone_while_queued_never_reaches_ollama(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(policies=[{"concurrency": {"max_in_flight": 1}}])
    policy = _policy_of(sidecar)
    release, held = await _hold_streams(fake, 1)

    async def one(path: str) -> bytes:
        async with http.post(f"{sidecar.url}{path}", json={**CHAT, "stream": True}) as response:
            return await response.read()

    async with asyncio.timeout(10):
        first = asyncio.create_task(one("/api/chat"))
        await held.wait()
        gone = asyncio.create_task(one("/v1/chat/completions"))
        await eventually(lambda: state(policy) == (1, 1))
        gone.cancel()  # closes the client's connection; the sidecar's handler is cancelled
        await eventually(lambda: state(policy) == (1, 0))
        release.set()
        assert _complete("/api/", await first)
        # The slot is not lost: the next request goes straight through.
        assert _complete("/v1/", await one("/v1/chat/completions"))
    paths = [r.path for r in fake.requests if r.path in MODEL_ROUTES]
    assert paths == ["/api/chat", "/v1/chat/completions"]
    assert state(policy) == (0, 0)
    assert fake.peak_in_flight == 1
