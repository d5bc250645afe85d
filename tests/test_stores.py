"""sidecar.stores: every behaviour on both backends, memory and a real redis-server."""

from __future__ import annotations

import asyncio
import math
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from sidecar.stores import MemoryStore, RedisStore, Store, StoreUnavailable, open_store
from tests.redis_server import RedisServer, free_port

pytestmark = pytest.mark.slow


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@dataclass
class Backend:
    kind: str
    store: Store
    clock: FakeClock
    url: str | None
    prefix: str
    extra: list[Store]

    def another(self) -> Store:
        """A second "pod": same Redis and prefix, or (memory) a separate process's state."""
        other = open_store(self.url, self.prefix, clock=self.clock)
        self.extra.append(other)
        return other


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    clock = FakeClock()
    prefix = f"test-{uuid.uuid4().hex[:10]}:"
    url: str | None = None
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        url = server.url
    b = Backend(request.param, open_store(url, prefix, clock=clock), clock, url, prefix, [])
    try:
        yield b
    finally:
        if url is not None:
            await b.store.delete_prefix("")
        for s in [b.store, *b.extra]:
            await s.close()


def test_open_store_picks_the_backend() -> None:
    assert isinstance(open_store(None), MemoryStore)
    assert isinstance(open_store(""), MemoryStore)
    assert isinstance(open_store("redis://127.0.0.1:1/0"), RedisStore)


# ---- token buckets ------------------------------------------------------------------------


async def test_bucket_allows_burst_then_refills_at_rate(backend: Backend) -> None:
    s = backend.store
    for i in range(10):
        r = await s.take("k", 1, rate_per_s=2, burst=10, now=100.0)
        assert r.allowed and r.retry_after_s == 0
        assert r.remaining == pytest.approx(9 - i)
    r = await s.take("k", 1, rate_per_s=2, burst=10, now=100.0)
    assert not r.allowed
    assert r.remaining == pytest.approx(0)
    assert r.retry_after_s == pytest.approx(0.5)
    assert r.reset_s == pytest.approx(5.0)
    # one second later: exactly 2 tokens came back
    assert (await s.take("k", 2, 2, 10, now=101.0)).allowed
    assert not (await s.take("k", 1, 2, 10, now=101.0)).allowed
    # long idle: full again, never above burst
    r = await s.take("k", 0, 2, 10, now=10_000.0)
    assert r.allowed and r.remaining == pytest.approx(10) and r.reset_s == 0
    assert (await s.take("k", 10, 2, 10, now=10_000.0)).allowed
    assert not (await s.take("k", 0.5, 2, 10, now=10_000.0)).allowed


async def test_retry_after_is_exact_and_denials_change_nothing(backend: Backend) -> None:
    s = backend.store
    assert (await s.take("k", 8, rate_per_s=3, burst=10, now=50.0)).allowed  # level 2
    denied = await s.take("k", 5, 3, 10, now=50.0)
    assert not denied.allowed
    assert denied.retry_after_s == pytest.approx(1.0)  # (5 - 2) / 3
    assert denied.remaining == pytest.approx(2)
    # repeated denials take nothing: still exactly 1 s to wait
    for _ in range(5):
        assert (await s.take("k", 5, 3, 10, now=50.0)).retry_after_s == pytest.approx(1.0)
    assert not (await s.take("k", 5, 3, 10, now=50.0 + 0.99)).allowed
    ok = await s.take("k", 5, 3, 10, now=50.0 + 1.0 + 1e-9)
    assert ok.allowed and ok.remaining == pytest.approx(0, abs=1e-6)
    # a cost above burst never fits
    never = await s.take("k", 11, 3, 10, now=1e6)
    assert not never.allowed and math.isinf(never.retry_after_s)
    assert (await s.take("k", 10, 3, 10, now=1e6)).allowed


async def test_time_never_goes_backwards(backend: Backend) -> None:
    s = backend.store
    assert (await s.take("k", 10, 1, 10, now=100.0)).allowed
    # a caller with a clock behind sees no refill, and no negative refill either
    r = await s.take("k", 0, 1, 10, now=90.0)
    assert r.remaining == pytest.approx(0)
    assert (await s.take("k", 1, 1, 10, now=101.0)).allowed


