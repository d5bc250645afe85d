"""Shared state for policies: one small async interface, two backends.

* ``MemoryStore``: one pod. Every operation runs without an ``await`` in the middle, so it is
  atomic under asyncio. State is lost on restart.
* ``RedisStore``: every replica shares it. Every read-modify-write is ONE Lua script run with
  EVALSHA (``register_script``), so replicas never race; keys carry a TTL so idle state
  disappears by itself. Time comes from the Redis server's ``TIME`` (replicas agree) unless the
  caller passes ``now`` explicitly (tests).

Three kinds of state, in separate key spaces under the prefix (``{prefix}b:{key}`` for buckets,
``{prefix}c:{key}`` for counters), so a bucket and a counter with the same key never collide:

* token buckets: ``take`` (check-and-take), ``refund`` and ``reconcile`` (correct a
  reservation with the real cost; the level never exceeds ``burst`` but may go below zero,
  a debt that later takes wait out);
* counters: hashes of float fields, ``add`` / ``get`` / ``ttl`` / ``scan`` / ``delete_prefix``;
* budgets: ``reserve`` (spent + amount <= limit, then add) on a counter field, reconciled later
  with ``add`` and a signed correction.

Failures of the backend (unreachable, timed out, refusing writes) raise ``StoreUnavailable``;
the policy decides whether to fail open or closed. Every Redis call is bounded by ``timeout_s``.
"""

from __future__ import annotations

import abc
import asyncio
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "MemoryStore",
    "RedisStore",
    "ReserveResult",
    "Store",
    "StoreUnavailable",
    "TakeResult",
    "open_store",
]

Clock = Callable[[], float]

DEFAULT_PREFIX = "ollama-sidecar:"
# Relative slack when comparing float sums against a limit (0.1 + 0.2 <= 0.3 must hold, and the
# two backends must agree although Redis adds in long double).
_EPS = 1e-9
# Extra life for a bucket key past the moment it is full again (a full bucket == no key).
_BUCKET_GRACE_S = 1.0


class StoreUnavailable(Exception):
    """The shared store cannot be reached or did not answer in time."""


@dataclass(frozen=True, slots=True)
class TakeResult:
    """Outcome of a token-bucket operation.

    ``remaining``: tokens left after the operation (negative while in debt after a reconcile).
    ``retry_after_s``: 0 when allowed; else seconds until ``cost`` would be allowed
    (``math.inf`` when ``cost > burst``, which never fits).
    ``reset_s``: seconds until the bucket is full again (OpenAI's ``x-ratelimit-reset-*``).
    """

    allowed: bool
    remaining: float
    retry_after_s: float
    reset_s: float


class ReserveResult(NamedTuple):
    """Outcome of ``reserve``: ``spent`` is the total after the reservation (or unchanged)."""

    allowed: bool
    spent: float