async def test_refund_and_reconcile_never_exceed_burst(backend: Backend) -> None:
    s = backend.store
    rate, burst, now = 1.0, 50.0, 500.0
    assert (await s.take("t", 40, rate, burst, now=now)).remaining == pytest.approx(10)
    # reserved 40, the request really cost 10: 30 back
    r = await s.reconcile("t", reserved=40, actual=10, rate_per_s=rate, burst=burst, now=now)
    assert r.allowed and r.remaining == pytest.approx(40)
    # refunding too much caps at burst
    r = await s.refund("t", 1000, rate, burst, now=now)
    assert r.remaining == pytest.approx(burst) and r.reset_s == 0
    # the real cost was above the reservation: the difference is taken, into debt if need be
    assert (await s.take("t", 30, rate, burst, now=now)).allowed  # level 20
    r = await s.reconcile("t", reserved=30, actual=70, rate_per_s=rate, burst=burst, now=now)
    assert r.remaining == pytest.approx(-20)
    assert r.reset_s == pytest.approx(70)
    d = await s.take("t", 1, rate, burst, now=now)
    assert not d.allowed and d.retry_after_s == pytest.approx(21)
    assert (await s.take("t", 1, rate, burst, now=now + 21)).allowed


async def test_bucket_input_validation(backend: Backend) -> None:
    s = backend.store
    with pytest.raises(ValueError):
        await s.take("k", 1, rate_per_s=0, burst=1)
    with pytest.raises(ValueError):
        await s.take("k", 1, rate_per_s=1, burst=-1)
    with pytest.raises(ValueError):
        await s.take("k", -1, 1, 1)
    with pytest.raises(ValueError):
        await s.take("k", math.nan, 1, 1)
    with pytest.raises(ValueError):
        await s.refund("k", -1, 1, 1)
    with pytest.raises(ValueError):
        await s.add("k", {"x": math.inf})
    with pytest.raises(ValueError):
        await s.reserve("k", -1, 10)


@pytest.mark.parametrize("explicit_now", [True, False])
async def test_concurrent_takes_admit_exactly_the_burst(
    backend: Backend, explicit_now: bool
) -> None:
    s = backend.store
    now = 1000.0 if explicit_now else None  # None: server TIME (redis) / the clock (memory)
    results = await asyncio.gather(
        *(s.take("hot", 1, rate_per_s=1e-6, burst=50, now=now) for _ in range(200))
    )
    assert sum(r.allowed for r in results) == 50
    assert all(r.retry_after_s > 0 for r in results if not r.allowed)


async def test_two_pods_share_one_bucket_on_redis_only(backend: Backend) -> None:
    pod_a, pod_b = backend.store, backend.another()
    takes = [
        pod.take("shared", 1, rate_per_s=1e-6, burst=50, now=1000.0)
        for _ in range(100)
        for pod in (pod_a, pod_b)
    ]
    results = await asyncio.gather(*takes)
    admitted = sum(r.allowed for r in results)
    if backend.kind == "redis":
        assert pod_a.shared and pod_b.shared
        assert admitted == 50  # two replicas together: exactly the limit
    else:
        assert not pod_a.shared
        assert admitted == 100  # memory is per pod: each admits its own 50


# ---- counters -----------------------------------------------------------------------------


async def test_counters_add_get_scan_delete(backend: Backend) -> None:
    s = backend.store
    assert await s.get("usage:a:m1") == {}
    t = await s.add("usage:a:m1", {"prompt": 10, "completion": 5, "total": 15, "requests": 1})
    assert t == {"prompt": 10, "completion": 5, "total": 15, "requests": 1}
    t = await s.add("usage:a:m1", {"prompt": 3, "total": 3, "cost": 0.25})
    assert t == {"prompt": 13, "completion": 5, "total": 18, "requests": 1, "cost": 0.25}
    assert await s.get("usage:a:m1") == t
    assert await s.add("usage:a:m1", {}) == t
    # signed corrections
    assert (await s.add("usage:a:m1", {"cost": -0.05}))["cost"] == pytest.approx(0.2)
    await s.add("usage:a:m2", {"total": 7})
    await s.add("usage:b:m1", {"total": 1})
    await s.add("usage:a*", {"total": 100})  # glob characters are literal in prefixes
    await s.add("other", {"total": 2})
    await s.take("usage:a:bucket", 1, 1, 5, now=1.0)  # buckets are not counters

    report = await s.scan("usage:a:")
    assert set(report) == {"usage:a:m1", "usage:a:m2"}
    assert report["usage:a:m2"] == {"total": 7}
    assert set(await s.scan("usage:a*")) == {"usage:a*"}
    assert set(await s.scan("")) == {"usage:a:m1", "usage:a:m2", "usage:b:m1", "usage:a*", "other"}

    assert await s.delete_prefix("usage:a:") == 3  # two counters and the bucket
    assert await s.get("usage:a:m1") == {}
    assert set(await s.scan("")) == {"usage:b:m1", "usage:a*", "other"}
    r = await s.take("usage:a:bucket", 0, 1, 5, now=1.0)
    assert r.remaining == pytest.approx(5)  # the bucket went too


async def test_concurrent_adds_lose_nothing(backend: Backend) -> None:
    s = backend.store
    await asyncio.gather(*(s.add("c", {"n": 1, "tokens": 2.5}) for _ in range(300)))
    assert await s.get("c") == {"n": 300, "tokens": 750}


async def test_counter_ttl_is_set_once_and_expires(backend: Backend) -> None:
    s = backend.store
    assert await s.ttl("c") is None
    await s.add("c", {"n": 1})
    assert await s.ttl("c") is None  # no ttl asked: none
    await s.add("p", {"n": 1}, ttl_s=60)
    ttl = await s.ttl("p")
    assert ttl is not None and 59 <= ttl <= 60
    await s.add("p", {"n": 1}, ttl_s=3600)  # later adds do not extend a period
    ttl = await s.ttl("p")
    assert ttl is not None and ttl <= 60
    if backend.kind == "memory":
        backend.clock.advance(61)
    else:
        await s.add("short", {"n": 1}, ttl_s=0.15)
        await asyncio.sleep(0.3)
        assert await s.get("short") == {}
        assert isinstance(s, RedisStore)
        async with aioredis.Redis.from_url(str(backend.url)) as raw:
            assert await raw.pttl(f"{backend.prefix}c:p") > 0
        return
    assert await s.get("p") == {}
    assert await s.scan("") == {"c": {"n": 1}}
    assert (await s.add("p", {"n": 1}, ttl_s=60)) == {"n": 1}  # a fresh period


async def test_bucket_keys_expire_when_full_again(backend: Backend) -> None:
    s = backend.store
    r = await s.take("b", 4, rate_per_s=2, burst=10)  # reset in 2 s
    assert r.reset_s == pytest.approx(2.0)
    if backend.kind == "redis":
        async with aioredis.Redis.from_url(str(backend.url)) as raw:
            pttl = await raw.pttl(f"{backend.prefix}b:b")
        assert 2000 < pttl <= 3000  # refill time + 1 s grace
    else:
        backend.clock.advance(3.01)
        assert s._buckets.get("b") is not None  # type: ignore[attr-defined]
        r = await s.take("b", 0, 2, 10)
        assert r.remaining == pytest.approx(10)
        assert "b" not in s._buckets  # type: ignore[attr-defined]


# ---- budgets ------------------------------------------------------------------------------


async def test_reserve_respects_the_limit_under_concurrency(backend: Backend) -> None:
    s = backend.store
    results = await asyncio.gather(*(s.reserve("budget", 1, limit=100) for _ in range(500)))
    assert sum(r.allowed for r in results) == 100
    assert all(r.spent == 100 for r in results if not r.allowed)
    assert (await s.get("budget"))["spent"] == 100
    # uneven amounts: 14 * 7 = 98 fits, a 15th does not
    results = await asyncio.gather(*(s.reserve("b7", 7, 100, ttl_s=30) for _ in range(50)))
    assert sum(r.allowed for r in results) == 14
    assert (await s.ttl("b7") or 0) > 0


async def test_reserve_then_reconcile_with_add(backend: Backend) -> None:
    s = backend.store
    allowed, spent = await s.reserve("tenant:a", 40, limit=100, field="tokens")
    assert allowed and spent == 40
    # the request really used 25 tokens: give 15 back
    assert (await s.add("tenant:a", {"tokens": 25 - 40}))["tokens"] == 25
    assert (await s.reserve("tenant:a", 75, 100, field="tokens")) == (True, 100)
    assert (await s.reserve("tenant:a", 1, 100, field="tokens")) == (False, 100)
    assert (await s.reserve("tenant:a", 0, 100, field="tokens")).allowed
    # money: float sums that land on the limit fit
    assert (await s.reserve("cost", 0.1, 0.3)).allowed
    assert (await s.reserve("cost", 0.2, 0.3)).allowed
    assert not (await s.reserve("cost", 0.01, 0.3)).allowed