def _check_bucket(rate_per_s: float, burst: float) -> None:
    if not (math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ValueError(f"rate_per_s must be a finite number > 0, not {rate_per_s!r}")
    if not (math.isfinite(burst) and burst > 0):
        raise ValueError(f"burst must be a finite number > 0, not {burst!r}")


def _check_finite(name: str, value: float, *, nonneg: bool = False) -> None:
    if not math.isfinite(value) or (nonneg and value < 0):
        kind = "a finite number >= 0" if nonneg else "a finite number"
        raise ValueError(f"{name} must be {kind}, not {value!r}")


def _check_fields(fields: Mapping[str, float]) -> None:
    for name, value in fields.items():
        _check_finite(f"field {name!r}", value)


def _fits(spent: float, amount: float, limit: float) -> bool:
    return spent + amount <= limit + _EPS * max(1.0, abs(limit))


def _bucket_step(
    tokens: float | None,
    ts: float | None,
    now: float,
    cost: float,
    rate: float,
    burst: float,
    force: bool,
) -> tuple[bool, float, float, float, float, float]:
    """The bucket arithmetic; the Lua script below is a line-by-line copy of it.

    Returns (allowed, level_after, retry_after_s, reset_s, now_used, ttl_s); when not allowed
    the caller writes nothing (nor for an allowed 0-cost peek).
    """
    if tokens is None or ts is None:
        level = burst
    else:
        if now < ts:
            now = ts  # never go back in time (clock skew between callers passing `now`)
        level = min(burst, tokens + (now - ts) * rate)
    if force:  # reconcile/refund: apply a signed cost, never above burst
        level = min(burst, level - cost)
        allowed = True
    elif cost <= level:
        level -= cost
        allowed = True
    else:
        allowed = False
    retry = 0.0 if allowed else (cost - level) / rate
    reset = max(0.0, (burst - level) / rate)
    return allowed, level, retry, reset, now, reset + _BUCKET_GRACE_S


# ---- Lua (Redis 7; numbers go back to Python as strings: Redis truncates Lua numbers) ----

_LUA_NOW = """
local function now_from(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function f(x) return string.format('%.17g', x) end
local function set_ttl(key, ttl_arg)
  if ttl_arg ~= '' and redis.call('PTTL', key) < 0 then
    redis.call('PEXPIRE', key, math.max(1, math.ceil(tonumber(ttl_arg) * 1000)))
  end
end
"""

# KEYS[1] bucket; ARGV: cost, rate, burst, now ('' = server TIME), force ('1' = reconcile)
_LUA_BUCKET = (
    _LUA_NOW
    + """
local cost = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local now = now_from(ARGV[4])
local force = ARGV[5] == '1'
local st = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(st[1])
local ts = tonumber(st[2])
local level
if tokens == nil or ts == nil then
  level = burst
else
  if now < ts then now = ts end
  level = math.min(burst, tokens + (now - ts) * rate)
end
local allowed = 0
if force then
  level = math.min(burst, level - cost)
  allowed = 1
elseif cost <= level then
  level = level - cost
  allowed = 1
end
local retry = 0
if allowed == 0 then retry = (cost - level) / rate end
local reset = math.max(0, (burst - level) / rate)
if allowed == 1 and (force or cost > 0) then
  redis.call('HSET', KEYS[1], 'tokens', f(level), 'ts', f(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((reset + GRACE_S) * 1000))
end
return {allowed, f(level), f(retry), f(reset)}
""".replace("GRACE_S", repr(_BUCKET_GRACE_S))
)

# KEYS[1] counter hash; ARGV: ttl ('' = none), then field, increment pairs. Returns HGETALL.
_LUA_ADD = (
    _LUA_NOW
    + """
for i = 2, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
end
set_ttl(KEYS[1], ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS[1] counter hash; ARGV: field, amount, limit, ttl ('' = none), eps
_LUA_RESERVE = (
    _LUA_NOW
    + """
local spent = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local amount = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
if spent + amount > limit + tonumber(ARGV[5]) * math.max(1, math.abs(limit)) then
  return {0, f(spent)}
end
local total = redis.call('HINCRBYFLOAT', KEYS[1], ARGV[1], ARGV[2])
set_ttl(KEYS[1], ARGV[4])
return {1, total}
"""
)


class Store(abc.ABC):
    """The interface policies use. Keys are plain strings; the store namespaces them."""

    # -- token buckets --------------------------------------------------------------------
    @abc.abstractmethod
    async def take(
        self, key: str, cost: float, rate_per_s: float, burst: float, now: float | None = None
    ) -> TakeResult:
        """Atomically: refill at ``rate_per_s`` up to ``burst``, then take ``cost`` if it fits.

        A denied take changes nothing. A cost of 0 peeks (remaining / reset for headers).
        """

    @abc.abstractmethod
    async def adjust(
        self, key: str, delta: float, rate_per_s: float, burst: float, now: float | None = None
    ) -> TakeResult:
        """Atomically take ``delta`` more (delta > 0, may go into debt) or give ``-delta`` back
        (never above ``burst``). Always ``allowed``."""

    async def refund(
        self, key: str, amount: float, rate_per_s: float, burst: float, now: float | None = None
    ) -> TakeResult:
        """Give ``amount`` back (e.g. a request that never reached the upstream)."""
        _check_finite("amount", amount, nonneg=True)
        return await self.adjust(key, -amount, rate_per_s, burst, now)

    async def reconcile(
        self,
        key: str,
        reserved: float,
        actual: float,
        rate_per_s: float,
        burst: float,
        now: float | None = None,
    ) -> TakeResult:
        """Replace a reservation of ``reserved`` taken earlier by the real cost ``actual``."""
        _check_finite("reserved", reserved, nonneg=True)
        _check_finite("actual", actual, nonneg=True)
        return await self.adjust(key, actual - reserved, rate_per_s, burst, now)

    # -- counters ---------------------------------------------------------------------------
    @abc.abstractmethod
    async def add(
        self, key: str, fields: Mapping[str, float], ttl_s: float | None = None
    ) -> dict[str, float]:
        """Atomically add each field's (signed) value; return all of the key's new totals.

        ``ttl_s`` is set when the key has no TTL yet (i.e. on creation), and later adds do not
        extend it: a key named after its period (``usage:team:2025-06``) expires at a fixed time.
        """

    @abc.abstractmethod
    async def get(self, key: str) -> dict[str, float]:
        """All fields of a counter key ({} when absent or expired)."""

    @abc.abstractmethod
    async def ttl(self, key: str) -> float | None:
        """Seconds until the counter key expires; None when absent or without TTL."""

    @abc.abstractmethod
    async def scan(self, prefix: str) -> dict[str, dict[str, float]]:
        """Every counter key starting with ``prefix`` (not atomic across keys)."""

    @abc.abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Delete every counter and bucket key starting with ``prefix``; return how many."""

    # -- budgets ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def reserve(
        self,
        key: str,
        amount: float,
        limit: float,
        ttl_s: float | None = None,
        field: str = "spent",
    ) -> ReserveResult:
        """Atomically: if ``spent + amount <= limit`` add ``amount`` to ``field`` of counter
        ``key``. Reconcile later with ``add(key, {field: actual - amount})``."""

    # -- lifecycle ----------------------------------------------------------------------------
    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the backend answers."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def shared(self) -> bool:
        """True when every replica sees the same state (Redis)."""


# ---- memory -------------------------------------------------------------------------------


class MemoryStore(Store):
    """One pod's state in dicts. ``clock`` (default ``time.monotonic``) drives TTLs and the
    buckets' time when ``now`` is not given; tests inject a fake one."""

    _SWEEP_EVERY = 4096

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or time.monotonic
        self._buckets: dict[str, tuple[float, float, float]] = {}  # key -> tokens, ts, expires
        self._counters: dict[str, dict[str, float]] = {}
        self._expires: dict[str, float] = {}  # counter key -> expiry on the clock
        self._writes = 0

    @property
    def shared(self) -> bool:
        return False

    def _tick(self) -> None:
        self._writes += 1
        if self._writes % self._SWEEP_EVERY:
            return
        t = self._clock()
        for k in [k for k, (_, _, exp) in self._buckets.items() if exp <= t]:
            del self._buckets[k]
        for k in [k for k, exp in self._expires.items() if exp <= t]:
            self._counters.pop(k, None)
            del self._expires[k]

    def _bucket(self, key: str) -> tuple[float | None, float | None]:
        entry = self._buckets.get(key)
        if entry is None:
            return None, None
        if entry[2] <= self._clock():
            del self._buckets[key]
            return None, None
        return entry[0], entry[1]

    def _step(
        self, key: str, cost: float, rate: float, burst: float, now: float | None, force: bool
    ) -> TakeResult:
        tokens, ts = self._bucket(key)
        at = self._clock() if now is None else now
        allowed, level, retry, reset, at, ttl = _bucket_step(
            tokens, ts, at, cost, rate, burst, force
        )
        if allowed and (force or cost > 0):  # a 0-cost peek writes nothing
            self._buckets[key] = (level, at, self._clock() + ttl)
            self._tick()
        if not allowed and cost > burst:
            retry = math.inf
        return TakeResult(allowed, level, retry, reset)

    async def take(
        self, key: str, cost: float, rate_per_s: float, burst: float, now: float | None = None
    ) -> TakeResult:
        _check_bucket(rate_per_s, burst)
        _check_finite("cost", cost, nonneg=True)
        return self._step(key, cost, rate_per_s, burst, now, False)

    async def adjust(
        self, key: str, delta: float, rate_per_s: float, burst: float, now: float | None = None
    ) -> TakeResult:
        _check_bucket(rate_per_s, burst)
        _check_finite("delta", delta)
        return self._step(key, delta, rate_per_s, burst, now, True)

    def _live(self, key: str) -> dict[str, float] | None:
        exp = self._expires.get(key)
        if exp is not None and exp <= self._clock():
            del self._expires[key]
            self._counters.pop(key, None)
            return None
        return self._counters.get(key)

    def _set_ttl(self, key: str, ttl_s: float | None) -> None:
        if ttl_s is not None and key not in self._expires:
            self._expires[key] = self._clock() + ttl_s

    async def add(
        self, key: str, fields: Mapping[str, float], ttl_s: float | None = None
    ) -> dict[str, float]:
        _check_fields(fields)
        if ttl_s is not None:
            _check_finite("ttl_s", ttl_s, nonneg=True)
        current = self._live(key)
        if not fields:
            return dict(current or {})
        if current is None:
            current = self._counters[key] = {}
        for name, value in fields.items():
            current[name] = current.get(name, 0.0) + float(value)
        self._set_ttl(key, ttl_s)
        self._tick()
        return dict(current)

    async def get(self, key: str) -> dict[str, float]:
        return dict(self._live(key) or {})

    async def ttl(self, key: str) -> float | None:
        if self._live(key) is None:
            return None
        exp = self._expires.get(key)
        return None if exp is None else exp - self._clock()

    async def scan(self, prefix: str) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for key in [k for k in self._counters if k.startswith(prefix)]:
            live = self._live(key)
            if live is not None:
                out[key] = dict(live)
        return out

    async def delete_prefix(self, prefix: str) -> int:
        gone = [k for k in self._counters if k.startswith(prefix)]
        for k in gone:
            del self._counters[k]
            self._expires.pop(k, None)
        buckets = [k for k in self._buckets if k.startswith(prefix)]
        for k in buckets:
            del self._buckets[k]
        return len(gone) + len(buckets)

    async def reserve(
        self,
        key: str,
        amount: float,
        limit: float,
        ttl_s: float | None = None,
        field: str = "spent",
    ) -> ReserveResult:
        _check_finite("amount", amount, nonneg=True)
        _check_finite("limit", limit)
        current = self._live(key)
        spent = (current or {}).get(field, 0.0)
        if not _fits(spent, amount, limit):
            return ReserveResult(False, spent)
        totals = await self.add(key, {field: amount}, ttl_s)  # no await point inside: atomic
        return ReserveResult(True, totals[field])

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._buckets.clear()
        self._counters.clear()
        self._expires.clear()


# ---- redis --------------------------------------------------------------------------------


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _floats(flat: list[Any] | dict[str, Any]) -> dict[str, float]:
    if isinstance(flat, dict):
        return {str(k): float(v) for k, v in flat.items()}
    return {str(flat[i]): float(flat[i + 1]) for i in range(0, len(flat), 2)}


class RedisStore(Store):
    """State in Redis, shared by every replica. Construct with ``open_store``."""

    def __init__(
        self,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        *,
        timeout_s: float = 1.0,
        max_connections: int = 64,
    ) -> None:
        _check_finite("timeout_s", timeout_s, nonneg=True)
        # Imported here, not at the top: redis-py loads OpenTelemetry whenever it is
        # installed, and a sidecar without Redis should not pay for either.
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        self._failures: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._url = url
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,  # waiting for a free pooled connection
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),  # no hidden retries: the caller's budget is timeout_s
            health_check_interval=30,
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._bucket_script = self._client.register_script(_LUA_BUCKET)
        self._add_script = self._client.register_script(_LUA_ADD)
        self._reserve_script = self._client.register_script(_LUA_RESERVE)

    @property
    def shared(self) -> bool:
        return True

    @property
    def prefix(self) -> str:
        return self._prefix

    def _b(self, key: str) -> str:
        return f"{self._prefix}b:{key}"

    def _c(self, key: str) -> str:
        return f"{self._prefix}c:{key}"

    async def _run(self, what: str, op: Callable[[], Any]) -> Any:
        """Run one Redis round trip (or a few) under the timeout; map failures."""
        try:
            async with asyncio.timeout(self._timeout_s):
                return await op()
        except self._failures as exc:
            raise StoreUnavailable(
                f"redis {what} failed ({type(exc).__name__}: {exc or 'timed out'})"
            ) from exc

    async def _bucket(
        self, key: str, cost: float, rate: float, burst: float, now: float | None, force: bool
    ) -> TakeResult:
        args = [repr(float(cost)), repr(float(rate)), repr(float(burst))]
        args += ["" if now is None else repr(float(now)), "1" if force else "0"]
        raw = await self._run("take", lambda: self._bucket_script(keys=[self._b(key)], args=args))
        allowed = int(raw[0]) == 1
        retry = float(raw[2])
        if not allowed and cost > burst:
            retry = math.inf
        return TakeResult(allowed, float(raw[1]), retry, float(raw[3]))

    async def take(
        self, key: str, cost: float, rate_per_s: float, burst: float, now: float | None = None
    ) -> TakeResult:
        _check_bucket(rate_per_s, burst)
        _check_finite("cost", cost, nonneg=True)
        return await self._bucket(key, cost, rate_per_s, burst, now, False)

    async def adjust(
        self, key: str, delta: float, rate_per_s: float, burst: float, now: float | None = None
    ) -> TakeResult:
        _check_bucket(rate_per_s, burst)
        _check_finite("delta", delta)
        return await self._bucket(key, delta, rate_per_s, burst, now, True)

    async def add(
        self, key: str, fields: Mapping[str, float], ttl_s: float | None = None
    ) -> dict[str, float]:
        _check_fields(fields)
        if ttl_s is not None:
            _check_finite("ttl_s", ttl_s, nonneg=True)
        if not fields:
            return await self.get(key)
        args: list[str] = ["" if ttl_s is None else repr(float(ttl_s))]
        for name, value in fields.items():
            args += [name, repr(float(value))]
        raw = await self._run("add", lambda: self._add_script(keys=[self._c(key)], args=args))
        return _floats(raw)

    async def get(self, key: str) -> dict[str, float]:
        raw = await self._run("get", lambda: self._client.hgetall(self._c(key)))
        return _floats(raw)

    async def ttl(self, key: str) -> float | None:
        ms = int(await self._run("ttl", lambda: self._client.pttl(self._c(key))))
        return None if ms < 0 else ms / 1000.0

    async def _keys(self, pattern: str) -> list[str]:
        async def collect() -> list[str]:
            return [k async for k in self._client.scan_iter(match=pattern, count=500)]

        result: list[str] = await self._run("scan", collect)
        return result

    async def scan(self, prefix: str) -> dict[str, dict[str, float]]:
        base = self._c("")
        keys = await self._keys(_glob_escape(base + prefix) + "*")
        if not keys:
            return {}

        async def fetch() -> list[Any]:
            async with self._client.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.hgetall(k)
                return await pipe.execute()

        values = await self._run("scan", fetch)
        return {k[len(base) :]: _floats(v) for k, v in zip(keys, values, strict=True) if v}

    async def delete_prefix(self, prefix: str) -> int:
        keys = await self._keys(_glob_escape(self._c("") + prefix) + "*")
        keys += await self._keys(_glob_escape(self._b("") + prefix) + "*")
        if not keys:
            return 0

        async def unlink() -> int:
            deleted = 0
            for i in range(0, len(keys), 500):
                deleted += int(await self._client.unlink(*keys[i : i + 500]))
            return deleted

        result: int = await self._run("delete", unlink)
        return result

    async def reserve(
        self,
        key: str,
        amount: float,
        limit: float,
        ttl_s: float | None = None,
        field: str = "spent",
    ) -> ReserveResult:
        _check_finite("amount", amount, nonneg=True)
        _check_finite("limit", limit)
        if ttl_s is not None:
            _check_finite("ttl_s", ttl_s, nonneg=True)
        args = [field, repr(float(amount)), repr(float(limit))]
        args += ["" if ttl_s is None else repr(float(ttl_s)), repr(_EPS)]
        raw = await self._run(
            "reserve", lambda: self._reserve_script(keys=[self._c(key)], args=args)
        )
        return ReserveResult(int(raw[0]) == 1, float(raw[1]))

    async def ping(self) -> None:
        await self._run("ping", self._client.ping)

    async def close(self) -> None:
        await self._client.aclose(close_connection_pool=True)

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self._prefix!r})"


def open_store(
    redis_url: str | None,
    prefix: str = DEFAULT_PREFIX,
    *,
    timeout_s: float = 1.0,
    max_connections: int = 64,
    clock: Clock | None = None,
) -> Store:
    """A ``RedisStore`` for a ``redis://`` / ``rediss://`` / ``unix://`` URL, else a
    ``MemoryStore``. Nothing connects yet: the first operation (or ``ping``) does."""
    if redis_url:
        return RedisStore(redis_url, prefix, timeout_s=timeout_s, max_connections=max_connections)
    return MemoryStore(clock=clock)