# ---- failure ------------------------------------------------------------------------------


async def test_ping(backend: Backend) -> None:
    await backend.store.ping()


async def _all_ops_fail_fast(store: Store, bound_s: float) -> None:
    ops: list[Callable[[], Awaitable[object]]] = [
        lambda: store.ping(),
        lambda: store.take("k", 1, 1, 1),
        lambda: store.refund("k", 1, 1, 1),
        lambda: store.add("k", {"n": 1}, ttl_s=5),
        lambda: store.get("k"),
        lambda: store.ttl("k"),
        lambda: store.scan(""),
        lambda: store.delete_prefix(""),
        lambda: store.reserve("k", 1, 10),
    ]
    for op in ops:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await op()
        assert time.monotonic() - started < bound_s


async def test_unreachable_redis_raises_store_unavailable_quickly() -> None:
    store = open_store(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)  # nobody listens
    try:
        await _all_ops_fail_fast(store, bound_s=1.0)
    finally:
        await store.close()


async def test_redis_that_never_answers_times_out() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as hole:  # accepts, never replies
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        store = open_store(f"redis://127.0.0.1:{hole.getsockname()[1]}/0", timeout_s=0.3)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.take("k", 1, 1, 1)
            assert 0.2 < time.monotonic() - started < 1.0
        finally:
            await store.close()


async def test_outage_and_recovery(redis_server: RedisServer) -> None:
    del redis_server  # only to fail early when redis-server is missing
    with RedisServer() as own:
        store = open_store(own.url, "outage:", timeout_s=0.5)
        try:
            assert (await store.add("n", {"x": 1})) == {"x": 1}
            own.stop()
            await _all_ops_fail_fast(store, bound_s=1.0)
            own.start()  # same port, empty (no persistence)
            assert (await store.add("n", {"x": 1})) == {"x": 1}
            assert (await store.take("k", 1, 1, 1, now=1.0)).allowed
        finally:
            await store.close()


# ---- several buckets at once ---------------------------------------------------------------


async def test_take_all_takes_every_bucket_or_none(backend: Backend) -> None:
    s = backend.store
    r, t = ("r", 1.0, 1e-6, 3.0), ("t", 40.0, 1e-6, 100.0)
    a, b = await s.take_all([r, t])
    assert a.allowed and b.allowed and a.retry_after_s == 0 == b.retry_after_s
    assert a.remaining == pytest.approx(2) and b.remaining == pytest.approx(60)
    assert b.reset_s == pytest.approx(40 / 1e-6)
    # the second bucket refuses: nothing is taken from the first, which is only peeked
    a, b = await s.take_all([r, ("t", 70.0, 1e-6, 100.0)])
    assert a.allowed and a.remaining == pytest.approx(2)
    assert not b.allowed and b.remaining == pytest.approx(60)
    assert b.retry_after_s == pytest.approx(10 / 1e-6)
    assert (await s.take("r", 0, 1e-6, 3.0)).remaining == pytest.approx(2)
    # the first refuses: the second is peeked, even though it would refuse too
    assert (await s.take_all([r, t]))[0].allowed
    assert (await s.take_all([r, ("t", 1.0, 1e-6, 100.0)]))[0].allowed  # r is empty now
    a, b = await s.take_all([r, ("t", 500.0, 1e-6, 100.0)])
    assert not a.allowed and a.remaining == pytest.approx(0, abs=1e-3) and a.retry_after_s > 0
    assert b.allowed and b.remaining == pytest.approx(19) and b.retry_after_s == 0
    # a cost above the burst never fits
    _, never = await s.take_all([("r2", 1.0, 1.0, 5.0), ("t2", 101.0, 1.0, 100.0)])
    assert not never.allowed and math.isinf(never.retry_after_s)
    assert (await s.take("r2", 0, 1.0, 5.0)).remaining == pytest.approx(5)
    # zero costs peek and write nothing; no buckets, no results
    assert [x.allowed for x in await s.take_all([("z", 0.0, 1.0, 5.0)])] == [True]
    assert await s.take_all([]) == ()


async def test_take_all_refills_like_take(backend: Backend) -> None:
    s = backend.store
    assert (await s.take("k", 10, rate_per_s=2, burst=10, now=100.0)).allowed
    a, b = await s.take_all([("k", 2, 2, 10), ("other", 1, 2, 10)], now=101.0)
    assert a.allowed and a.remaining == pytest.approx(0) and b.remaining == pytest.approx(9)
    a, _ = await s.take_all([("k", 1, 2, 10), ("other", 1, 2, 10)], now=101.25)
    assert not a.allowed and a.retry_after_s == pytest.approx(0.25)
    a, _ = await s.take_all([("k", 0, 2, 10), ("other", 0, 2, 10)], now=90.0)  # no going back
    assert a.remaining == pytest.approx(0)


@pytest.mark.parametrize("explicit_now", [True, False])
async def test_concurrent_take_all_admit_exactly_the_smaller_burst(
    backend: Backend, explicit_now: bool
) -> None:
    s = backend.store
    now = 1000.0 if explicit_now else None
    pair = [("req", 1.0, 1e-6, 100.0), ("tok", 10.0, 1e-6, 600.0)]  # tokens run out first
    results = await asyncio.gather(*(s.take_all(pair, now=now) for _ in range(500)))
    assert sum(a.allowed and b.allowed for a, b in results) == 60
    assert sum(not b.allowed for _, b in results) == 440
    # the refused requests took no request slot
    assert (await s.take("req", 0, 1e-6, 100.0, now=now)).remaining == pytest.approx(40)
    assert (await s.take("tok", 0, 1e-6, 600.0, now=now)).remaining == pytest.approx(0, abs=1e-3)


async def test_two_pods_take_all_from_one_pair_on_redis_only(backend: Backend) -> None:
    pods = (backend.store, backend.another())
    pair = [("req", 1.0, 1e-6, 50.0), ("tok", 1.0, 1e-6, 1000.0)]
    results = await asyncio.gather(*(pods[i % 2].take_all(pair) for i in range(200)))
    admitted = sum(a.allowed and b.allowed for a, b in results)
    assert admitted == (50 if backend.kind == "redis" else 100)


async def test_take_all_input_validation(backend: Backend) -> None:
    s = backend.store
    for bad in [("k", 1.0, 0.0, 1.0), ("k", 1.0, 1.0, -1.0), ("k", -1.0, 1.0, 1.0)]:
        with pytest.raises(ValueError):
            await s.take_all([("ok", 1.0, 1.0, 1.0), bad])
    with pytest.raises(ValueError):
        await s.take_all([("k", math.nan, 1.0, 1.0)])
    assert (await s.take("ok", 0, 1.0, 1.0)).remaining == pytest.approx(1)  # nothing taken


# ---- writes without a wait ------------------------------------------------------------------


class Errors:
    """An `on_error` that records what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, StoreUnavailable]] = []

    def __call__(self, key: str, operations: int, error: StoreUnavailable) -> None:
        self.calls.append((key, operations, error))

    @property
    def operations(self) -> int:
        return sum(n for _, n, _ in self.calls)


async def test_nowait_writes_add_up_exactly(backend: Backend) -> None:
    s = backend.store
    errors = Errors()
    assert (await s.take("b", 40, rate_per_s=1e-6, burst=50)).allowed  # level 10
    for _ in range(300):
        s.add_nowait("c", {"n": 1, "tokens": 2.5}, on_error=errors)
        s.adjust_nowait("b", -0.1, 1e-6, 50, on_error=errors)
    s.add_nowait("c", {"tokens": -50})
    s.adjust_nowait("b", 5, 1e-6, 50)  # taken again: level 35
    if backend.kind == "memory":
        assert s.pending_writes == 0  # applied at once, without a task
        assert await s.get("c") == {"n": 300, "tokens": 700}
    else:
        assert s.pending_writes == 602
    await s.flush()
    assert s.pending_writes == 0
    assert await s.get("c") == {"n": 300, "tokens": 700}
    assert (await s.take("b", 0, 1e-6, 50)).remaining == pytest.approx(35)
    # a give-back never goes above burst, a take may go into debt
    s.adjust_nowait("b", -1000, 1e-6, 50)
    await s.flush()
    assert (await s.take("b", 0, 1e-6, 50)).remaining == pytest.approx(50)
    s.adjust_nowait("b", 70, 1e-6, 50)
    await s.flush()
    assert (await s.take("b", 0, 1e-6, 50)).remaining == pytest.approx(-20)
    assert errors.calls == []


async def test_add_nowait_sets_the_first_ttl_only(backend: Backend) -> None:
    s = backend.store
    s.add_nowait("p", {"n": 1})  # no TTL asked for
    s.add_nowait("p", {"n": 1}, ttl_s=60)  # the first TTL asked for
    s.add_nowait("p", {"n": 1}, ttl_s=3600)  # later ones do not extend it
    await s.flush()
    ttl = await s.ttl("p")
    assert ttl is not None and 59 <= ttl <= 60
    assert await s.get("p") == {"n": 3}


async def test_nowait_input_validation_raises_before_queueing(backend: Backend) -> None:
    s = backend.store
    with pytest.raises(ValueError):
        s.add_nowait("c", {"x": math.nan})
    with pytest.raises(ValueError):
        s.add_nowait("c", {"x": 1}, ttl_s=-1)
    with pytest.raises(ValueError):
        s.adjust_nowait("b", math.inf, 1, 1)
    with pytest.raises(ValueError):
        s.adjust_nowait("b", 1, 0, 1)
    assert s.pending_writes == 0
    await s.flush()
    assert await s.get("c") == {}


async def test_redis_sends_queued_writes_in_batches(redis_server: RedisServer) -> None:
    s = open_store(redis_server.url, f"batch-{uuid.uuid4().hex[:10]}:")
    assert isinstance(s, RedisStore)
    try:
        await _batches(s)
    finally:
        await s.delete_prefix("")
        await s.close()


async def _batches(s: RedisStore) -> None:
    scripts: list[int] = []
    original = s._batch_script

    async def counting(keys: list[str], args: list[str]) -> object:
        scripts.append(len(keys))
        return await original(keys=keys, args=args)

    s._batch_script = counting  # type: ignore[assignment]
    for i in range(1000):
        s.add_nowait(f"k{i % 600}", {"n": 1})  # 600 keys: three scripts of up to 256
        s.adjust_nowait("b", 1, 1e-6, 5000)  # one bucket, its corrections summed
    await s.flush()
    assert scripts == [256, 256, 89]
    written = await s.scan("k")
    assert len(written) == 600 and sum(v["n"] for v in written.values()) == 1000
    assert (await s.take("b", 0, 1e-6, 5000)).remaining == pytest.approx(4000)
    # writes queued while a batch is on its way go in the next one
    scripts.clear()
    s.add_nowait("late", {"n": 1})
    await asyncio.sleep(0)  # the writer is sending
    s.add_nowait("late", {"n": 1})
    s.add_nowait("late", {"n": 1})
    await s.flush()
    assert scripts == [1, 1] and await s.get("late") == {"n": 3}


async def test_redis_outage_reaches_on_error_never_the_caller(redis_server: RedisServer) -> None:
    del redis_server  # only to fail early when redis-server is missing
    with RedisServer() as own:
        store = open_store(own.url, "outage-nowait:", timeout_s=0.3)
        budget, limiter = Errors(), Errors()
        try:
            store.add_nowait("spent", {"tokens": 5}, ttl_s=60, on_error=budget)
            await store.flush()
            own.stop()
            for _ in range(3):
                store.add_nowait("spent", {"tokens": 1}, ttl_s=60, on_error=budget)
                store.adjust_nowait("bucket", -1, 1, 10, on_error=limiter)
            store.add_nowait("other", {"n": 1})  # no on_error: logged by the store
            started = time.monotonic()
            await store.flush()  # returns: the failure went to on_error
            assert time.monotonic() - started < 1.0
            assert budget.operations == 3 and limiter.operations == 3
            assert {key for key, _, _ in budget.calls + limiter.calls} == {"spent", "bucket"}
            assert all(isinstance(e, StoreUnavailable) for _, _, e in budget.calls)
            assert store.pending_writes == 0  # lost, not retried forever
            own.start()  # same port, empty
            store.add_nowait("spent", {"tokens": 2}, on_error=budget)
            await store.flush()
            assert await store.get("spent") == {"tokens": 2}
            assert budget.operations == 3
        finally:
            await store.close()


async def test_close_writes_what_is_queued(backend: Backend) -> None:
    s = backend.store
    s.add_nowait("c", {"n": 1})
    s.adjust_nowait("b", 3, 1e-6, 10)
    other = backend.another()
    await s.close()
    if backend.kind == "redis":
        assert await other.get("c") == {"n": 1}
        assert (await other.take("b", 0, 1e-6, 10)).remaining == pytest.approx(7)
